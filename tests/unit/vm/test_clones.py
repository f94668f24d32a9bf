"""VM.makeTemplate and VM.clone in-process (test:///default): what is refused, and a
clone's definition. Clones of volumes, linked and full, are tested with real guests in
tests/integration/test_vm_clones.py."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from tests.unit.vm.harness import InProcessAgent

UNKNOWN = "00000000-0000-4000-8000-0000000000ff"


async def clone_job(api: InProcessAgent, params: dict[str, Any]) -> dict[str, Any]:
    started = await api.call("VM.clone", params)
    job: dict[str, Any] = (await api.call("Job.wait", {"job_id": started["job_id"],
                                                       "timeout": 30}))["job"]
    return job


@pytest.mark.covers("VM.makeTemplate")
async def test_a_template_needs_a_stopped_vm_on_volumes(api: InProcessAgent) -> None:
    running = await api.create("running")
    await api.error("VM.makeTemplate", {"vm_id": running}, "FailedPrecondition", "vm_running")
    await api.error("VM.makeTemplate", {"vm_id": UNKNOWN}, "NotFound", "not_found")
    diskless = await api.create("diskless", start=False)
    await api.error("VM.makeTemplate", {"vm_id": diskless}, "FailedPrecondition", "no_disks")
    on_a_file = await api.create("on-a-file", start=False,
                                 disks=[{"path": api.image(), "format": "raw"}])
    await api.error("VM.makeTemplate", {"vm_id": on_a_file}, "FailedPrecondition",
                    "not_a_volume")
    info = await api.call("VM.getInfo", {"vm_id": on_a_file})
    assert info["template"] is False


@pytest.mark.covers("VM.clone")
async def test_a_clone_is_a_new_vm_with_its_own_identity(api: InProcessAgent) -> None:
    source = await api.create("origin", start=False, labels={"tier": "web"},
                              nics=[{"libvirt_network": "default"}])
    await api.error("VM.clone", {"vm_id": source, "name": "bad name"}, "InvalidArgument",
                    "invalid_spec")
    job = await clone_job(api, {"vm_id": source, "name": "copy"})
    assert job["state"] == "succeeded", job
    clone_id = job["result"]["vm_id"]
    assert clone_id != source and job["result"]["name"] == "copy"
    info = await api.call("VM.getInfo", {"vm_id": clone_id})
    assert (info["state"], info["labels"], info["template"]) in [
        ("defined", {"tier": "web"}, False), ("shutoff", {"tier": "web"}, False)]
    macs = []
    for vm_id in (source, clone_id):
        xml = (await api.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
        macs.append(etree.fromstring(xml).find("devices/interface/mac").get("address"))
    assert macs[0] != macs[1], "a new MAC address"

    # Refused: a name taken, a running source, a linked clone of what is no template.
    job = await clone_job(api, {"vm_id": source, "name": "copy"})
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "name_taken"), job
    job = await clone_job(api, {"vm_id": source, "name": "linked", "linked": True})
    assert job["error"]["data"]["reason"] == "not_template"
    running = await api.create("busy")
    job = await clone_job(api, {"vm_id": running, "name": "busy-copy"})
    assert job["error"]["data"]["reason"] == "vm_running"
    job = await clone_job(api, {"vm_id": source, "name": "seeded", "cloud_init": {
        "user_data": "#cloud-config\n"}})
    assert job["error"]["data"]["reason"] == "invalid_cloud_init", "no disk: no domain"
    job = await clone_job(api, {"vm_id": UNKNOWN, "name": "ghost"})
    assert job["error"]["data"]["reason"] == "not_found"
    names = {vm["name"] for vm in (await api.call("VM.list", {}))["vms"]}
    assert names - {"test"} == {"origin", "copy", "busy"}  # "test": the driver's own

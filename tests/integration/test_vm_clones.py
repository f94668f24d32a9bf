"""Templates and clones of a real guest: a full copy of a stopped VM and a linked clone
of a template both boot with the source's files, write their own, and leave the
source's volumes as they were."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pycdlib
import pytest
import yaml
from lxml import etree

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import expect_error, vm_name, wait_job
from tests.integration.serialshell import serial_shell
from tests.integration.test_vm_snapshots import (
    agent_vm,
    domain_and_disk,
    files_in,
    volume_info,
)
from virtnode.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


@pytest.fixture
async def clone_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    yield agent
    await agent.stop()


async def clone(client: Client, vm_id: str, **params: object) -> dict[str, object]:
    started = await client.call("VM.clone", {"vm_id": vm_id, "name": vm_name(), **params})
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "succeeded", job
    result: dict[str, object] = job["result"]
    return result


async def boots_with(agent: AgentProcess, client: Client, vm_id: str, files: list[str],
                     new: str) -> None:
    """Start the VM: its data disk holds ``files``; it writes ``new`` and stops."""
    await client.call("VM.start", {"vm_id": vm_id})
    async with serial_shell(agent, client, vm_id) as shell:
        status, out = await shell.run(f"dmesg -n 1 && datadisk && ls /data && echo > "
                                      f"/data/{new} && sync")
        assert status == 0, out
        assert sorted(out.split()) == sorted(["lost+found", *files])
    await client.call("VM.destroy", {"vm_id": vm_id})


async def test_full_and_linked_clones_boot_with_the_source_files(
        clone_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(clone_agent.unix_url)
    sd_id, disk = await domain_and_disk(client, image_dir)
    source = await agent_vm(client, disk)
    async with serial_shell(clone_agent, client, source) as shell:
        assert (await shell.run("datadisk && echo 1 > /data/marker && sync"))[0] == 0
    await expect_error(client, "VM.makeTemplate", {"vm_id": source}, "FailedPrecondition",
                       "vm_running")
    await client.call("VM.destroy", {"vm_id": source})

    # A full copy of a stopped VM: its own image, whole.
    full = await clone(client, source)
    [copied] = full["disks"]  # type: ignore[misc]
    info = await volume_info(client, **{k: copied[k] for k in ("sd_id", "image_id",
                                                                 "volume_id")})
    assert (info["parent"], info["role"], info["format"]) == (None, "leaf", "qcow2")
    assert copied["image_id"] != disk["image_id"]
    await boots_with(clone_agent, client, str(full["vm_id"]), ["marker"], "full")

    # The source becomes a template: never started, its volume shared.
    made = await client.call("VM.makeTemplate", {"vm_id": source})
    assert [d["volume_id"] for d in made["disks"]] == [disk["volume_id"]]
    assert (await volume_info(client, **disk))["role"] == "shared"
    assert (await client.call("VM.getInfo", {"vm_id": source}))["template"] is True
    await expect_error(client, "VM.start", {"vm_id": source}, "FailedPrecondition",
                       "is_template")
    again = await client.call("VM.makeTemplate", {"vm_id": source})  # a no-op now
    assert again == made

    # A linked clone: a layer in a new image over the template's volume; its own seed.
    linked = await clone(client, source, linked=True, cloud_init={
        "user_data": "#cloud-config\npackages: []\n"})
    [layer] = linked["disks"]  # type: ignore[misc]
    info = await volume_info(client, **{k: layer[k] for k in ("sd_id", "image_id",
                                                                "volume_id")})
    assert (info["parent"], info["role"]) == (disk["volume_id"], "leaf")
    defined = (await client.call("VM.getXML", {"vm_id": linked["vm_id"],
                                               "inactive": True}))["xml"]
    base = await volume_info(client, **disk)
    sources = [s.get("file") for s in etree.fromstring(defined).iter("source")
               if s.get("file")]
    assert sources[:2] == [info["path"], base["path"]]
    seed = etree.fromstring(defined).find("devices/disk[@device='cdrom']/source").get("file")
    meta = await asyncio.to_thread(meta_data_of, seed)
    assert (meta["instance-id"], meta["local-hostname"]) == (linked["vm_id"], linked["name"])
    await boots_with(clone_agent, client, str(linked["vm_id"]), ["marker"], "linked")
    assert await files_in(Path(base["path"]), tmp_path) == ["marker"], "the template holds"
    assert await files_in(Path(info["path"]), tmp_path) == ["linked", "marker"]
    vms = {vm["vm_id"] for vm in (await client.call("VM.list", {}))["vms"]}
    assert {source, full["vm_id"], linked["vm_id"]} <= vms
    volumes = {v["image_id"] for v in (await client.call(
        "Volume.list", {"sd_id": sd_id, "content": "disk"}))["volumes"]}
    assert volumes == {disk["image_id"], copied["image_id"], layer["image_id"]}
    await client.call("VM.undefine", {"vm_id": linked["vm_id"]})
    isos = (await client.call("Volume.list", {"sd_id": sd_id, "content": "iso"}))["volumes"]
    assert isos == [], "the clone's seed goes with it"


def meta_data_of(iso_path: str) -> dict[str, str]:
    iso = pycdlib.PyCdlib()
    iso.open(iso_path)
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/meta-data")
    finally:
        iso.close()
    data: dict[str, str] = yaml.safe_load(out.getvalue())
    return data

"""A real KVM guest whose disk is a qcow2 clone of a template volume on a storage domain."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from lxml import etree

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, qemu_pid, vm_name
from tests.integration.test_vm_lifecycle import firmware_spec
from tests.integration.test_volumes import new_domain
from tests.subproc import run

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

MiB = 1024 * 1024


def real_paths(paths: list[str]) -> list[str]:
    return [os.path.realpath(p) for p in paths]


async def test_a_guest_runs_on_a_clone_of_a_template(qemu_agent: AgentProcess,
                                                     checked_client: ClientFactory,
                                                     image_dir: Path) -> None:
    client = await checked_client(qemu_agent.unix_url)
    sd_id = await new_domain(client, image_dir / "sd", name="vm-disks")
    template = (await client.call("Volume.create", {"sd_id": sd_id, "size": 64 * MiB,
                                                    "format": "qcow2", "shared": True}))["volume"]
    clone = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": template["image_id"], "volume_id": template["volume_id"]}}))["volume"]
    ref = {k: clone[k] for k in ("sd_id", "image_id", "volume_id")}

    name = vm_name()
    spec = firmware_spec(name, disks=[{"volume": ref}])
    vm_id = (await client.call("VM.create", {"spec": spec}))["vm_id"]
    info = await client.call("VM.getInfo", {"vm_id": vm_id})
    assert info["state"] == "running"

    # libvirt has the whole chain: the clone, then the template, each with its format.
    xml = etree.fromstring((await client.call("VM.getXML", {"vm_id": vm_id}))["xml"].encode())
    disk = xml.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == clone["path"]  # type: ignore[union-attr]
    backing = disk.find("backingStore")
    assert backing is not None
    assert backing.find("source").get("file") == template["path"]  # type: ignore[union-attr]
    assert backing.find("format").get("type") == "qcow2"  # type: ignore[union-attr]
    # On disk the clone names the template (relative, so the domain can be mounted anywhere).
    out = (await run("qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f",
                     "qcow2", clone["path"])).check()
    chain = await asyncio.to_thread(real_paths, [i["filename"] for i in json.loads(out)])
    assert chain == await asyncio.to_thread(real_paths, [clone["path"], template["path"]])

    # What the guest uses cannot go away under it.
    err = await expect_error(client, "Volume.delete", ref)
    assert (err.name, err.data["reason"]) == ("FailedPrecondition", "in_use")
    tref = {k: template[k] for k in ("sd_id", "image_id", "volume_id")}
    err = await expect_error(client, "Volume.delete", tref)
    assert err.data["reason"] in ("has_children", "in_use")

    await client.call("VM.destroy", {"vm_id": vm_id})
    await client.call("VM.undefine", {"vm_id": vm_id})
    await client.call("Volume.delete", ref)
    await client.call("Volume.delete", tref)


def open_files(pid: int) -> list[str]:
    """The files process ``pid`` has open."""
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fds / fd) for fd in os.listdir(fds)]


async def test_qemu_opens_no_backing_file_a_header_names(qemu_agent: AgentProcess,
                                                         checked_client: ClientFactory,
                                                         image_dir: Path) -> None:
    """A volume without parent is given to libvirt with its chain ended: a header written
    after the agent checked it (by another host, or in a race) still opens nothing."""
    client = await checked_client(qemu_agent.unix_url)
    sd_id = await new_domain(client, image_dir / "sd", name="vm-disks")
    volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": 16 * MiB,
                                                  "format": "qcow2"}))["volume"]
    ref = {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}
    outside = image_dir / "outside.raw"
    await asyncio.to_thread(outside.write_bytes, b"outside" * 4096)
    await asyncio.to_thread(os.chmod, outside, 0o644)
    name = vm_name()
    vm_id = (await client.call("VM.create", {"spec": firmware_spec(name, disks=[{"volume": ref}]),
                                             "start": False}))["vm_id"]
    (await run("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", str(outside), "-F", "raw",
               volume["path"])).check()

    await client.call("VM.start", {"vm_id": vm_id})
    opened = await asyncio.to_thread(open_files, await qemu_pid(name))
    assert volume["path"] in opened
    assert str(outside) not in opened
    xml = etree.fromstring((await client.call("VM.getXML", {"vm_id": vm_id}))["xml"].encode())
    assert xml.findall("devices/disk/backingStore/source") == []

    await client.call("VM.destroy", {"vm_id": vm_id})
    await client.call("VM.undefine", {"vm_id": vm_id})
    # The header now lies: the volume is refused from here on.
    err = await expect_error(client, "VM.create", {"spec": firmware_spec(
        vm_name(), disks=[{"volume": ref}])}, "FailedPrecondition", "backing_mismatch")
    assert err.data["id"] == volume["volume_id"]


async def test_no_layer_over_a_volume_a_running_guest_writes(qemu_agent: AgentProcess,
                                                             checked_client: ClientFactory,
                                                             image_dir: Path) -> None:
    """The guest would go on writing the parent: the new layer would not be point-in-time."""
    client = await checked_client(qemu_agent.unix_url)
    sd_id = await new_domain(client, image_dir / "sd", name="vm-disks")
    volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": 16 * MiB,
                                                  "format": "qcow2"}))["volume"]
    ref = {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}
    name = vm_name()
    vm_id = (await client.call("VM.create", {"spec": firmware_spec(
        name, disks=[{"volume": ref}])}))["vm_id"]

    err = await expect_error(client, "Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": volume["image_id"], "volume_id": volume["volume_id"]}},
        "FailedPrecondition", "in_use")
    assert err.data["vms"] == [name]
    listed = await client.call("Volume.list", {"sd_id": sd_id, "image_id": volume["image_id"]})
    assert [v["volume_id"] for v in listed["volumes"]] == [volume["volume_id"]]

    await client.call("VM.destroy", {"vm_id": vm_id})
    await client.call("VM.undefine", {"vm_id": vm_id})


async def test_a_vm_writes_no_volume_that_a_layer_was_made_over(qemu_agent: AgentProcess,
                                                                checked_client: ClientFactory,
                                                                image_dir: Path) -> None:
    """A layer made while the VM was off turns its disk internal: starting the VM then
    would change the layer's backing under it. Creating with start and hotplugging the
    volume's file by path are refused the same way."""
    client = await checked_client(qemu_agent.unix_url)
    sd_id = await new_domain(client, image_dir / "sd", name="vm-disks")
    volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": 16 * MiB,
                                                  "format": "qcow2"}))["volume"]
    ref = {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}
    name = vm_name()
    vm_id = (await client.call("VM.create", {"spec": firmware_spec(
        name, disks=[{"volume": ref}]), "start": False}))["vm_id"]
    await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": volume["image_id"], "volume_id": volume["volume_id"]}})

    err = await expect_error(client, "VM.start", {"vm_id": vm_id},
                             "FailedPrecondition", "not_leaf")
    assert err.data["id"] == volume["volume_id"]
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] in ("defined",
                                                                           "shutoff")
    by_path = {"path": volume["path"], "format": "qcow2"}
    other = vm_name()
    await expect_error(client, "VM.create", {"spec": firmware_spec(other, disks=[by_path])},
                       "FailedPrecondition", "not_leaf")
    assert other not in {vm["name"] for vm in (await client.call("VM.list"))["vms"]}
    running = (await client.call("VM.create", {"spec": firmware_spec(vm_name())}))["vm_id"]
    await expect_error(client, "VM.hotplugDisk", {"vm_id": running, "disk": by_path},
                       "FailedPrecondition", "not_leaf")
    assert (await client.call("VM.getInfo", {"vm_id": running}))["devices"]["disks"] == []
    await client.call("VM.destroy", {"vm_id": running})
    await client.call("VM.undefine", {"vm_id": vm_id})

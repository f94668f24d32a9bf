"""VM snapshots of real guests over virtnode's volume chains: a running guest frozen
through its guest agent while its disk switches to a new layer, the snapshot's volume
holding exactly what was written before it, a stopped VM's definition moved to the
layer, and what is refused before anything is made."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests import guests
from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import expect_error, vm_name, wait_job
from tests.integration.serialshell import serial_shell
from tests.subproc import run
from virtnode.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

MiB = 1024 * 1024


@pytest.fixture
async def snap_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    yield agent
    await agent.stop()


async def domain_and_disk(client: Client, image_dir: Path) -> tuple[str, dict[str, str]]:
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "snaps", "path": str(image_dir / "sd")}))["domain"]["sd_id"]
    volume = (await client.call("Volume.create", {
        "sd_id": sd_id, "size": 64 * MiB, "format": "qcow2",
        "description": "data disk"}))["volume"]
    return sd_id, {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}


async def agent_vm(client: Client, disk: dict[str, str], *, start: bool = True,
                   **spec: Any) -> str:
    image = await guests.guest_image("agent")
    created = await client.call("VM.create", {"spec": {
        "name": vm_name(), "domain_type": "qemu", "memory_mib": 256,
        "kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": "console=ttyS0",
        "disks": [{"volume": disk}], **spec}, "start": start})
    return str(created["vm_id"])


async def snapshot(client: Client, vm_id: str, **params: Any) -> dict[str, Any]:
    started = await client.call("VM.snapshot", {"vm_id": vm_id, **params})
    return await wait_job(client, started["job_id"])


def chain_of(xml: str, target: str = "vda") -> list[str]:
    """The disk's source and backing files, leaf first, as the XML spells them."""
    disk = next(d for d in etree.fromstring(xml).iterfind("devices/disk")
                if d.find("target").get("dev") == target)
    return [s.get("file") for s in disk.iter("source")]


async def files_in(image: Path, tmp: Path) -> list[str]:
    """The names in the root directory of the ext2 filesystem the qcow2 chain holds."""
    raw = tmp / f"{image.name}.raw"
    (await run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw)).check()
    listing = (await run("debugfs", "-R", "ls -p /", raw)).check()
    raw.unlink()
    return sorted(line.split("/")[5] for line in listing.splitlines()
                  if line.count("/") >= 6 and line.split("/")[5] not in (".", "..",
                                                                         "lost+found"))


async def one_two_three(agent: AgentProcess, client: Client, image_dir: Path
                        ) -> tuple[str, dict[str, str], str, dict[str, Any], dict[str, Any]]:
    """A running guest on a volume that wrote file one, was snapshot ("one"), wrote two,
    was snapshot ("two") and wrote three: the domain, the disk's first volume, the VM and
    the two snapshots' job results."""
    sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk)
    async with serial_shell(agent, client, vm_id) as shell:
        assert (await shell.run("datadisk && echo 1 > /data/one && sync"))[0] == 0
        first = (await snapshot(client, vm_id, name="one", quiesce="off"))["result"]
        assert (await shell.run("echo 2 > /data/two && sync"))[0] == 0
        second = (await snapshot(client, vm_id, name="two", quiesce="off"))["result"]
        assert (await shell.run("echo 3 > /data/three && sync"))[0] == 0
    return sd_id, disk, vm_id, first, second


async def volume_info(client: Client, sd_id: str, image_id: str, volume_id: str
                      ) -> dict[str, Any]:
    info: dict[str, Any] = (await client.call("Volume.getInfo", {
        "sd_id": sd_id, "image_id": image_id, "volume_id": volume_id}))["volume"]
    return info


async def test_a_running_guest_is_frozen_and_its_snapshot_holds_what_came_before(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk)
    base = await volume_info(client, **disk)
    async with serial_shell(snap_agent, client, vm_id) as shell:
        for _ in range(120):
            if (await client.call("VM.getInfo", {"vm_id": vm_id}))["guest"]["agent"] == \
                    "connected":
                break
            await asyncio.sleep(0.5)
        status, out = await shell.run("datadisk && echo one > /data/one && sync")
        assert status == 0, out

        job = await snapshot(client, vm_id, name="s1", description="after one",
                             quiesce="required")
        assert job["state"] == "succeeded", job
        snap = job["result"]["snapshot"]
        assert (snap["name"], snap["vm_state"], snap["quiesced"], snap["parent"]) == (
            "s1", "running", True, None)
        [snapped] = snap["disks"]
        assert (snapped["target"], snapped["volume_id"]) == ("vda", disk["volume_id"])
        layer = await volume_info(client, sd_id, disk["image_id"], snapped["layer"])

        status, out = await shell.run("echo two > /data/two && sync")
        assert status == 0, out

    # The VM writes the layer; the volume below is internal and holds the disk as it was.
    live = (await client.call("VM.getXML", {"vm_id": vm_id}))["xml"]
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(live)[:2] == chain_of(defined) == [layer["path"], base["path"]]
    assert (layer["role"], layer["legality"], layer["format"]) == ("leaf", "legal", "qcow2")
    assert (await volume_info(client, **disk))["role"] == "internal"
    assert await files_in(Path(base["path"]), tmp_path) == ["one"]
    assert await files_in(Path(layer["path"]), tmp_path) == ["one", "two"]
    got = await client.call("Events.get", {"since": 0, "topics": ["vm.guest"], "limit": 500})
    kinds = [(e["data"]["event"], e["data"].get("reason"))
             for e in got["events"] if e["data"]["vm_id"] == vm_id]
    assert ("frozen", None) in kinds and ("thawed", "snapshot") in kinds, kinds

    job = await snapshot(client, vm_id, name="s2", quiesce="off")
    assert job["state"] == "succeeded", job
    second = job["result"]["snapshot"]
    assert (second["parent"], second["quiesced"]) == (snap["snapshot_id"], False)
    listed = await client.call("VM.listSnapshots", {"vm_id": vm_id})
    assert listed["current"] == second["snapshot_id"]
    assert [s["name"] for s in listed["snapshots"]] == ["s1", "s2"]
    assert listed["snapshots"][0] == snap
    got = await client.call("VM.getSnapshot", {"vm_id": vm_id,
                                                "snapshot_id": snap["snapshot_id"]})
    assert got == {"snapshot": snap, "current": False}
    job = await snapshot(client, vm_id, name="s1")
    assert (job["state"], job["error"]["data"]["name"]) == ("failed", "AlreadyExists")


async def test_a_stopped_vm_moves_to_the_layer_and_boots_from_it(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk, start=False)
    base = await volume_info(client, **disk)
    job = await snapshot(client, vm_id, name="cold")
    assert job["state"] == "succeeded", job
    snap = job["result"]["snapshot"]
    assert (snap["vm_state"], snap["quiesced"]) == ("shutoff", False)
    layer = await volume_info(client, sd_id, disk["image_id"], snap["disks"][0]["layer"])
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(defined) == [layer["path"], base["path"]]
    await client.call("VM.start", {"vm_id": vm_id})
    live = (await client.call("VM.getXML", {"vm_id": vm_id}))["xml"]
    assert chain_of(live)[:2] == [layer["path"], base["path"]]
    async with serial_shell(snap_agent, client, vm_id) as shell:
        status, out = await shell.run("datadisk && echo after > /data/after && sync")
        assert status == 0, out


async def test_what_cannot_be_snapshot_leaves_nothing_behind(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk, guest_agent=False)
    job = await snapshot(client, vm_id, name="strict", quiesce="required")
    assert (job["state"], job["error"]["data"]["reason"]) == (
        "failed", "guest_agent_unavailable")
    volumes = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert [v["volume_id"] for v in volumes] == [disk["volume_id"]]
    assert (await client.call("VM.listSnapshots", {"vm_id": vm_id}))["snapshots"] == []
    # A volume a running VM writes takes no layer except through VM.snapshot.
    await expect_error(client, "Volume.create", {
        "sd_id": sd_id, "format": "qcow2",
        "parent": {k: disk[k] for k in ("image_id", "volume_id")}},
        "FailedPrecondition", "in_use")


async def test_a_revert_brings_the_disks_back_and_drops_what_no_snapshot_holds(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk, vm_id, first, second = await one_two_three(snap_agent, client, image_dir)
    await client.call("VM.destroy", {"vm_id": vm_id})
    since_two = second["snapshot"]["disks"][0]["layer"]  # what the VM wrote after "two"

    await expect_error(client, "VM.revertSnapshot", {"vm_id": vm_id, "snapshot_id": "0" * 8
                                                     + "-0000-4000-8000-000000000000"},
                       "NotFound", "not_found")
    reverted = await client.call("VM.revertSnapshot", {
        "vm_id": vm_id, "snapshot_id": first["snapshot_id"]})
    [now] = reverted["disks"]
    layer = await volume_info(client, sd_id, now["image_id"], now["volume_id"])
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    base = await volume_info(client, **disk)
    assert chain_of(defined) == [layer["path"], base["path"]]
    assert await files_in(Path(layer["path"]), tmp_path) == ["one"]
    volumes = {v["volume_id"] for v in (await client.call("Volume.list",
                                                           {"sd_id": sd_id}))["volumes"]}
    assert since_two not in volumes, "what no snapshot holds is removed"
    assert first["snapshot"]["disks"][0]["layer"] in volumes  # held by snapshot "two"
    listed = await client.call("VM.listSnapshots", {"vm_id": vm_id})
    assert listed["current"] == first["snapshot_id"]
    [reverted] = [s for s in listed["snapshots"] if s["snapshot_id"] == first["snapshot_id"]]
    assert reverted["disks"][0]["layer"] == now["volume_id"], "what follows it is the new layer"

    # Forward again, to the later snapshot: the branch made by the first revert goes.
    again = await client.call("VM.revertSnapshot", {
        "vm_id": vm_id, "snapshot_id": second["snapshot_id"]})
    after = await volume_info(client, sd_id, disk["image_id"],
                              again["disks"][0]["volume_id"])
    assert await files_in(Path(after["path"]), tmp_path) == ["one", "two"]
    volumes = {v["volume_id"] for v in (await client.call("Volume.list",
                                                           {"sd_id": sd_id}))["volumes"]}
    assert now["volume_id"] not in volumes
    await client.call("VM.start", {"vm_id": vm_id})
    async with serial_shell(snap_agent, client, vm_id) as shell:
        status, out = await shell.run("dmesg -n 1 && datadisk && ls /data")
        assert status == 0, out
        assert sorted(out.split()) == ["lost+found", "one", "two"]
        await expect_error(client, "VM.revertSnapshot", {
            "vm_id": vm_id, "snapshot_id": first["snapshot_id"]},
            "FailedPrecondition", "vm_running")


async def test_deleting_snapshots_folds_their_layers_down(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk, vm_id, first, second = await one_two_three(snap_agent, client, image_dir)
    await client.call("VM.destroy", {"vm_id": vm_id})
    base = await volume_info(client, **disk)
    middle = first["snapshot"]["disks"][0]["layer"]  # what "two" holds
    top = second["snapshot"]["disks"][0]["layer"]  # what the VM wrote last

    job = await client.call("VM.deleteSnapshot", {"vm_id": vm_id,
                                                  "snapshot_id": first["snapshot_id"]})
    assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
    volumes = {v["volume_id"]: v for v in (await client.call(
        "Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert set(volumes) == {disk["volume_id"], top}
    assert volumes[disk["volume_id"]]["legality"] == "legal"
    leaf = volumes[top]
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(defined) == [leaf["path"], base["path"]]
    assert await files_in(Path(base["path"]), tmp_path) == ["one", "two"]
    assert await files_in(Path(leaf["path"]), tmp_path) == ["one", "three", "two"]
    listed = await client.call("VM.listSnapshots", {"vm_id": vm_id})
    [kept] = listed["snapshots"]
    assert (kept["name"], kept["parent"], listed["current"]) == (
        "two", None, second["snapshot_id"])
    assert kept["disks"][0]["volume_id"] == disk["volume_id"], "it names the folded volume"
    assert middle not in volumes

    # The last one, the current: the VM's own layer goes down into the base.
    job = await client.call("VM.deleteSnapshot", {"vm_id": vm_id,
                                                  "snapshot_id": second["snapshot_id"]})
    assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
    volumes = {v["volume_id"]: v for v in (await client.call(
        "Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert list(volumes) == [disk["volume_id"]]
    assert volumes[disk["volume_id"]]["role"] == "leaf"
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(defined) == [base["path"]]
    assert await client.call("VM.listSnapshots", {"vm_id": vm_id}) == {
        "current": None, "snapshots": []}
    await client.call("VM.start", {"vm_id": vm_id})
    async with serial_shell(snap_agent, client, vm_id) as shell:
        status, out = await shell.run("dmesg -n 1 && datadisk && ls /data")
        assert status == 0, out
        assert sorted(out.split()) == ["lost+found", "one", "three", "two"]


async def raw_copy(leaf: str, tmp: Path) -> Path:
    """The disk a chain ending in ``leaf`` shows, copied to a raw file."""
    copy = tmp / "copy.raw"
    (await run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", leaf, copy)).check()
    return copy


async def same_disk(leaf: str, copy: Path) -> bool:
    """Whether the chain ending in ``leaf`` shows the disk ``copy`` holds (qemu-img)."""
    compared = await run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", leaf, copy)
    assert compared.status in (0, 1), compared.err
    return compared.status == 0


async def live_xml(client: Client, vm_id: str) -> str:
    return str((await client.call("VM.getXML", {"vm_id": vm_id}))["xml"])


async def test_a_running_vm_merges_its_snapshots_live(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk, vm_id, first, second = await one_two_three(snap_agent, client, image_dir)
    base = await volume_info(client, **disk)
    top = await volume_info(client, sd_id, disk["image_id"],
                            second["snapshot"]["disks"][0]["layer"])
    middle = first["snapshot"]["disks"][0]["layer"]
    copy = await raw_copy(top["path"], tmp_path)  # the guest is idle since its sync

    # The middle one: a block commit below the layer the VM writes.
    job = await client.call("VM.deleteSnapshot", {"vm_id": vm_id,
                                                  "snapshot_id": first["snapshot_id"]})
    done = await wait_job(client, job["job_id"])
    assert (done["state"], done["progress"]) == ("succeeded", 100), done
    assert chain_of(await live_xml(client, vm_id)) == [top["path"], base["path"]]
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(defined) == [top["path"], base["path"]]
    volumes = {v["volume_id"]: v for v in (await client.call(
        "Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert set(volumes) == {disk["volume_id"], top["volume_id"]}
    assert middle not in volumes
    assert (volumes[disk["volume_id"]]["legality"], volumes[disk["volume_id"]]["role"]) == (
        "legal", "internal")
    header = (await run("qemu-img", "info", "-U", "--output=json", top["path"])).check()
    assert f'"backing-filename": "{disk["volume_id"]}"' in header, "kept relative"
    assert await same_disk(top["path"], copy)
    assert await files_in(Path(base["path"]), tmp_path) == ["one", "two"]

    # The current one: an active commit of what the VM writes, and a pivot to the base.
    job = await client.call("VM.deleteSnapshot", {"vm_id": vm_id,
                                                  "snapshot_id": second["snapshot_id"]})
    assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
    assert chain_of(await live_xml(client, vm_id)) == [base["path"]]
    defined = (await client.call("VM.getXML", {"vm_id": vm_id, "inactive": True}))["xml"]
    assert chain_of(defined) == [base["path"]]
    volumes = {v["volume_id"]: v for v in (await client.call(
        "Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert list(volumes) == [disk["volume_id"]]
    assert (volumes[disk["volume_id"]]["legality"], volumes[disk["volume_id"]]["role"]) == (
        "legal", "leaf")
    assert await same_disk(base["path"], copy)
    assert await client.call("VM.listSnapshots", {"vm_id": vm_id}) == {
        "current": None, "snapshots": []}
    async with serial_shell(snap_agent, client, vm_id) as shell:
        status, out = await shell.run("echo 4 > /data/four && sync && ls /data")
        assert status == 0, out
        assert sorted(out.split()) == ["four", "lost+found", "one", "three", "two"]
    await client.call("VM.destroy", {"vm_id": vm_id})
    assert await files_in(Path(base["path"]), tmp_path) == ["four", "one", "three", "two"]


SLOW_MERGE = {"storage": {"merge_bandwidth": 1}}  # MiB/s: 12 MiB take 12 s


async def merging(client: Client, vm_id: str, snapshot_id: str) -> str:
    """Start deleting the snapshot; its job's id once the merge has made progress."""
    job_id = str((await client.call("VM.deleteSnapshot", {
        "vm_id": vm_id, "snapshot_id": snapshot_id}))["job_id"])
    for _ in range(200):
        job = (await client.call("Job.get", {"job_id": job_id}))["job"]
        assert job["state"] in ("pending", "running"), job
        if job["progress"] > 0:
            return job_id
        await asyncio.sleep(0.1)
    raise AssertionError("the merge made no progress in 20 s")


async def test_a_merge_cancelled_or_cut_by_a_crash_is_finished_later(
        checked_client: ClientFactory, image_dir: Path, tmp_path: Path) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=SLOW_MERGE)
    try:
        client = await checked_client(agent.unix_url)
        sd_id, disk = await domain_and_disk(client, image_dir)
        vm_id = await agent_vm(client, disk)
        async with serial_shell(agent, client, vm_id) as shell:
            assert (await shell.run("datadisk && echo 1 > /data/one && sync"))[0] == 0
            snap = (await snapshot(client, vm_id, name="one", quiesce="off"))["result"]
            status, out = await shell.run(
                "dd if=/dev/urandom of=/data/big bs=1M count=12 2>/dev/null && sync "
                "&& md5sum /data/big && sync", timeout=60)
            assert status == 0, out
            digest = out.split()[0]
        base = await volume_info(client, **disk)
        top = await volume_info(client, sd_id, disk["image_id"],
                                snap["snapshot"]["disks"][0]["layer"])
        copy = await raw_copy(top["path"], tmp_path)

        # Cancelled: QEMU's job ends, the VM writes its layer still, the snapshot stays
        # with its volume illegal (part merged) until it is deleted again.
        job_id = await merging(client, vm_id, snap["snapshot_id"])
        await client.call("Job.cancel", {"job_id": job_id})
        assert (await wait_job(client, job_id))["state"] == "cancelled"
        assert chain_of(await live_xml(client, vm_id)) == [top["path"], base["path"]]
        assert (await volume_info(client, **disk))["legality"] == "illegal"
        listed = await client.call("VM.listSnapshots", {"vm_id": vm_id})
        assert [s["snapshot_id"] for s in listed["snapshots"]] == [snap["snapshot_id"]]
        assert await same_disk(top["path"], copy)

        # Cut by a crash: QEMU goes on; the next agent waits for it and pivots.
        await merging(client, vm_id, snap["snapshot_id"])
    finally:
        await agent.stop(signal.SIGKILL)
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=SLOW_MERGE)
    try:
        client = await checked_client(agent.unix_url)
        for _ in range(300):
            listed = await client.call("VM.listSnapshots", {"vm_id": vm_id})
            if not listed["snapshots"]:
                break
            await asyncio.sleep(0.1)
        assert listed == {"current": None, "snapshots": []}
        assert chain_of(await live_xml(client, vm_id)) == [base["path"]]
        volumes = {v["volume_id"]: v for v in (await client.call(
            "Volume.list", {"sd_id": sd_id}))["volumes"]}
        assert list(volumes) == [disk["volume_id"]]
        assert (volumes[disk["volume_id"]]["legality"],
                volumes[disk["volume_id"]]["role"]) == ("legal", "leaf")
        assert await same_disk(base["path"], copy)
        async with serial_shell(agent, client, vm_id, booted=True) as shell:
            status, out = await shell.run("md5sum /data/big")
            assert (status, out.split()[0]) == (0, digest)
    finally:
        await agent.stop()


async def test_a_snapshot_with_memory_brings_the_guest_back_running_where_it_was(
        snap_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(snap_agent.unix_url)
    sd_id, disk = await domain_and_disk(client, image_dir)
    vm_id = await agent_vm(client, disk)
    count = "cat /tmp/count"
    async with serial_shell(snap_agent, client, vm_id) as shell:
        status, out = await shell.run("datadisk && echo 1 > /data/one && sync && mkdir -p /tmp")
        assert status == 0, out
        # Counting in the guest's memory (its root is an initramfs).
        await shell.run("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; "
                        "done) > /dev/null 2>&1 & true")
        await asyncio.sleep(1)
        before = int((await shell.run(count))[1])
        snap = (await snapshot(client, vm_id, name="warm", memory=True))["result"]
        after = int((await shell.run(count))[1])
        assert (await shell.run("echo 2 > /data/two && sync"))[0] == 0
        await asyncio.sleep(3)
        last = int((await shell.run(count))[1])
    taken = snap["snapshot"]
    assert (taken["memory"], taken["quiesced"], taken["vm_state"]) == (True, False, "running")
    memory = await volume_info(client, **taken["memory_volume"])
    assert (memory["content"], memory["legality"], memory["format"]) == (
        "memory", "legal", "raw")
    assert 0 < memory["virtual_size"] < 256 * MiB + 64 * MiB

    await client.call("VM.destroy", {"vm_id": vm_id})
    await client.call("VM.revertSnapshot", {"vm_id": vm_id,
                                            "snapshot_id": snap["snapshot_id"]})
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
    async with serial_shell(snap_agent, client, vm_id, booted=True) as shell:
        status, out = await shell.run(count)
        assert status == 0, out
        assert before <= int(out) < last, (before, after, int(out), last)
        status, out = await shell.run("ls /data")
        assert sorted(out.split()) == ["lost+found", "one"]

    # Deleting it merges its layer live and removes the memory.
    job = await client.call("VM.deleteSnapshot", {"vm_id": vm_id,
                                                  "snapshot_id": snap["snapshot_id"]})
    assert (await wait_job(client, job["job_id"]))["state"] == "succeeded"
    volumes = {v["volume_id"] for v in (await client.call(
        "Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert volumes == {disk["volume_id"]}

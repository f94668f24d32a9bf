"""VM snapshots on the test driver, without storage domains: what is refused before
anything is made, and the tree as the VM's definition records it. Snapshots of volumes,
on stopped and running VMs, are in tests/integration/test_vm_snapshots.py."""

from __future__ import annotations

import pytest

from tests.unit.vm.harness import InProcessAgent
from virtnode.vm.snapshots import Snapshot, SnapshotDisk, read_tree, volume_of

UNKNOWN = "00000000-0000-4000-8000-00000000abcd"
SD = "00000000-0000-4000-8000-0000000000a1"
IMAGE = "00000000-0000-4000-8000-0000000000b1"
VOLUME = "00000000-0000-4000-8000-0000000000c1"


async def failed_job(api: InProcessAgent, params: dict[str, object]) -> dict[str, object]:
    started = await api.call("VM.snapshot", params)
    job: dict[str, object] = (await api.call("Job.wait", {"job_id": started["job_id"],
                                                          "timeout": 30}))["job"]
    assert job["state"] == "failed", job
    return job


@pytest.mark.covers("VM.snapshot", "VM.listSnapshots", "VM.getSnapshot")
async def test_a_snapshot_is_refused_before_anything_is_made(
        api: InProcessAgent, tmp_path: object) -> None:
    image = api.images / "disk.qcow2"
    image.write_bytes(b"")
    vm_id = await api.create("snappy", disks=[{"path": str(image), "format": "qcow2"}])
    await api.error("VM.snapshot", {"vm_id": vm_id, "name": "bad name"}, "InvalidArgument",
                    "invalid_spec")
    await api.error("VM.snapshot", {"vm_id": vm_id, "name": "m", "memory": True,
                                    "quiesce": "required"},
                    "InvalidArgument", "quiesce_with_memory")
    await api.error("VM.snapshot", {"vm_id": vm_id, "name": "q", "quiesce": "maybe"},
                    "InvalidParams")
    await api.error("VM.snapshot", {"vm_id": UNKNOWN, "name": "s"}, "NotFound", "not_found")
    # A disk given by path is no volume: nothing to layer.
    job = await failed_job(api, {"vm_id": vm_id, "name": "s1"})
    assert job["error"]["data"]["reason"] == "not_a_volume"  # type: ignore[index]
    # Memory is saved from a running VM only.
    stopped = await api.create("stopped", start=False)
    job = await failed_job(api, {"vm_id": stopped, "name": "m", "memory": True})
    assert job["error"]["data"]["reason"] == "vm_not_running"  # type: ignore[index]
    job = await failed_job(api, {"vm_id": vm_id, "name": "s1", "disks": ["vdz"]})
    assert job["error"]["data"]["reason"] == "no_such_disk"  # type: ignore[index]
    transient = await api.create("fleeting", persistent=False)
    job = await failed_job(api, {"vm_id": transient, "name": "s1"})
    assert job["error"]["data"]["reason"] == "not_persistent"  # type: ignore[index]
    await api.call("VM.pause", {"vm_id": vm_id})
    job = await failed_job(api, {"vm_id": vm_id, "name": "s1"})
    assert job["error"]["data"]["reason"] == "invalid_state"  # type: ignore[index]

    assert await api.call("VM.listSnapshots", {"vm_id": vm_id}) == {
        "current": None, "snapshots": []}
    await api.error("VM.getSnapshot", {"vm_id": vm_id, "snapshot_id": UNKNOWN}, "NotFound",
                    "not_found")
    await api.error("VM.listSnapshots", {"vm_id": UNKNOWN}, "NotFound", "not_found")


@pytest.mark.covers("VM.revertSnapshot", "VM.deleteSnapshot")
async def test_a_revert_or_delete_needs_a_snapshot_of_the_vm(api: InProcessAgent) -> None:
    vm_id = await api.create("reverting")
    await api.error("VM.deleteSnapshot", {"vm_id": vm_id, "snapshot_id": UNKNOWN},
                    "NotFound", "not_found")
    await api.error("VM.deleteSnapshot", {"vm_id": UNKNOWN, "snapshot_id": UNKNOWN},
                    "NotFound", "not_found")
    await api.error("VM.revertSnapshot", {"vm_id": vm_id, "snapshot_id": UNKNOWN},
                    "NotFound", "not_found")
    await api.error("VM.revertSnapshot", {"vm_id": UNKNOWN, "snapshot_id": UNKNOWN},
                    "NotFound", "not_found")
    await api.error("VM.revertSnapshot", {"vm_id": vm_id, "snapshot_id": "no"},
                    "InvalidParams")


def test_the_tree_is_read_back_from_the_definition() -> None:
    xml = f"""<domain><metadata>
      <s:snapshots xmlns:s="https://virtnode.dev/xmlns/snapshots/1" current="{VOLUME}">
        <s:snapshot id="{VOLUME}" name="first" created="1765000000.5" vm_state="running"
                    quiesced="yes" memory="no">
          <s:description>before the upgrade</s:description>
          <s:disk target="vda" sd_id="{SD}" image_id="{IMAGE}" volume_id="{VOLUME}"
                  layer="{IMAGE}"/>
        </s:snapshot>
        <s:snapshot id="{IMAGE}" name="second" created="1765000001" vm_state="running"
                    quiesced="no" memory="yes" parent="{VOLUME}">
          <s:disk target="vda" sd_id="{SD}" image_id="{IMAGE}" volume_id="{IMAGE}"
                  layer="{VOLUME}"/>
          <s:memory sd_id="{SD}" image_id="{VOLUME}" volume_id="{IMAGE}"/>
        </s:snapshot>
        <s:snapshot id="x" name="damaged" created="yesterday"/>
      </s:snapshots></metadata></domain>"""
    current, tree = read_tree(xml)
    assert current == VOLUME
    assert tree == [Snapshot(VOLUME, "first", "before the upgrade", 1765000000.5, None,
                             "running", True, False,
                             [SnapshotDisk("vda", SD, IMAGE, VOLUME, IMAGE)]),
                    Snapshot(IMAGE, "second", "", 1765000001.0, VOLUME, "running", False, True,
                             [SnapshotDisk("vda", SD, IMAGE, IMAGE, VOLUME)],
                             {"sd_id": SD, "image_id": VOLUME, "volume_id": IMAGE})]
    assert read_tree("<domain/>") == (None, [])


def test_a_disk_is_a_volume_only_directly_under_an_image_of_a_domain() -> None:
    dirs = {SD: "/srv/sd/images"}
    assert volume_of(f"/srv/sd/images/{IMAGE}/{VOLUME}", dirs) == (SD, IMAGE, VOLUME)
    assert volume_of(f"/srv/sd/images/{VOLUME}", dirs) is None
    assert volume_of(f"/srv/other/{IMAGE}/{VOLUME}", dirs) is None
    assert volume_of(f"/srv/sd/images/{IMAGE}/x/{VOLUME}", dirs) is None
    assert volume_of("", dirs) is None

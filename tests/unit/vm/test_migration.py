"""VM.migrate's checks before anything moves, in process on the test driver.

What only two hosts show (a VM moving, progress, cancel, the destination's own checks
against its bridges and storage) is in tests/integration/test_migration.py, in the lab.
Here: what the source refuses, and that a refusal leaves the VM as it was with no job.
"""

from __future__ import annotations

import pytest

from tests.unit.vm.harness import HOST_ID, InProcessAgent, loopback
from virtnode.util.safexml import parse_xml
from virtnode.vm import migrationstore
from virtnode.vm.migration import _cpu_of, _with_disks

DESTINATION = "tls://10.77.0.12:8765"


async def _no_job_and_still_running(api: InProcessAgent, vm_id: str) -> None:
    assert await api.state(vm_id) == "running"
    jobs = (await api.call("Job.list", {"kind": "VM.migrate"}))["jobs"]
    assert jobs == []


@pytest.mark.covers("VM.migrate")
async def test_a_stopped_vm_is_not_migrated_live(api: InProcessAgent) -> None:
    vm_id = await api.create(start=False)
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION},
                    "FailedPrecondition", "vm_not_running")
    await api.error("VM.migrate", {"vm_id": "8f1f1c55-2222-4b3e-9d7a-000000000000",
                                   "destination": DESTINATION}, "NotFound", "not_found")


@pytest.mark.covers("VM.migrate")
async def test_an_agent_without_its_own_certificate_reaches_no_destination(
        api: InProcessAgent) -> None:
    # The daemon's own connector: this agent has no tls.cert_file to present.
    vm_id = await api.create()
    error = await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION},
                            "FailedPrecondition", "destination_unreachable")
    assert "tls.cert_file" in error.message
    await _no_job_and_still_running(api, vm_id)


@pytest.mark.covers("VM.migrate")
async def test_a_destination_that_is_this_host_is_refused(api: InProcessAgent) -> None:
    api.connect = loopback(api)  # the agent answers its own Migration.prepare
    vm_id = await api.create()
    error = await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION},
                            "FailedPrecondition", "destination_is_source")
    assert "this host" in error.message
    await _no_job_and_still_running(api, vm_id)
    assert HOST_ID  # the one both ends report


@pytest.mark.covers("VM.migrate")
async def test_a_disk_on_no_storage_domain_is_not_shared(api: InProcessAgent) -> None:
    api.connect = loopback(api)
    vm_id = await api.create(disks=[{"path": api.image()}])
    error = await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION},
                            "FailedPrecondition", "storage_not_shared")
    assert error.data["path"].endswith("disk.img")
    await _no_job_and_still_running(api, vm_id)


@pytest.mark.covers("VM.migrate")
async def test_the_destination_must_be_a_tls_url(api: InProcessAgent) -> None:
    vm_id = await api.create()
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": "tcp://10.77.0.12:8765"},
                    "InvalidParams")


@pytest.mark.covers("VM.migrate")
async def test_an_offline_migration_moves_only_a_stopped_vm(api: InProcessAgent) -> None:
    api.connect = loopback(api)
    vm_id = await api.create()
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION,
                                   "mode": "offline"}, "FailedPrecondition", "vm_running")
    await _no_job_and_still_running(api, vm_id)
    stopped = await api.create("vm2", start=False)
    # Past the source's checks, the destination (this same host) refuses it.
    await api.error("VM.migrate", {"vm_id": stopped, "destination": DESTINATION,
                                   "mode": "offline"}, "FailedPrecondition",
                    "destination_is_source")


@pytest.mark.covers("VM.migrate")
async def test_storage_copy_needs_a_destination_domain_and_a_running_vm(
        api: InProcessAgent) -> None:
    vm_id = await api.create()
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION,
                                   "storage": "copy"}, "InvalidArgument", "missing_field")
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION,
                                   "storage": "copy", "mode": "offline",
                                   "destination_sd_id": HOST_ID}, "InvalidArgument",
                    "bad_storage")
    await api.error("VM.migrate", {"vm_id": vm_id, "destination": DESTINATION,
                                   "policy": {"steps": [
                                       {"stalled_iterations": 1, "action": "abort"},
                                       {"stalled_iterations": 2, "action": "suspend"}]}},
                    "InvalidArgument", "bad_policy")
    await _no_job_and_still_running(api, vm_id)


def test_the_destination_names_its_own_paths() -> None:
    root = parse_xml("""<domain type='kvm'><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/a/mnt/sd1/images/i1/leaf' index='2'/>
        <backingStore type='file' index='1'><format type='qcow2'/>
          <source file='/a/mnt/sd1/images/i1/base'/><backingStore/></backingStore>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/a/mnt/sd1/images/i2/only'/><backingStore/>
        <target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><source file='/iso/elsewhere.iso'/>
        <target dev='sda' bus='sata'/><readonly/></disk>
    </devices></domain>""", what="test")
    rewritten = parse_xml(_with_disks(root, {"vdb": ("/b/local/images/i9/new", "qcow2")},
                                      {"/a/mnt/sd1/images": "/b/mnt/sd1/images"}), what="t")
    files = [s.get("file") for s in rewritten.iterfind("devices/disk//source")]
    assert files == ["/b/mnt/sd1/images/i1/leaf", "/b/mnt/sd1/images/i1/base",
                     "/b/local/images/i9/new", "/iso/elsewhere.iso"]
    copied = rewritten.find("devices/disk[2]")
    assert copied is not None
    assert [c.tag for c in copied if c.tag == "backingStore"] == ["backingStore"]
    assert len(copied.find("backingStore")) == 0, "the copy is one file"


def test_only_a_checked_cpu_model_is_compared() -> None:
    def cpu(xml: str) -> object:
        return _cpu_of(parse_xml(f"<domain type='kvm'><os><type arch='x86_64' "
                                 f"machine='pc-q35-7.2'>hvm</type></os>{xml}</domain>",
                                 what="test"))

    # What libvirt gives a domain that names no CPU: QEMU gives what the host has.
    assert cpu("<cpu mode='custom' check='none'><model>qemu64</model></cpu>") is None
    assert cpu("<cpu mode='host-passthrough'/>") is None
    assert cpu("") is None
    compared = cpu("<cpu mode='custom' match='exact' check='full'>"
                   "<model fallback='forbid'>Skylake-Client</model></cpu>")
    assert isinstance(compared, tuple)
    assert compared[:3] == ("x86_64", "pc-q35-7.2", "kvm")
    assert "Skylake-Client" in compared[3]


def _incoming_xml(name: str, vm_id: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{vm_id}</uuid>"
            "<memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>")


@pytest.mark.covers("Migration.prepare")
@pytest.mark.covers("Migration.finish")
async def test_a_destination_takes_one_migration_of_a_vm_at_a_time(
        api: InProcessAgent) -> None:
    vm_id = "8f1f1c55-2222-4b3e-9d7a-0000000000a1"
    prepare = {"migration_id": "8f1f1c55-2222-4b3e-9d7a-0000000000b1", "vm_id": vm_id,
               "name": "incoming", "xml": _incoming_xml("incoming", vm_id),
               "memory_bytes": 1 << 20, "host": "10.77.0.12",
               "source_host_uuid": "8f1f1c55-2222-4b3e-9d7a-0000000000c1"}
    # The test driver has a few MiB free.
    error = await api.error("Migration.prepare", {**prepare, "memory_bytes": 64 << 30},
                            "FailedPrecondition", "insufficient_memory")
    assert error.data["need"] > error.data["free"]
    # A VM of that name here already: libvirt would refuse at the end; refused now.
    await api.create("incoming", start=False)
    error = await api.error("Migration.prepare", prepare, "FailedPrecondition", "vm_exists")
    assert error.data["clash"] == "name_taken"
    await api.call("VM.undefine", {"vm_id": (await api.call("VM.list", {}))["vms"][0][
        "vm_id"]})
    answer = await api.call("Migration.prepare", prepare)
    assert answer["host_uuid"] == HOST_ID
    # Recorded, so that a restart finds it.
    recorded = await api.store.run(migrationstore.load_all)
    assert [(r.migration_id, r.role, r.vm_id) for r in recorded] == [
        (prepare["migration_id"], "destination", vm_id)]
    # The same VM again, under another id: refused while the first is open.
    await api.error("Migration.prepare", {**prepare, "migration_id":
                                          "8f1f1c55-2222-4b3e-9d7a-0000000000b2"},
                    "FailedPrecondition", "vm_migrating")
    await api.call("Migration.finish", {"migration_id": prepare["migration_id"],
                                        "outcome": "failed"})
    await api.error("Migration.finish", {"migration_id": prepare["migration_id"],
                                         "outcome": "failed"}, "NotFound", "not_found")
    assert await api.store.run(migrationstore.load_all) == []
    # Settled: it may come again.
    await api.call("Migration.prepare", {**prepare, "migration_id":
                                         "8f1f1c55-2222-4b3e-9d7a-0000000000b3"})

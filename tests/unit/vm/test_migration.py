"""VM.migrate's checks before anything moves, in process on the test driver.

What only two hosts show (a VM moving, progress, cancel, the destination's own checks
against its bridges and storage) is in tests/integration/test_migration.py, in the lab.
Here: what the source refuses, and that a refusal leaves the VM as it was with no job.
"""

from __future__ import annotations

import pytest

from tests.unit.vm.harness import HOST_ID, InProcessAgent, loopback

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

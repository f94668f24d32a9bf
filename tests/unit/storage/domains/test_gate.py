"""A storage domain's shared and exclusive holds, without storage."""

from __future__ import annotations

import asyncio

import pytest

from virtnode.errors import FailedPrecondition, NotFound
from virtnode.storage.domains.gate import DomainGate

SD = "8d2b6c5e-0000-4000-8000-000000000001"


async def never(_job_id: str) -> None:
    raise AssertionError("no job to cancel")


async def test_exclusive_waits_for_the_calls_and_later_calls_find_the_domain_gone() -> None:
    gate = DomainGate(SD)
    lease = await gate.enter("Volume.create")
    entered = asyncio.Event()

    async def delete() -> None:
        async with gate.exclusive(force=False, timeout=5, cancel_job=never):
            entered.set()
            gate.closed = True

    deleting = asyncio.create_task(delete())
    late = asyncio.create_task(gate.enter("Volume.create"))
    await asyncio.sleep(0)  # one loop turn: both run until they block
    assert not entered.is_set() and not late.done()  # both wait for the call under way
    lease.release()
    await deleting
    with pytest.raises(NotFound) as caught:
        await late
    assert caught.value.object == "storage_domain"


async def test_jobs_refuse_unless_forced_which_cancels_them() -> None:
    gate = DomainGate(SD)
    lease = await gate.enter("Volume.copy")
    lease.taken, lease.job_id = True, "job-1"
    with pytest.raises(FailedPrecondition) as caught:
        async with gate.exclusive(force=False, timeout=5, cancel_job=never):
            pass
    assert caught.value.reason == "domain_busy" and caught.value.details["jobs"] == ["job-1"]
    again = await gate.enter("Volume.create")  # a refused delete lets calls through
    again.release()

    cancelled: list[str] = []

    async def cancel(job_id: str) -> None:
        cancelled.append(job_id)
        lease.release()  # the job ends, giving its lease back

    async with gate.exclusive(force=True, timeout=5, cancel_job=cancel):
        assert cancelled == ["job-1"]


async def test_calls_that_outlast_the_bound_refuse_the_delete() -> None:
    gate = DomainGate(SD)
    await gate.enter("Volume.resize")
    with pytest.raises(FailedPrecondition) as caught:
        async with gate.exclusive(force=True, timeout=0.01, cancel_job=never):
            pass
    assert caught.value.reason == "domain_busy" and "Volume.resize" in caught.value.message

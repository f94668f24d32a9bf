"""The job manager on a real SQLite store: states, cancel, request keys, purge, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.clock import Clock
from tests.fakes.events import EventLog
from virtnode.config import JobsConfig
from virtnode.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from virtnode.events.bus import EventBus
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.rpc.schema import ApiSchema
from virtnode.store import Store
from virtnode.util.jsontypes import JsonObject

WORK = JobKind("Test.work", cancellable=True)
STUBBORN = JobKind("Test.stubborn", cancellable=False)


class Recorder(EventLog):
    """Every job event of the bus, with a way to wait for one."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__(bus, ["job.*"])

    def states(self, job_id: str) -> list[str]:
        return [e.data["state"] for e in self.events
                if e.topic == "job.state" and e.data["job_id"] == job_id]

    def progress(self, job_id: str) -> list[int]:
        return [e.data["progress"] for e in self.events
                if e.topic == "job.progress" and e.data["job_id"] == job_id]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        await self.until(predicate, "a job event", timeout)


class Gate:
    """A runner that waits until it is opened, then returns (or raises) what it was told."""

    def __init__(self, result: JsonObject | None = None,
                 error: BaseException | None = None) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls = 0
        self.result = result if result is not None else {"ok": True}
        self.error = error
        self.handle: JobHandle | None = None

    async def __call__(self, handle: JobHandle) -> JsonObject:
        self.calls += 1
        self.handle = handle
        self.entered.set()
        await self.opened.wait()
        if self.error is not None:
            raise self.error
        return self.result


class SlowStore(Store):
    """A real store whose writes can be held back, to look at a job while it is recorded."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        if self.hold is not None:
            self.held.set()
            await self.hold.wait()
        return await super().run(fn)


class Harness:
    def __init__(self, tmp_path: Path, schema: ApiSchema, config: JobsConfig) -> None:
        self.tmp_path = tmp_path
        self.schema = schema
        self.config = config
        self.clock = Clock(1_700_000_000.0)  # a wall-clock time: jobs carry dates
        self._opened: list[tuple[Store, JobManager]] = []

    async def manager(self, *kinds: JobKind) -> tuple[JobManager, Recorder]:
        """A manager on the shared database, as a freshly started agent would have."""
        store = SlowStore(self.tmp_path)
        await store.open()
        self.store = store
        bus = EventBus()
        bus.check = self.schema.check_event  # every payload must match the schema
        manager = JobManager(store, bus, self.config, clock=self.clock)
        for kind in kinds or (WORK, STUBBORN):
            manager.register(kind)
        recorder = Recorder(bus)
        await manager.start()
        self._opened.append((store, manager))
        return manager, recorder

    async def close(self) -> None:
        for store, manager in reversed(self._opened):
            await manager.close()
            await store.close()


@pytest.fixture
async def harness(tmp_path: Path, schema: ApiSchema) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, schema, JobsConfig(progress_interval=0.2, cancel_wait=5.0))
    yield h
    await h.close()


async def submit(manager: JobManager, run: Any, kind: JobKind = WORK, **kwargs: Any) -> str:
    params = kwargs.pop("params", {"n": 1})
    job = await manager.submit(kind.name, params, run, description="test", **kwargs)
    return job.job_id


def check_job(schema: ApiSchema, job: JsonObject) -> None:
    schema.check_result("Job.get", {"job": job})


# -- states -----------------------------------------------------------------------------------


async def test_a_job_goes_pending_running_succeeded(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    gate = Gate({"answer": 42})
    job_id = await submit(manager, gate, target="vm-1")
    assert manager.get(job_id).state == "pending"
    await gate.entered.wait()
    assert manager.get(job_id).state == "running"
    gate.opened.set()
    job = await manager.wait(job_id, 5)
    assert (job.state, job.result, job.progress, job.error) == ("succeeded", {"answer": 42},
                                                                 100, None)
    assert job.finished is not None and job.target == "vm-1"
    assert recorder.states(job_id) == ["pending", "running", "succeeded"]
    check_job(harness.schema, job.to_api())


async def test_an_api_error_fails_the_job_with_the_error_object(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate(error=FailedPrecondition("the VM is not running", reason="vm_not_running"))
    gate.opened.set()
    job = await manager.wait(await submit(manager, gate), 5)
    assert job.state == "failed"
    assert job.error == {"code": 9, "message": "the VM is not running",
                         "data": {"name": "FailedPrecondition", "reason": "vm_not_running"}}
    check_job(harness.schema, job.to_api())


async def test_an_unexpected_exception_is_internal_without_details(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = await harness.manager()
    gate = Gate(error=ZeroDivisionError("secret detail"))
    gate.opened.set()
    job = await manager.wait(await submit(manager, gate), 5)
    assert job.state == "failed" and job.error is not None
    assert job.error["data"]["name"] == "InternalError"
    assert job.error["data"]["reason"] == "unexpected"
    assert "secret" not in str(job.error)
    assert job.error["data"]["incident"] in caplog.text


async def test_wait_returns_the_running_job_when_the_timeout_passes(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate)
    await gate.entered.wait()
    assert (await manager.wait(job_id, 0.05)).state == "running"
    gate.opened.set()
    assert (await manager.wait(job_id, 5)).state == "succeeded"


async def test_wait_does_not_return_while_the_outcome_is_being_recorded(
        harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate)
    await gate.entered.wait()
    harness.store.hold = asyncio.Event()
    gate.opened.set()
    await harness.store.held.wait()  # the job ended; its outcome waits for the store
    waiter = asyncio.create_task(manager.wait(job_id, 5))
    await asyncio.sleep(0)  # one loop turn: the waiter runs until it blocks
    assert not waiter.done()
    assert manager.get(job_id).state == "running"  # not visible before it is written
    harness.store.hold.set()
    assert (await waiter).state == "succeeded"


async def test_unknown_jobs_are_not_found(harness: Harness) -> None:
    manager, _ = await harness.manager()
    missing = "00000000-0000-4000-8000-000000000000"
    for call in (lambda: manager.wait(missing, 1), lambda: manager.cancel(missing, by="t")):
        with pytest.raises(NotFound) as info:
            await call()
        assert info.value.object == "job" and info.value.id == missing
    with pytest.raises(NotFound):
        manager.get(missing)


async def test_list_filters_and_counts(harness: Harness) -> None:
    manager, _ = await harness.manager()
    done, held = Gate(), Gate()
    done.opened.set()
    first = await submit(manager, done, target="a")
    await manager.wait(first, 5)
    second = await submit(manager, held, kind=STUBBORN, target="b")
    await held.entered.wait()
    assert [j.job_id for j in manager.list()] == [first, second]
    assert [j.job_id for j in manager.list(state="running")] == [second]
    assert [j.job_id for j in manager.list(kind="Test.work")] == [first]
    assert [j.job_id for j in manager.list(target="b")] == [second]
    assert manager.counts() == {"pending": 0, "running": 1, "succeeded": 1, "failed": 0,
                                "cancelled": 0}
    held.opened.set()
    await manager.wait(second, 5)


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_ends_a_running_job_and_releases_what_it_held(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    lock = asyncio.Lock()
    gate = Gate()
    job_id = await submit(manager, gate, prepare=lambda: lock)
    await gate.entered.wait()
    assert lock.locked()
    job = await manager.cancel(job_id, by="uid:0")
    assert job.state == "cancelled" and not lock.locked()
    assert job.error is not None and job.error["data"] == {"name": "Cancelled",
                                                           "reason": "cancelled"}
    assert "uid:0" in job.error["message"]
    assert recorder.states(job_id) == ["pending", "running", "cancelled"]
    with pytest.raises(FailedPrecondition) as info:
        await manager.cancel(job_id, by="uid:0")
    assert info.value.reason == "job_finished"


async def test_cancel_before_the_job_ran_never_runs_it(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate)
    job = await manager.cancel(job_id, by="uid:0")  # the task has not had a turn yet
    assert job.state == "cancelled" and gate.calls == 0
    assert recorder.states(job_id) == ["pending", "cancelled"]


async def test_a_job_that_is_not_cancellable_refuses(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate, kind=STUBBORN)
    await gate.entered.wait()
    with pytest.raises(FailedPrecondition) as info:
        await manager.cancel(job_id, by="uid:0")
    assert info.value.reason == "not_cancellable"
    gate.opened.set()
    assert (await manager.wait(job_id, 5)).state == "succeeded"


# -- request keys -----------------------------------------------------------------------------


async def test_a_retry_with_the_same_key_returns_the_same_job(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    first = await submit(manager, gate, request_key="k1")
    again = await submit(manager, gate, request_key="k1")
    assert again == first
    gate.opened.set()
    await manager.wait(first, 5)
    assert await submit(manager, gate, request_key="k1") == first  # finished: still the same
    assert gate.calls == 1


async def test_concurrent_submits_with_one_key_make_one_job(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    gate.opened.set()
    slow = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def prepare() -> AsyncIterator[None]:
        async with slow:
            await asyncio.sleep(0.01)  # deliberate: a lock that takes a moment, like a busy VM
            yield

    ids = await asyncio.gather(*(submit(manager, gate, request_key="k", prepare=prepare)
                                 for _ in range(5)))
    assert len(set(ids)) == 1
    await manager.wait(ids[0], 5)
    assert gate.calls == 1


async def test_a_key_reused_for_another_request_is_invalid(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate, request_key="k1", params={"n": 1})
    for kind, params in ((WORK, {"n": 2}), (STUBBORN, {"n": 1})):
        with pytest.raises(InvalidArgument) as info:
            await submit(manager, gate, kind=kind, request_key="k1", params=params)
        assert info.value.reason == "request_key_reused"
        assert info.value.details["job_id"] == job_id
    gate.opened.set()
    await manager.wait(job_id, 5)


async def test_a_failed_prepare_makes_no_job_and_keeps_the_key_free(harness: Harness) -> None:
    manager, _ = await harness.manager()

    @contextlib.asynccontextmanager
    async def busy() -> AsyncIterator[None]:
        raise FailedPrecondition("not now", reason="vm_not_running")
        yield

    gate = Gate()
    with pytest.raises(FailedPrecondition):
        await submit(manager, gate, request_key="k1", prepare=busy)
    assert manager.list() == [] and gate.calls == 0
    gate.opened.set()
    await manager.wait(await submit(manager, gate, request_key="k1"), 5)


async def test_keys_survive_a_restart(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    gate.opened.set()
    job_id = await submit(manager, gate, request_key="k1")
    await manager.wait(job_id, 5)
    again, _ = await harness.manager()
    assert await submit(again, gate, request_key="k1") == job_id
    with pytest.raises(InvalidArgument):
        await submit(again, gate, request_key="k1", params={"n": 2})


# -- retention --------------------------------------------------------------------------------


async def test_finished_jobs_are_purged_after_the_retention_time(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    gate.opened.set()
    old = await submit(manager, gate, request_key="k1")
    await manager.wait(old, 5)
    harness.clock.now += harness.config.retention - 1
    assert await manager.purge() == 0
    harness.clock.now += 2
    assert await manager.purge() == 1
    with pytest.raises(NotFound):
        manager.get(old)
    new = await submit(manager, gate, request_key="k1", params={"n": 2})  # key is free again
    assert new != old
    await manager.wait(new, 5)
    restarted, _ = await harness.manager()
    assert [j.job_id for j in restarted.list()] == [new]


async def test_expired_jobs_are_purged_at_start(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    gate.opened.set()
    await manager.wait(await submit(manager, gate), 5)
    harness.clock.now += harness.config.retention + 1
    restarted, _ = await harness.manager()
    assert restarted.list() == []


# -- restarts ---------------------------------------------------------------------------------


async def test_jobs_left_running_by_a_crash_are_failed_interrupted(harness: Harness) -> None:
    manager, _ = await harness.manager()
    running = Gate()
    running_id = await submit(manager, running)
    await running.entered.wait()
    # A second agent on the same database, as if the first had died without a word.
    restarted, recorder = await harness.manager()
    job = restarted.get(running_id)
    assert job.state == "failed" and job.finished is not None
    assert job.error is not None and job.error["data"]["reason"] == "interrupted"
    assert recorder.states(running_id) == ["failed"]
    check_job(harness.schema, job.to_api())


async def test_a_pending_job_is_interrupted_too(harness: Harness) -> None:
    manager, _ = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate)  # recorded pending; its task has not run yet
    restarted, _ = await harness.manager()
    assert restarted.get(job_id).state == "failed"
    await manager.cancel(job_id, by="test")


async def test_a_graceful_stop_fails_running_jobs_as_interrupted(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate, kind=STUBBORN)
    await gate.entered.wait()
    await manager.close()
    job = manager.get(job_id)
    assert job.state == "failed" and job.error is not None
    assert job.error["data"]["reason"] == "interrupted"
    assert recorder.states(job_id)[-1] == "failed"
    with pytest.raises(Unavailable):
        await submit(manager, gate)
    restarted, _ = await harness.manager()
    assert restarted.get(job_id).state == "failed"


async def test_a_kind_that_can_resume_runs_again_after_a_restart(harness: Harness) -> None:
    resumed: list[JsonObject] = []

    def resume(params: JsonObject) -> Any:
        async def run(handle: JobHandle) -> JsonObject:
            resumed.append(params)
            return {"resumed": True}
        return run

    kind = JobKind("Test.resumable", cancellable=True, resume=resume)
    manager, _ = await harness.manager(kind)
    gate = Gate()
    job_id = await submit(manager, gate, kind=kind, params={"volume": "v1"})
    await gate.entered.wait()
    restarted, recorder = await harness.manager(kind)
    job = await restarted.wait(job_id, 5)
    assert (job.state, job.result, resumed) == ("succeeded", {"resumed": True},
                                                [{"volume": "v1"}])
    assert recorder.states(job_id) == ["succeeded"]  # it was running already
    await manager.cancel(job_id, by="test")


# -- progress ---------------------------------------------------------------------------------


async def test_progress_is_rate_limited_and_the_last_value_is_sent(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate)
    await gate.entered.wait()
    assert gate.handle is not None
    for percent in range(1, 51):
        gate.handle.progress(percent)
    assert manager.get(job_id).progress == 50  # reads see the newest value at once
    await recorder.wait_for(lambda: recorder.progress(job_id) == [50])  # a burst: one event
    first = time.monotonic()
    gate.handle.progress(60)
    gate.handle.progress(70)
    await recorder.wait_for(lambda: recorder.progress(job_id) == [50, 70])
    assert time.monotonic() - first >= harness.config.progress_interval * 0.9
    gate.handle.progress(80)
    gate.opened.set()
    await manager.wait(job_id, 5)
    # Whatever was still held back goes out before the end, and a success ends at 100.
    assert recorder.progress(job_id)[-1] == 100
    assert recorder.states(job_id)[-1] == "succeeded"
    events = [e.topic for e in recorder.events if e.data["job_id"] == job_id]
    assert events[-2:] == ["job.progress", "job.state"]


async def test_progress_is_written_to_the_store(harness: Harness) -> None:
    manager, recorder = await harness.manager()
    gate = Gate()
    job_id = await submit(manager, gate, kind=STUBBORN)
    await gate.entered.wait()
    assert gate.handle is not None
    gate.handle.progress(37.9)
    await recorder.wait_for(lambda: recorder.progress(job_id) == [37])
    restarted, _ = await harness.manager()
    job = restarted.get(job_id)
    assert (job.state, job.progress) == ("failed", 37)
    gate.opened.set()
    await manager.wait(job_id, 5)

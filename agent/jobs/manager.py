"""Jobs: long operations that run in the background, kept in the state store.

A job is one asyncio task with a :class:`JobHandle` to report progress. Its states::

    pending ──> running ──> succeeded
       │           ├──────> failed       (an error; reason interrupted: the agent stopped)
       │           └──────> cancelled    (Job.cancel, only when the job is cancellable)
       └──> cancelled | failed           (cancelled or interrupted before it ran)

Rules the code keeps:

- A state change is written to the store before anyone can see it (``Job.get``, the
  ``job.state`` event). Progress is written and published at most once per
  ``progress_interval`` per job, and the last value always goes out when the job ends.
- After a restart, jobs that were pending or running are ``failed`` with reason
  ``interrupted``, unless their kind declares a ``resume`` (an operation that is
  idempotent and can pick up where it stopped); a graceful stop does the same at once.
- A request key makes starting a job idempotent: the same key with the same kind and
  params gives back the job it started; with anything else it is ``InvalidArgument``
  (reason ``request_key_reused``). Keys live in the job's row and go when it is purged.
- Finished jobs are kept for ``retention`` seconds, then purged (at start and every
  ``purge_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from virtnode.config import JobsConfig
from virtnode.errors import (
    Aborted,
    ApiError,
    Cancelled,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from virtnode.events.bus import EventBus
from virtnode.jobs import store as jobstore
from virtnode.jobs.store import JobRecord
from virtnode.store import Store
from virtnode.util.aio import KeyedLocks, wait_event
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)


STATE_TOPIC = "job.state"
PROGRESS_TOPIC = "job.progress"
TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ("pending", "running", *TERMINAL)


class JobHandle:
    """What a running job gets: its id and a way to report progress."""

    def __init__(self, manager: JobManager, job_id: str) -> None:
        self._manager = manager
        self.job_id = job_id

    def progress(self, percent: float) -> None:
        """Report progress (0-100); written and published rate-limited. Never blocks."""
        self._manager._set_progress(self.job_id, percent)

    @property
    def cancel_requested(self) -> bool:
        """Whether a client cancelled the job (rather than the agent stopping): a job
        whose work goes on outside the agent stops it only then."""
        running = self._manager._running.get(self.job_id)
        return running is not None and isinstance(running.cancel_error, Cancelled)


Runner = Callable[[JobHandle], Awaitable[JsonObject]]
Prepare = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class JobKind:
    """A kind of job, registered by the service that runs it."""

    name: str
    cancellable: bool
    #: For operations that are idempotent and can continue after a restart: builds the
    #: runner again from the job's stored params. None (every kind so far): an
    #: interrupted job fails with reason ``interrupted``.
    resume: Callable[[JsonObject], Runner] | None = None


def params_hash(kind: str, params: Mapping[str, Any]) -> str:
    """The digest that ties a request key to one request."""
    text = json.dumps([kind, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def interrupted(message: str) -> Aborted:
    return Aborted(message, reason="interrupted")


class _Running:
    """The runtime side of an unfinished job."""

    task: asyncio.Task[None]  # set by JobManager._spawn right after this is made

    def __init__(self) -> None:
        self.began = False
        self.finishing = False  # the outcome is being recorded; no more progress or cancel
        self.cancel_error: ApiError | None = None
        self.done = asyncio.Event()
        self.reported_progress = 0
        self.last_flush = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.flush: asyncio.Task[None] | None = None


class JobManager:
    """Runs, records and reports jobs. ``start()`` loads the store; ``close()`` stops."""

    def __init__(self, store: Store, bus: EventBus, config: JobsConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._bus = bus
        self._config = config
        self._clock = clock
        self._kinds: dict[str, JobKind] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._keys: dict[str, str] = {}
        self._running: dict[str, _Running] = {}
        self._key_locks = KeyedLocks()
        self._purger: asyncio.Task[None] | None = None
        self._closing = False

    def register(self, kind: JobKind) -> None:
        """Declare a kind of job; call before :meth:`start`."""
        self._kinds[kind.name] = kind

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the jobs; fail (or resume) those a previous run left unfinished; purge.

        Raises :class:`~virtnode.store.StoreError` when the store cannot hold jobs.
        """
        await self._store.ensure_schema(jobstore.COMPONENT, jobstore.VERSION, jobstore.SCHEMA)
        records = await self._store.run(jobstore.load_all)
        now = self._clock()
        error = interrupted("the agent stopped while the job was running").to_error()
        failed: list[tuple[str, JobRecord]] = []
        resumed: list[tuple[JobRecord, Runner]] = []
        for job in records:
            kind = self._kinds.get(job.kind)
            if job.state in TERMINAL:
                self._remember(job)
            elif kind is not None and kind.resume is not None:
                resumed.append((job, kind.resume(job.params or {})))
            else:
                failed.append((job.state, replace(job, state="failed", finished=now,
                                                  error=error)))
        if failed:
            await self._store.run(lambda conn: jobstore.save_state(conn, [j for _, j in failed]))
        for previous, job in failed:
            log.warning("job %s (%s) was %s when the agent stopped: failed (interrupted)",
                        job.job_id, job.kind, previous)
            self._remember(job)
            self._publish_state(job, previous)
        await self.purge()
        for job, run in resumed:
            log.info("resuming job %s (%s)", job.job_id, job.kind)
            self._remember(job)
            self._spawn(job, run, contextlib.AsyncExitStack())
        self._purger = asyncio.create_task(self._purge_loop(), name="jobs-purger")

    async def close(self) -> None:
        """Stop the purger; jobs still running end ``failed`` (``interrupted``). Idempotent."""
        self._closing = True
        purger, self._purger = self._purger, None
        if purger is not None:
            purger.cancel()
            await asyncio.gather(purger, return_exceptions=True)
        tasks = []
        for job_id, running in list(self._running.items()):
            self._request_cancel(job_id, interrupted("the agent stopped while the job ran"))
            tasks.append(running.task)
        if tasks:
            log.info("stopping %d running jobs", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- queries ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The job ``job_id``; raises :class:`NotFound` (unknown or purged)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", reason="not_found", object="job", id=job_id)
        return job

    def list(self, *, state: str | None = None, kind: str | None = None,
             target: str | None = None) -> list[JobRecord]:
        """Jobs in start order, filtered by whichever of the fields are given."""
        return [
            job for job in self._jobs.values()
            if (state is None or job.state == state) and (kind is None or job.kind == kind)
            and (target is None or job.target == target)
        ]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state present, for metrics)."""
        counts = dict.fromkeys(STATES, 0)
        for job in self._jobs.values():
            counts[job.state] += 1
        return counts

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The job once it has finished, or as it is after ``timeout`` seconds."""
        job = self.get(job_id)
        running = self._running.get(job_id)
        if running is not None:
            await wait_event(running.done, timeout)
        return self._jobs.get(job_id, job)  # a very short retention may have purged it

    # --- starting and cancelling -----------------------------------------------------------

    async def submit(self, kind: str, params: Mapping[str, Any], run: Runner, *,
                     description: str, target: str | None = None,
                     request_key: str | None = None, prepare: Prepare | None = None,
                     ) -> JobRecord:
        """Start a job of ``kind`` that runs ``run(handle)``; returns it as created.

        ``prepare()`` gives a context (a lock) entered before the job is created and left
        when it ends; what it raises is raised here and no job is made. With a
        ``request_key`` already used for the same kind and params, nothing starts and the
        existing job is returned; raises :class:`InvalidArgument` (``request_key_reused``)
        when it was used for something else, :class:`Unavailable` while stopping.
        """
        spec = self._kinds[kind]
        digest = params_hash(kind, params) if request_key is not None else None
        async with (self._key_locks.hold(request_key) if request_key is not None
                    else contextlib.nullcontext()):
            existing = self._by_key(request_key, kind, digest)
            if existing is not None:
                return existing
            if self._closing:
                raise Unavailable("the agent is shutting down", reason="shutting_down")
            async with contextlib.AsyncExitStack() as stack:
                if prepare is not None:
                    await stack.enter_async_context(prepare())
                resources = stack.pop_all()
            job = JobRecord(
                job_id=str(uuid.uuid4()), kind=kind, state="pending", progress=0,
                description=description, target=target, cancellable=spec.cancellable,
                started=self._clock(), params=dict(params), request_key=request_key,
                params_hash=digest,
            )
            # Shielded: once the row is written the job exists, even if the caller is gone.
            await asyncio.shield(self._create(job, run, resources))
        return job

    async def cancel(self, job_id: str, *, by: str) -> JobRecord:
        """Cancel a cancellable job; returns it once it ended, or after ``cancel_wait``.

        Raises :class:`NotFound`, :class:`FailedPrecondition` (``job_finished``,
        ``not_cancellable``).
        """
        job = self.get(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(f"job {job_id} has already finished ({job.state})",
                                     reason="job_finished", object="job", id=job_id)
        if not job.cancellable:
            raise FailedPrecondition(f"{job.kind} jobs cannot be cancelled",
                                     reason="not_cancellable", object="job", id=job_id)
        log.info("job %s (%s) cancelled by %s", job_id, job.kind, by)
        self._request_cancel(job_id, Cancelled(f"cancelled by {by}", reason="cancelled"))
        return await self.wait(job_id, self._config.cancel_wait)

    def _by_key(self, key: str | None, kind: str, digest: str | None) -> JobRecord | None:
        if key is None:
            return None
        job_id = self._keys.get(key)
        if job_id is None:
            return None
        job = self._jobs[job_id]
        if job.kind != kind or job.params_hash != digest:
            raise InvalidArgument(
                f"request_key {key!r} was given to a different request (job {job_id})",
                reason="request_key_reused", field="request_key", job_id=job_id)
        return job

    async def _create(self, job: JobRecord, run: Runner,
                      resources: contextlib.AsyncExitStack) -> None:
        try:
            await self._store.run(lambda conn: jobstore.insert(conn, job))
        except BaseException:
            await resources.aclose()
            raise
        self._remember(job)
        self._publish_state(job, None)
        self._spawn(job, run, resources)

    def _remember(self, job: JobRecord) -> None:
        self._jobs[job.job_id] = job
        if job.request_key is not None:
            self._keys[job.request_key] = job.job_id

    def _spawn(self, job: JobRecord, run: Runner, resources: contextlib.AsyncExitStack) -> None:
        running = _Running()
        running.reported_progress = job.progress
        self._running[job.job_id] = running
        running.task = asyncio.create_task(self._run(job.job_id, run, resources, running),
                                           name=f"job {job.kind} {job.job_id}")

    def _request_cancel(self, job_id: str, error: ApiError) -> None:
        running = self._running.get(job_id)
        if running is None or running.finishing or running.cancel_error is not None:
            return
        running.cancel_error = error
        # A task that has not begun sees cancel_error when it does and never runs.
        if running.began:
            running.task.cancel()

    # --- running ---------------------------------------------------------------------------

    async def _run(self, job_id: str, run: Runner, resources: contextlib.AsyncExitStack,
                   running: _Running) -> None:
        state, error, result = "succeeded", None, None
        try:
            async with resources:  # released before the outcome is reported
                if running.cancel_error is not None:
                    raise asyncio.CancelledError
                running.began = True
                await self._set_state(job_id, "running")
                result = await run(JobHandle(self, job_id))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            cause = running.cancel_error or interrupted("the job's task was cancelled")
            state = "cancelled" if isinstance(cause, Cancelled) else "failed"
            error = cause.to_error()
        except ApiError as exc:
            state, error = "failed", exc.to_error()
        except Exception:
            incident = str(uuid.uuid4())
            log.exception("job %s failed unexpectedly (incident %s)", job_id, incident)
            state = "failed"
            error = InternalError("internal error; see the agent log", reason="unexpected",
                                  incident=incident).to_error()
        await self._finish(job_id, running, state, error, result)

    async def _set_state(self, job_id: str, state: str) -> None:
        job = self._jobs[job_id]
        if job.state == state:
            return
        new = replace(job, state=state)
        await self._store.run(lambda conn: jobstore.save_state(conn, [new]))
        self._jobs[job_id] = replace(self._jobs[job_id], state=state)
        self._publish_state(self._jobs[job_id], job.state)

    async def _finish(self, job_id: str, running: _Running, state: str,
                      error: JsonObject | None, result: JsonObject | None) -> None:
        running.finishing = True
        if running.timer is not None:
            running.timer.cancel()
        if running.flush is not None:
            await asyncio.gather(running.flush, return_exceptions=True)
        job = self._jobs[job_id]
        final = replace(job, state=state, finished=self._clock(), error=error, result=result,
                        progress=100 if state == "succeeded" else job.progress)
        try:
            await self._store.run(lambda conn: jobstore.save_state(conn, [final]))
        except Exception:
            # Reported anyway: after a restart the job shows as interrupted instead.
            log.exception("cannot record the end of job %s", job_id)
        self._jobs[job_id] = final
        if final.progress != running.reported_progress:
            self._publish_progress(final)
        self._publish_state(final, job.state)
        del self._running[job_id]
        running.done.set()
        log.info("job %s (%s) %s", job_id, job.kind, state)

    # --- progress --------------------------------------------------------------------------

    def _set_progress(self, job_id: str, percent: float) -> None:
        running = self._running.get(job_id)
        value = max(0, min(100, int(percent)))
        if running is None or running.finishing or self._jobs[job_id].progress == value:
            return
        self._jobs[job_id] = replace(self._jobs[job_id], progress=value)
        self._schedule_flush(job_id, running)

    def _schedule_flush(self, job_id: str, running: _Running) -> None:
        if running.timer is not None or running.flush is not None:
            return  # the pending flush writes the newest value
        delay = running.last_flush + self._config.progress_interval - time.monotonic()
        if delay <= 0:
            self._flush(job_id, running)
        else:
            running.timer = asyncio.get_running_loop().call_later(
                delay, self._flush, job_id, running)

    def _flush(self, job_id: str, running: _Running) -> None:
        running.timer = None
        running.last_flush = time.monotonic()
        running.flush = asyncio.create_task(self._write_progress(job_id, running),
                                            name=f"job progress {job_id}")

    async def _write_progress(self, job_id: str, running: _Running) -> None:
        value = self._jobs[job_id].progress
        try:
            await self._store.run(lambda conn: jobstore.save_progress(conn, job_id, value))
        except Exception:
            log.exception("cannot record the progress of job %s", job_id)
        if running.finishing:
            return  # _finish reports the last value
        running.flush = None
        running.reported_progress = value
        self._publish_progress(self._jobs[job_id], value)
        if self._jobs[job_id].progress != value:
            self._schedule_flush(job_id, running)

    # --- events and purging ----------------------------------------------------------------

    def _publish_state(self, job: JobRecord, previous: str | None) -> None:
        self._bus.publish(STATE_TOPIC, {
            "job_id": job.job_id, "kind": job.kind, "target": job.target,
            "state": job.state, "previous_state": previous, "job": job.to_api(),
        })

    def _publish_progress(self, job: JobRecord, value: int | None = None) -> None:
        self._bus.publish(PROGRESS_TOPIC, {
            "job_id": job.job_id, "kind": job.kind, "target": job.target,
            "progress": job.progress if value is None else value,
        })

    async def purge(self) -> int:
        """Remove jobs that finished more than ``retention`` seconds ago; returns how many."""
        cutoff = self._clock() - self._config.retention
        expired = [job.job_id for job in self._jobs.values()
                   if job.finished is not None and job.finished < cutoff]
        if not expired:
            return 0
        await self._store.run(lambda conn: jobstore.delete(conn, expired))
        for job_id in expired:
            job = self._jobs.pop(job_id)
            if job.request_key is not None:
                self._keys.pop(job.request_key, None)
        log.info("purged %d finished jobs", len(expired))
        return len(expired)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.purge_interval)
            try:
                await self.purge()
            except Exception:
                log.exception("purging finished jobs failed; trying again later")

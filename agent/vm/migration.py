"""Live migration between agents: ``VM.migrate`` on the source, ``Migration.*`` on the
destination.

The source agent checks the VM, reaches the destination agent (over its tls:// listener,
with this agent's own certificate) and asks it to prepare; the destination checks what
the VM needs of it and answers how its libvirtd is reached. The source's libvirtd then
migrates the VM peer to peer (``migrateToURI3``) while the job reads libvirt's job
statistics as its progress; at the end the source tells the destination the outcome.
A cancelled job aborts libvirt's job: the VM runs on at the source, untouched, and the
destination removes whatever libvirt left of it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from lxml import etree

from virtnode.api_schema.params import (
    MigrationFinishParams,
    MigrationPrepareParams,
    VmMigrateParams,
)
from virtnode.config import MigrationConfig
from virtnode.errors import (
    Aborted,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import DomainEvent
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.storage.domains.access import QEMU_CONF, qemu_conf_identity
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ops as vmops
from virtnode.vm.convergence import Follower, Schedule, Step, post_copy_possible, schedule_of
from virtnode.vm.core import VmCore
from virtnode.vm.shutdown import STOPPED

log = logging.getLogger(__name__)

TOPIC = "vm.migration"
#: libvirt's VIR_MIGRATE_PARAM_BANDWIDTH: the cap on the transfer, MiB/s.
PARAM_BANDWIDTH = "bandwidth"
MIGRATE_JOB = JobKind("VM.migrate", cancellable=True)
#: Where the kernel says whether unprivileged processes may use userfaultfd.
USERFAULTFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
#: How long a finished migration's statistics (its downtime) may take to arrive.
COMPLETED_WAIT = 2.0


class Peer(Protocol):
    """Another agent, reached over its API. Errors it answers are raised as the
    :class:`~virtnode.errors.ApiError` of the same name."""

    async def call(self, method: str, params: JsonObject | None = None, *,
                   timeout: float | None = None) -> JsonObject: ...

    async def close(self) -> None: ...


#: Reaches the agent at a tls:// URL, or raises FailedPrecondition
#: (``destination_unreachable``).
PeerConnector = Callable[[str, float], Awaitable[Peer]]


@dataclass
class _Incoming:
    vm_id: str
    source: str
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Course:
    """Where a running migration stands."""

    follower: Follower
    live: bool
    timeout: float | None = None
    started: float = field(default_factory=time.monotonic)
    downtime_set: bool = False
    post_copy: bool = False
    verdict: ApiError | None = None


def _flags(prepared: dict[str, Any], schedule: Schedule) -> int:
    """libvirt's migration flags for a prepared migration."""
    if prepared["offline"]:
        # Only the definition moves (the disks are shared): libvirt defines it there.
        flags = (vc.MIGRATE_OFFLINE | vc.MIGRATE_PEER2PEER | vc.MIGRATE_PERSIST_DEST
                 | vc.MIGRATE_UNDEFINE_SOURCE)
    else:
        flags = vc.MIGRATE_LIVE | vc.MIGRATE_PEER2PEER | vc.MIGRATE_ABORT_ON_ERROR
        if prepared["persistent"]:
            flags |= vc.MIGRATE_PERSIST_DEST | vc.MIGRATE_UNDEFINE_SOURCE
        if schedule.post_copy:
            flags |= vc.MIGRATE_POSTCOPY
    if prepared["shared_disks"]:
        # libvirt takes ext4 and the like for local storage; every disk was found on a
        # storage domain that the destination has attached too, so it is shared.
        flags |= vc.MIGRATE_UNSAFE
    return flags


def _bridges(root: etree._Element) -> list[str]:
    return sorted({str(source.get("bridge")) for source in
                   root.iterfind("devices/interface[@type='bridge']/source")
                   if source.get("bridge")})


def _disk_files(root: etree._Element) -> list[str]:
    return [str(source.get("file")) for source in root.iterfind("devices/disk/source")
            if source.get("file")]


def _under(path: str, dirs: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(d).rstrip("/") + "/") for d in dirs)


class MigrationService:
    """Both ends of a migration: the ``VM.migrate`` jobs this host sends, and the
    migrations it takes in."""

    def __init__(self, core: VmCore, bus: EventBus, jobs: JobManager,
                 config: MigrationConfig, *, host_id: Callable[[], str],
                 connect: PeerConnector,
                 storage_dirs: Callable[[], Iterable[str]] = lambda: ()) -> None:
        self._core = core
        self._bus = bus
        self._jobs = jobs
        self._config = config
        self._host_id = host_id
        self._connect = connect
        self._storage_dirs = storage_dirs
        self._outgoing_slots = asyncio.Semaphore(config.max_outgoing)
        self._outgoing: set[str] = set()
        self._incoming: dict[str, _Incoming] = {}
        self._completed: dict[str, asyncio.Future[dict[str, Any]]] = {}
        jobs.register(MIGRATE_JOB)
        core.hypervisor.add_domain_listener(self._on_domain_event)

    def _on_domain_event(self, event: DomainEvent) -> None:
        waiter = self._completed.get(event.vm_id)
        if event.kind == "job_completed" and waiter is not None and not waiter.done():
            waiter.set_result(dict(event.stats))

    # --- the source ---------------------------------------------------------------------

    async def migrate(self, params: VmMigrateParams) -> JsonObject:
        vm_id, destination = params["vm_id"], params["destination"]
        host = urlsplit(destination).hostname
        if not host:
            raise FailedPrecondition(f"no host in {destination}", reason="bad_destination",
                                     field="destination")
        schedule = schedule_of(params.get("policy"))
        migration_id = str(uuid.uuid4())
        prepared: dict[str, Any] = {"schedule": schedule}

        async def run(handle: JobHandle) -> JsonObject:
            return await self._run(handle, migration_id, vm_id, prepared, params)

        job = await self._jobs.submit(
            MIGRATE_JOB.name,
            {k: v for k, v in params.items() if k != "request_key"},
            run, description=f"migrate VM {vm_id} to {destination}", target=vm_id,
            request_key=params.get("request_key"),
            prepare=lambda: self._prepared(vm_id, destination, host, migration_id,
                                           mode=params["mode"], prepared=prepared),
        )
        return {"job_id": job.job_id, "job": job.to_api()}

    @contextlib.asynccontextmanager
    async def _prepared(self, vm_id: str, destination: str, host: str, migration_id: str, *,
                        mode: str, prepared: dict[str, Any]) -> AsyncIterator[None]:
        """Everything checked and the destination ready, before the job exists; held (the
        VM's lock, the destination's connection) until the job ends."""
        core = self._core
        core.require_ready()
        if vm_id in self._outgoing:
            raise FailedPrecondition(f"VM {vm_id} is migrating already", reason="vm_migrating",
                                     object="vm", id=vm_id)
        async with core.locks.hold(vm_id, "VM.migrate"):
            state, _ = await core.on_vm(vm_id, vmops.state_of)
            if mode == "live" and state != "running":
                raise FailedPrecondition(f"a live migration needs a running VM; it is {state}",
                                         reason="vm_not_running", object="vm", id=vm_id)
            if mode == "offline" and state not in STOPPED:
                raise FailedPrecondition(
                    f"an offline migration moves a stopped VM; it is {state}",
                    reason="vm_running", object="vm", id=vm_id)
            name, xml, memory, persistent = await core.on_vm(vm_id, _describe)
            if mode == "offline":
                memory = 0  # it needs its memory once started, wherever that is
            root = parse_xml(xml, what="domain XML")
            disks = _disk_files(root)
            dirs = list(self._storage_dirs())
            local = [d for d in disks if not _under(d, dirs)]
            if local:
                raise FailedPrecondition(
                    f"disk {local[0]} is on no storage domain: with storage shared every disk "
                    "must be on a storage domain attached on both hosts",
                    reason="storage_not_shared", object="vm", id=vm_id, path=local[0])
            peer = await self._connect(destination, self._config.connect_timeout)
            try:
                answer = await peer.call("Migration.prepare", {
                    "migration_id": migration_id, "vm_id": vm_id, "name": name, "xml": xml,
                    "memory_bytes": memory, "source_host_uuid": self._host_id(),
                    "host": host,
                    "post_copy": mode == "live" and prepared["schedule"].post_copy})
                prepared.update(peer=peer, uri=answer["libvirt_uri"],
                                peer_uuid=answer["host_uuid"], persistent=persistent,
                                shared_disks=bool(disks), destination=destination,
                                offline=mode == "offline")
                self._outgoing.add(vm_id)
                try:
                    yield
                finally:
                    self._outgoing.discard(vm_id)
                    if not prepared.get("finished"):  # no job ran: release the destination
                        with contextlib.suppress(ApiError, OSError):
                            await asyncio.shield(peer.call("Migration.finish", {
                                "migration_id": migration_id, "outcome": "failed"}))
            finally:
                await peer.close()

    async def _run(self, handle: JobHandle, migration_id: str, vm_id: str,
                   prepared: dict[str, Any], params: VmMigrateParams) -> JsonObject:
        peer: Peer = prepared["peer"]
        started = time.monotonic()
        event = {"vm_id": vm_id, "migration_id": migration_id, "role": "source",
                 "peer": prepared["peer_uuid"]}
        outcome = "failed"
        ending: JsonObject = {}
        try:
            async with self._outgoing_slots:
                self._bus.publish(TOPIC, {**event, "phase": "migrating"})
                ending = await self._transfer(handle, vm_id, prepared, params, event)
            outcome = "succeeded"
            return {"vm_id": vm_id, "migration_id": migration_id,
                    "destination": prepared["destination"],
                    "destination_host_uuid": prepared["peer_uuid"],
                    "seconds": round(time.monotonic() - started, 3), **ending}
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            prepared["finished"] = True
            with contextlib.suppress(ApiError, OSError):
                await asyncio.shield(peer.call("Migration.finish", {
                    "migration_id": migration_id, "outcome": outcome}))
            self._bus.publish(TOPIC, {**event, "phase": outcome, **{
                k: v for k, v in ending.items() if k in ("downtime_ms", "post_copy")},
                "seconds": round(time.monotonic() - started, 3)})

    async def _transfer(self, handle: JobHandle, vm_id: str, prepared: dict[str, Any],
                        params: VmMigrateParams, event: JsonObject) -> JsonObject:
        """Have libvirt migrate the VM, following its course; what the end measured."""
        schedule: Schedule = prepared["schedule"]
        live = not prepared["offline"]
        flags = _flags(prepared, schedule)
        migrate_params: dict[str, Any] = {}
        if params.get("max_bandwidth_mibps") is not None:
            migrate_params[PARAM_BANDWIDTH] = params["max_bandwidth_mibps"]
        uri = prepared["uri"]
        core = self._core
        course = _Course(Follower(schedule), live, params.get("timeout"))
        completed = asyncio.get_running_loop().create_future()
        self._completed[vm_id] = completed

        def send(conn: Connection) -> None:
            vmops.lookup(conn, vm_id).migrateToURI3(uri, migrate_params, flags)

        transfer = asyncio.ensure_future(
            core.hypervisor.call_long(send, what=f"migrating VM {vm_id} to {uri}"))
        try:
            try:
                while not transfer.done() and course.verdict is None:
                    await asyncio.wait([transfer], timeout=self._config.progress_interval)
                    if transfer.done():
                        break
                    await self._follow(handle, vm_id, course, event)
                if course.verdict is None:
                    await transfer
            except asyncio.CancelledError:
                await self._abort(vm_id, transfer)
                if await self._moved(vm_id):
                    # libvirt finished before the abort took: the VM runs at the
                    # destination now, and "cancelled" would have the destination remove it.
                    log.warning("migration of VM %s ended before it could be cancelled",
                                vm_id)
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    return await self._ending(course, completed)
                raise
            except ApiError as exc:
                if await self._moved(vm_id):
                    log.warning("libvirt reported the migration of VM %s failed, but the VM "
                                "is gone from here: taking it as moved", vm_id)
                    return await self._ending(course, completed)
                if "ostcopy is not supported" in str(exc):
                    raise FailedPrecondition(
                        "the destination's QEMU cannot run post-copy (it needs userfaultfd)",
                        reason="post_copy_unsupported") from None
                raise
            if course.verdict is not None:
                await self._abort(vm_id, transfer)
                if not await self._moved(vm_id):
                    raise course.verdict
                log.warning("migration of VM %s ended before it could be aborted", vm_id)
            return await self._ending(course, completed)
        finally:
            self._completed.pop(vm_id, None)

    async def _follow(self, handle: JobHandle, vm_id: str, course: _Course,
                      event: JsonObject) -> None:
        """One reading of libvirt's job statistics: progress, events, convergence."""
        core = self._core
        try:
            stats = await core.on_vm(vm_id, lambda dom: dom.jobStats(),
                                     what=f"reading the migration of {vm_id}")
        except ApiError:
            return
        follower = course.follower
        if (course.timeout is not None and not course.post_copy
                and time.monotonic() - course.started > course.timeout):
            course.verdict = DeadlineExceeded(
                f"the migration took longer than {course.timeout} s",
                reason="migration_timeout")
            return
        if course.live and not course.downtime_set and int(stats.get("type", 0) or 0):
            # libvirt takes a maximum downtime only once its migration job exists.
            course.downtime_set = await self._act(
                vm_id, Step(0, "downtime", follower.downtime_ms))
        self._report(handle, stats, {**event, "max_downtime_ms": follower.downtime_ms,
                                     "stalled_iterations": follower.stalled,
                                     "post_copy": course.post_copy})
        if not course.live or course.post_copy or int(stats.get("data_total", 0) or 0) <= 0:
            return
        for step in follower.observe(int(stats.get("memory_iteration", 0) or 0),
                                     int(stats.get("data_remaining", 0) or 0)):
            log.info("migration of VM %s stalled %d times: %s", vm_id, follower.stalled,
                     step.action)
            self._bus.publish(TOPIC, {**event, "phase": "migrating", "action": step.action,
                                      "stalled_iterations": follower.stalled,
                                      "max_downtime_ms": follower.downtime_ms})
            if step.action == "abort":
                course.verdict = Aborted(
                    f"the migration did not converge: it stalled {follower.stalled} times "
                    f"with a downtime of {follower.downtime_ms} ms allowed",
                    reason="not_converging", stalled_iterations=follower.stalled,
                    max_downtime_ms=follower.downtime_ms)
                return
            if await self._act(vm_id, step) and step.action == "post_copy":
                course.post_copy = True

    async def _act(self, vm_id: str, step: Step) -> bool:
        """Take a convergence step on libvirt's migration job; whether it took."""
        def act(dom: Domain) -> None:
            if step.action == "downtime":
                dom.migrateSetMaxDowntime(step.downtime_ms, 0)
            elif step.action == "post_copy":
                dom.migrateStartPostCopy(0)
            elif step.action == "suspend":
                dom.suspend()

        try:
            await self._core.on_vm(vm_id, act, what=f"{step.action} for the migration of "
                                   f"{vm_id}")
        except ApiError as exc:
            log.warning("migration of VM %s: %s did not take: %s", vm_id, step.action, exc)
            return False
        return True

    async def _ending(self, course: _Course,
                      completed: asyncio.Future[dict[str, Any]]) -> JsonObject:
        """What the finished migration measured: libvirt's downtime when it says."""
        ending: JsonObject = {"policy": course.follower.schedule.name,
                              "post_copy": course.post_copy,
                              "stalled_iterations": course.follower.stalled,
                              "max_downtime_ms": course.follower.downtime_ms}
        with contextlib.suppress(TimeoutError):
            stats = await asyncio.wait_for(asyncio.shield(completed), COMPLETED_WAIT)
            if stats.get("downtime") is not None:
                ending["downtime_ms"] = int(stats["downtime"])
            if stats.get("time_elapsed") is not None:
                ending["libvirt_ms"] = int(stats["time_elapsed"])
        return ending

    async def _abort(self, vm_id: str, transfer: asyncio.Future[None]) -> None:
        """Abort libvirt's migration job until it takes, or the migration ends. Early on
        (the destination's QEMU still starting) libvirt refuses to abort: tried again."""
        while not transfer.done():
            with contextlib.suppress(ApiError):
                await self._core.on_vm(vm_id, lambda dom: dom.abortJob(),
                                       what=f"aborting the migration of {vm_id}")
            await asyncio.wait([transfer], timeout=0.2)
        with contextlib.suppress(ApiError):
            await transfer

    async def _moved(self, vm_id: str) -> bool:
        """Whether the VM has left this host: undefined here (a persistent VM migrates
        with UNDEFINE_SOURCE, a transient one goes), or shut off for a migration."""
        try:
            state, reason = await self._core.on_vm(vm_id, vmops.state_of)
        except NotFound:
            return True
        return state == "shutoff" and reason == "migrated"

    def _report(self, handle: JobHandle, stats: JsonObject, event: JsonObject) -> None:
        total = int(stats.get("data_total", 0) or 0)
        if total <= 0:
            return  # still setting up: the destination's QEMU is starting
        processed = int(stats.get("data_processed", 0) or 0)
        remaining = int(stats.get("data_remaining", 0) or 0)
        # Zero pages leave "remaining" without counting as "processed": what is done is
        # what no longer remains.
        handle.progress(min(99.0, max(0.0, (total - remaining) / total * 100)))
        figures = {"data_total_bytes": total, "data_processed_bytes": processed,
                   "data_remaining_bytes": remaining,
                   "memory_iteration": int(stats.get("memory_iteration", 0) or 0),
                   "memory_dirty_rate_pages": int(stats.get("memory_dirty_rate", 0) or 0),
                   "memory_bandwidth_bytes": int(stats.get("memory_bps", 0) or 0)}
        if stats.get("downtime") is not None:
            figures["expected_downtime_ms"] = int(stats["downtime"])
        self._bus.publish(TOPIC, {**event, "phase": "migrating", **figures})

    # --- the destination ----------------------------------------------------------------

    async def prepare(self, params: MigrationPrepareParams) -> JsonObject:
        migration_id, vm_id = params["migration_id"], params["vm_id"]
        if params["source_host_uuid"] == self._host_id():
            raise FailedPrecondition("the destination is this host itself",
                                     reason="destination_is_source")
        if len(self._incoming) >= self._config.max_incoming:
            raise ResourceExhausted(
                f"{len(self._incoming)} migrations are coming in already "
                f"(migration.max_incoming)", reason="too_many_migrations")
        self._core.require_ready()
        root = parse_xml(params["xml"], what="domain XML")
        dirs = list(self._storage_dirs())

        def lacking() -> tuple[list[str], list[str]]:
            bridges = [b for b in _bridges(root) if not os.path.isdir(f"/sys/class/net/{b}")]
            disks = [d for d in _disk_files(root) if not (_under(d, dirs)
                                                           and os.path.exists(d))]
            return bridges, disks

        missing, absent = await asyncio.to_thread(lacking)
        if missing:
            raise FailedPrecondition(f"bridge {missing[0]} does not exist on this host",
                                     reason="network_missing", bridge=missing[0])
        if absent:
            raise FailedPrecondition(
                f"disk {absent[0]} is on no storage domain attached on this host",
                reason="storage_missing", path=absent[0])

        def check(conn: Connection) -> int:
            with contextlib.suppress(NotFound):
                vmops.lookup(conn, vm_id)
                raise FailedPrecondition(f"VM {vm_id} exists on this host already",
                                         reason="vm_exists", object="vm", id=vm_id)
            return conn.getFreeMemory()

        # The incoming VM must pass this host's own policy, as a VM.create would.
        await self._core.vet(_without_dynamic_labels(root), "xml")
        if params.get("post_copy") and not await asyncio.to_thread(_post_copy_here):
            raise FailedPrecondition(
                "this host's QEMU cannot take a post-copy migration: it needs userfaultfd "
                "(vm.unprivileged_userfaultfd = 1, or QEMU running as root with its "
                "capabilities)", reason="post_copy_unsupported")
        free = await self._core.hypervisor.call(check, what="checking an incoming VM")
        if free < params["memory_bytes"]:
            raise FailedPrecondition(
                f"the VM needs {params['memory_bytes']} bytes of memory; {free} are free",
                reason="insufficient_memory", need=params["memory_bytes"], free=free)
        self._incoming[migration_id] = _Incoming(vm_id, params["source_host_uuid"])
        self._bus.publish(TOPIC, {"vm_id": vm_id, "migration_id": migration_id,
                                  "role": "destination", "phase": "preparing",
                                  "peer": params["source_host_uuid"]})
        return {"libvirt_uri": self._config.libvirt_uri.format(host=params["host"]),
                "host_uuid": self._host_id()}

    async def finish(self, params: MigrationFinishParams) -> JsonObject:
        migration_id, outcome = params["migration_id"], params["outcome"]
        incoming = self._incoming.pop(migration_id, None)
        if incoming is None:
            raise NotFound(f"no migration {migration_id} is coming in", reason="not_found",
                           object="migration", id=migration_id)
        if outcome != "succeeded":
            await self._remove_leftover(incoming.vm_id)
        self._bus.publish(TOPIC, {
            "vm_id": incoming.vm_id, "migration_id": migration_id, "role": "destination",
            "phase": outcome, "peer": incoming.source,
            "seconds": round(time.monotonic() - incoming.started, 3)})
        return {}

    async def _remove_leftover(self, vm_id: str) -> None:
        """A failed or cancelled migration's domain, if libvirt left one here."""
        def remove(conn: Connection) -> None:
            try:
                dom = vmops.lookup(conn, vm_id)
            except NotFound:
                return
            state, _ = vmops.state_of(dom)
            if state != "paused":  # only an incoming domain that never resumed is a leftover
                return
            with contextlib.suppress(Exception):  # gone meanwhile: nothing is left
                dom.destroy()

        with contextlib.suppress(ApiError):
            await self._core.hypervisor.call(remove, what=f"removing the leftover of {vm_id}")


def _describe(dom: Domain) -> tuple[str, str, int, bool]:
    """Name, live XML, current memory in bytes and persistence of a domain."""
    info = dom.info()
    return dom.name(), dom.XMLDesc(0), int(info[2]) * 1024, bool(dom.isPersistent())


def _post_copy_here() -> bool:
    """Whether this host's QEMU can take a post-copy migration (blocking reads)."""
    def read(path: str | os.PathLike[str]) -> str:
        try:
            with open(path, encoding="utf-8") as file:
                return file.read()
        except OSError:
            return ""

    conf = read(QEMU_CONF)
    return post_copy_possible(read(USERFAULTFD_SYSCTL), conf, qemu_conf_identity(conf)[0])


def _without_dynamic_labels(root: etree._Element) -> etree._Element:
    """A copy of a running domain's XML without the labels libvirt generated for its
    dynamic security labels: the destination's libvirt makes its own."""
    copy = deepcopy(root)
    for label in copy.iterfind("seclabel[@type='dynamic']"):
        for generated in label.findall("label") + label.findall("imagelabel"):
            label.remove(generated)
    return copy

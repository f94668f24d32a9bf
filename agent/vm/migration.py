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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from lxml import etree

from virtnode.api_schema.params import (
    MigrationFinishParams,
    MigrationPrepareParams,
    VmMigrateParams,
    VolumeCreateParams,
)
from virtnode.config import MigrationConfig
from virtnode.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import DomainEvent
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager, Runner
from virtnode.storage.domains.access import QEMU_CONF, qemu_conf_identity
from virtnode.storage.volumes.service import VolumeService
from virtnode.store import Store
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import migrationstore
from virtnode.vm import ops as vmops
from virtnode.vm.convergence import Follower, Schedule, Step, post_copy_possible, schedule_of
from virtnode.vm.core import VmCore
from virtnode.vm.migrationstore import MigrationRecord
from virtnode.vm.shutdown import STOPPED

log = logging.getLogger(__name__)

TOPIC = "vm.migration"
MIGRATE_JOB = "VM.migrate"
#: How often an end whose peer is gone looks at where the VM is.
SETTLE_INTERVAL = 1.0
#: How long a destination waits for the source's word once the incoming VM is gone.
SOURCE_GRACE = 30.0
#: How long a destination keeps a migration whose VM never came (the source's agent gone,
#: its word lost) before it removes what it made for it.
INCOMING_WAIT = 3600.0
#: Seconds an agent waits for another's answer: a prepare may make volumes.
PREPARE_TIMEOUT = 120.0
PEER_TIMEOUT = 30.0
#: How often a resumed source asks a destination that cannot say where the VM is.
ASK_LIMIT = 60
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
    volumes: list[JsonObject] = field(default_factory=list)  # made for copied disks
    offline: bool = False  # only a definition comes: defined here is arrived


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


def _migrate_params(prepared: dict[str, Any], params: VmMigrateParams) -> dict[str, Any]:
    """libvirt's typed parameters for a prepared migration."""
    migrate_params: dict[str, Any] = {}
    if params.get("max_bandwidth_mibps") is not None:
        migrate_params[vc.MIGRATE_PARAM_BANDWIDTH] = params["max_bandwidth_mibps"]
    if prepared["dest_xml"]:
        # The destination's own paths: the volumes it made, its mounts of the domains.
        if prepared["offline"]:
            # A stopped VM's definition is the XML; libvirt takes either parameter.
            migrate_params[vc.MIGRATE_PARAM_DEST_XML] = prepared["dest_xml"]
            migrate_params[vc.MIGRATE_PARAM_PERSIST_XML] = prepared["dest_xml"]
        else:
            migrate_params[vc.MIGRATE_PARAM_DEST_XML] = prepared["dest_xml"]
            if prepared["dest_persistent_xml"] and prepared["persistent"]:
                migrate_params[vc.MIGRATE_PARAM_PERSIST_XML] = prepared["dest_persistent_xml"]
    if prepared["copied"]:
        # QEMU's NBD server at the destination listens at the address this agent
        # reached it on.
        host = prepared["host"]
        migrate_params[vc.MIGRATE_PARAM_MIGRATE_DISKS] = prepared["copied"]
        migrate_params[vc.MIGRATE_PARAM_URI] = (f"tcp://[{host}]" if ":" in host
                                                else f"tcp://{host}")
    return migrate_params


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
        if prepared["copied"]:
            flags |= vc.MIGRATE_NON_SHARED_DISK
    if prepared["shared_disks"]:
        # libvirt takes ext4 and the like for local storage; every disk was found on a
        # storage domain that the destination has attached too, so it is shared.
        flags |= vc.MIGRATE_UNSAFE
    return flags


def _bridges(root: etree._Element) -> list[str]:
    return sorted({str(source.get("bridge")) for source in
                   root.iterfind("devices/interface[@type='bridge']/source")
                   if source.get("bridge")})


def _disk_files(root: etree._Element) -> list[tuple[str, str]]:
    """``(target, file)`` of the domain's disks that are files."""
    found = []
    for disk in root.iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is not None and source.get("file"):
            found.append((str(target.get("dev", "")) if target is not None else "",
                          str(source.get("file"))))
    return found


def _media_files(root: etree._Element) -> set[str]:
    """The files in the domain's CD-ROM drives."""
    found = set()
    for disk in root.iterfind("devices/disk[@device='cdrom']"):
        source = disk.find("source")
        if source is not None and source.get("file"):
            found.add(str(source.get("file")))
    return found


def _under(path: str, dirs: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(d).rstrip("/") + "/") for d in dirs)


class MigrationService:
    """Both ends of a migration: the ``VM.migrate`` jobs this host sends, and the
    migrations it takes in."""

    def __init__(self, core: VmCore, bus: EventBus, jobs: JobManager,
                 config: MigrationConfig, *, host_id: Callable[[], str],
                 connect: PeerConnector,
                 storage_dirs: Callable[[], Mapping[str, str]] = dict,
                 volumes: VolumeService | None = None, store: Store | None = None) -> None:
        self._core = core
        self._bus = bus
        self._jobs = jobs
        self._config = config
        self._host_id = host_id
        self._connect = connect
        self._storage_dirs = storage_dirs
        self._volumes = volumes
        self._outgoing_slots = asyncio.Semaphore(config.max_outgoing)
        self._incoming: dict[str, _Incoming] = {}
        self._completed: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._store = store
        #: What the previous run left: the source ends, by VM (destination ends go to
        #: _incoming); set once loaded.
        self._left: dict[str, MigrationRecord] = {}
        self._loaded = asyncio.Event()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: The migrations this host sends, by VM: their id and the destination's UUID.
        self._sending: dict[str, JsonObject] = {}
        #: Incoming migrations being prepared: their VM, by migration id.
        self._preparing: dict[str, str] = {}
        jobs.register(JobKind(MIGRATE_JOB, cancellable=True, resume=self._resume))
        core.hypervisor.add_domain_listener(self._on_domain_event)

    def migration_of(self, vm_id: str) -> JsonObject | None:
        """The migration VM ``vm_id`` is in, as ``VM.getInfo`` and ``VM.list`` show it."""
        sending = self._sending.get(vm_id)
        if sending is not None:
            return {"role": "source", **sending}
        for migration_id, incoming in self._incoming.items():
            if incoming.vm_id == vm_id:
                return {"role": "destination", "migration_id": migration_id,
                        "peer": incoming.source}
        return None

    async def start(self) -> None:
        """Load the migrations a previous run left unsettled (before the jobs resume):
        incoming ones are watched until the VM runs here or is gone; outgoing ones are
        settled by their resumed ``VM.migrate`` job."""
        if self._store is not None:
            store = self._store
            await store.ensure_schema(migrationstore.COMPONENT, migrationstore.VERSION,
                                      migrationstore.SCHEMA)
            for record in await store.run(migrationstore.load_all):
                if record.role == "source":
                    self._left[record.vm_id] = record
                else:
                    log.info("migration %s of VM %s was coming in when the agent stopped",
                             record.migration_id, record.vm_id)
                    self._incoming[record.migration_id] = _Incoming(
                        record.vm_id, record.peer, volumes=list(record.volumes),
                        offline=record.offline)
                    self._watch(record.migration_id)
        self._loaded.set()

    async def close(self) -> None:
        watchers, self._watchers = list(self._watchers.values()), {}
        for task in watchers:
            task.cancel()
        for task in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _record(self, record: MigrationRecord) -> None:
        if self._store is not None:
            await self._store.run(lambda conn: migrationstore.save(conn, record))

    async def _forget(self, migration_id: str) -> None:
        if self._store is None:
            return
        try:
            await self._store.run(lambda conn: migrationstore.delete(conn, migration_id))
        except Exception:  # the migration has ended: a stale record is settled next start
            log.exception("could not remove the record of migration %s", migration_id)

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
        copy = params["storage"] == "copy"
        if copy and params["mode"] == "offline":
            raise InvalidArgument("storage copy moves the disks of a running VM; an offline "
                                  "migration moves a definition only", reason="bad_storage",
                                  field="storage")
        if copy and "destination_sd_id" not in params:
            raise InvalidArgument("storage copy needs destination_sd_id",
                                  reason="missing_field", field="destination_sd_id")
        migration_id = str(uuid.uuid4())
        prepared: dict[str, Any] = {"schedule": schedule}

        async def run(handle: JobHandle) -> JsonObject:
            return await self._run(handle, migration_id, vm_id, prepared, params)

        job = await self._jobs.submit(
            MIGRATE_JOB,
            {k: v for k, v in params.items() if k != "request_key"},
            run, description=f"migrate VM {vm_id} to {destination}", target=vm_id,
            request_key=params.get("request_key"),
            prepare=lambda: self._prepared(params, host, migration_id, prepared),
        )
        return {"job_id": job.job_id, "job": job.to_api()}

    @contextlib.asynccontextmanager
    async def _prepared(self, params: VmMigrateParams, host: str, migration_id: str,
                        prepared: dict[str, Any]) -> AsyncIterator[None]:
        """Everything checked and the destination ready, before the job exists; held (the
        VM's lock, the destination's connection) until the job ends."""
        vm_id, destination, mode = params["vm_id"], params["destination"], params["mode"]
        copy = params["storage"] == "copy"
        core = self._core
        core.require_ready()
        if vm_id in self._sending:
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
            found = await core.on_vm(vm_id, _describe)
            memory = 0 if mode == "offline" else found.memory  # offline: needed once started
            root = parse_xml(found.xml, what="domain XML")
            copied = await core.on_vm(vm_id, lambda dom: _copied_disks(dom, root)) if copy \
                else []
            domains = dict(self._storage_dirs())
            disks = await self._shared_disks(vm_id, root, copied, list(domains.values()))
            request: JsonObject = {
                "migration_id": migration_id, "vm_id": vm_id, "name": found.name,
                "xml": found.xml, "memory_bytes": memory,
                "source_host_uuid": self._host_id(), "host": host,
                "post_copy": mode == "live" and prepared["schedule"].post_copy,
                "offline": mode == "offline",
                # Where this host has its storage domains: the destination may mount
                # them elsewhere, and then names its own paths.
                "domains": domains}
            if found.persistent_xml is not None:
                request["persistent_xml"] = found.persistent_xml
            if copy:
                request.update(storage="copy", sd_id=params["destination_sd_id"],
                               disks=[d.to_api() for d in copied])
            peer = await self._connect(destination, self._config.connect_timeout)
            try:
                answer = await peer.call("Migration.prepare", request,
                                         timeout=PREPARE_TIMEOUT)
                prepared.update(peer=peer, uri=answer["libvirt_uri"],
                                peer_uuid=answer["host_uuid"], persistent=found.persistent,
                                shared_disks=bool(disks), destination=destination,
                                offline=mode == "offline", host=host,
                                copied=[d.target for d in copied],
                                dest_xml=answer.get("xml"),
                                dest_persistent_xml=answer.get("persistent_xml"),
                                volumes=answer.get("volumes", []))
                self._sending[vm_id] = {"migration_id": migration_id,
                                        "peer": answer["host_uuid"]}
                try:
                    await self._record(MigrationRecord(
                        migration_id, vm_id, "source", answer["host_uuid"], destination,
                        started=time.time()))
                    yield
                finally:
                    self._sending.pop(vm_id, None)
                    if not prepared.get("finished"):  # no job ran: release the destination
                        with contextlib.suppress(ApiError, OSError):
                            await asyncio.shield(peer.call("Migration.finish", {
                                "migration_id": migration_id, "outcome": "failed"},
                                timeout=PEER_TIMEOUT))
                    await asyncio.shield(self._forget(migration_id))
            finally:
                await peer.close()

    # --- the source, after a restart ------------------------------------------------------

    def _resume(self, params: JsonObject) -> Runner:
        """The runner of a ``VM.migrate`` job the agent was running when it stopped."""
        async def run(handle: JobHandle) -> JsonObject:
            return await self._recover(handle, str(params["vm_id"]), params)
        return run

    async def _recover(self, handle: JobHandle, vm_id: str, params: JsonObject) -> JsonObject:
        """Find out from libvirt how the migration the previous run started went (it goes
        on in libvirtd without the agent), follow it to its end, tell the destination."""
        await self._loaded.wait()
        record = self._left.pop(vm_id, None)
        core = self._core
        while not await core.wait_recovered(3600):
            pass  # the hypervisor connection comes back: the VMs are known again
        if record is None:
            # Not agreed with the destination yet, or settled and forgotten just before
            # the agent stopped: where the VM is says which.
            if await self._moved(vm_id):
                return {"vm_id": vm_id, "destination": params.get("destination"),
                        "recovered": True}
            raise Aborted("the agent stopped before the migration was agreed with the "
                          "destination; the VM runs here", reason="interrupted")
        event: JsonObject = {"vm_id": vm_id, "migration_id": record.migration_id,
                             "role": "source", "peer": record.peer}
        outcome = "failed"
        started = time.monotonic()
        try:
            async with core.locks.hold(vm_id, "VM.migrate"):
                self._sending[vm_id] = {"migration_id": record.migration_id,
                                        "peer": record.peer}
                try:
                    outcome = await self._settle_outgoing(handle, record, params, event)
                finally:
                    self._sending.pop(vm_id, None)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            await asyncio.shield(self._tell(record, outcome))
            self._bus.publish(TOPIC, {**event, "phase": outcome,
                                      "seconds": round(time.monotonic() - started, 3)})
        if outcome != "succeeded":
            raise Aborted(f"the migration of VM {vm_id} failed while the agent was down; "
                          "the VM runs here", reason="migration_failed", object="vm",
                          id=vm_id)
        log.info("the migration of VM %s ended while the agent was down: it runs at %s",
                 vm_id, record.peer_url)
        return {"vm_id": vm_id, "migration_id": record.migration_id,
                "destination": record.peer_url, "destination_host_uuid": record.peer,
                "recovered": True}

    async def _settle_outgoing(self, handle: JobHandle, record: MigrationRecord,
                               params: JsonObject, event: JsonObject) -> str:
        """Where the VM is once libvirt's migration job is over: ``succeeded`` (gone from
        here, or running at the destination) or ``failed`` (running here)."""
        vm_id = record.vm_id
        core = self._core
        follower = Follower(schedule_of(params.get("policy")))
        with contextlib.suppress(ApiError):
            # Its steps go on from the downtime libvirt allows now, never below it.
            follower.raise_floor(await core.on_vm(
                vm_id, lambda dom: dom.migrateGetMaxDowntime(0),
                what=f"reading the migration of {vm_id}"))
        course = _Course(follower, live=True, downtime_set=True)
        asked = 0
        while True:
            if await self._moved(vm_id):
                return "succeeded"
            try:
                stats = await core.on_vm(vm_id, lambda dom: dom.jobStats(),
                                         what=f"reading the migration of {vm_id}")
            except ApiError:
                stats = {}
            if int(stats.get("type", 0) or 0):
                try:  # still running in libvirtd: follow it, with its policy
                    await self._follow(handle, vm_id, course, event)
                    if course.verdict is not None:
                        await self._abort_job(vm_id)
                    await asyncio.sleep(self._config.progress_interval)
                except asyncio.CancelledError:
                    await self._abort_job(vm_id)
                    if await self._moved(vm_id):
                        _keep_going()
                        return "succeeded"
                    raise
                continue
            try:
                state, reason = await core.on_vm(vm_id, vmops.state_of)
            except NotFound:
                return "succeeded"  # it finished between the two looks
            if state != "paused" or reason in ("postcopy", "postcopy_failed"):
                # libvirt ended it here, and resumed the VM if it ran; a failed post-copy
                # is left as libvirt left it, for its own recovery
                return "failed"
            # Paused with no job: the one window where the destination may run it already
            # (the answer to its "finish" was lost). Never resume it blindly.
            there = await self._state_at(record)
            if there == "running":
                log.warning("VM %s runs at %s and is paused here: removing it here",
                            vm_id, record.peer_url)
                await core.on_vm(vm_id, _drop_here, what=f"removing the moved VM {vm_id}")
                return "succeeded"
            if there is None:
                log.warning("VM %s is paused here and not at %s: resuming it", vm_id,
                            record.peer_url)
                await core.on_vm(vm_id, lambda dom: dom.resume(), what=f"resuming {vm_id}")
                return "failed"
            asked += 1
            if asked >= ASK_LIMIT:
                # The destination has it but not running, or cannot say: a person decides.
                raise Aborted(
                    f"VM {vm_id} is paused here and {there} at {record.peer_url}: left "
                    "paused, for an operator to resume here or there",
                    reason="migration_unsettled", object="vm", id=vm_id,
                    destination_state=there)
            await asyncio.sleep(SETTLE_INTERVAL)  # the destination cannot say: ask again

    async def _abort_job(self, vm_id: str) -> None:
        """Abort libvirt's migration job of a VM until no job is left."""
        for _ in range(100):
            try:
                stats = await self._core.on_vm(vm_id, lambda dom: dom.jobStats(),
                                               what=f"reading the migration of {vm_id}")
            except ApiError:
                return
            if not int(stats.get("type", 0) or 0):
                return
            with contextlib.suppress(ApiError):
                await self._core.on_vm(vm_id, lambda dom: dom.abortJob(),
                                       what=f"aborting the migration of {vm_id}")
            await asyncio.sleep(0.2)

    async def _state_at(self, record: MigrationRecord) -> str | None:
        """The VM's state at the destination, None when it has no such VM, ``unknown``
        when it cannot be asked."""
        try:
            peer = await self._connect(record.peer_url, self._config.connect_timeout)
        except ApiError:
            return "unknown"
        try:
            info = await peer.call("VM.getInfo", {"vm_id": record.vm_id},
                                   timeout=PEER_TIMEOUT)
            return str(info.get("state", "unknown"))
        except NotFound:
            return None
        except (ApiError, OSError):
            return "unknown"
        finally:
            await peer.close()

    async def _tell(self, record: MigrationRecord, outcome: str) -> None:
        """Tell the destination how a recovered migration ended; forget it here."""
        try:
            peer = await self._connect(record.peer_url, self._config.connect_timeout)
            try:
                await peer.call("Migration.finish", {"migration_id": record.migration_id,
                                                     "outcome": outcome},
                                timeout=PEER_TIMEOUT)
            finally:
                await peer.close()
        except (ApiError, OSError) as exc:
            log.info("could not tell %s how migration %s ended (it settles on its own): %s",
                     record.peer_url, record.migration_id, exc)
        await self._forget(record.migration_id)

    @staticmethod
    async def _shared_disks(vm_id: str, root: etree._Element, copied: list[_CopiedDisk],
                            dirs: list[str]) -> list[str]:
        """The files of the disks that are not copied, each on a storage domain here
        (else ``storage_not_shared``); the copied disks learn their image."""
        targets = {d.target for d in copied}
        disks = [path for target, path in _disk_files(root) if target not in targets]

        def resolve() -> list[str]:  # realpath: blocking on a hung mount
            for disk in copied:
                disk.image_id = _image_of(disk.path, dirs)
            return [d for d in disks if not _under(d, dirs)]

        local = await asyncio.to_thread(resolve)
        if local:
            raise FailedPrecondition(
                f"disk {local[0]} is on no storage domain: a disk that is not copied "
                "must be on a storage domain attached on both hosts",
                reason="storage_not_shared", object="vm", id=vm_id, path=local[0])
        return disks

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
                    "seconds": round(time.monotonic() - started, 3), **ending,
                    **({"volumes": prepared["volumes"]} if prepared["copied"] else {})}
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            prepared["finished"] = True
            with contextlib.suppress(ApiError, OSError):
                await asyncio.shield(peer.call("Migration.finish", {
                    "migration_id": migration_id, "outcome": outcome},
                    timeout=PEER_TIMEOUT))
            self._bus.publish(TOPIC, {**event, "phase": outcome, **{
                k: v for k, v in ending.items() if k in ("downtime_ms", "post_copy")},
                "seconds": round(time.monotonic() - started, 3)})

    async def _transfer(self, handle: JobHandle, vm_id: str, prepared: dict[str, Any],
                        params: VmMigrateParams, event: JsonObject) -> JsonObject:
        """Have libvirt migrate the VM, following its course; what the end measured."""
        schedule: Schedule = prepared["schedule"]
        live = not prepared["offline"]
        flags = _flags(prepared, schedule)
        migrate_params = _migrate_params(prepared, params)
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
                    _keep_going()
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
        try:
            stats = await asyncio.wait_for(asyncio.shield(completed), COMPLETED_WAIT)
        except TimeoutError:
            return ending
        except asyncio.CancelledError:
            # The VM has moved: a cancel now changes nothing, and is not reported.
            _keep_going()
            return ending
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
        if stats.get("disk_total"):
            figures["disk_total_bytes"] = int(stats["disk_total"])
            figures["disk_remaining_bytes"] = int(stats.get("disk_remaining", 0) or 0)
        if stats.get("downtime") is not None:
            figures["expected_downtime_ms"] = int(stats["downtime"])
        self._bus.publish(TOPIC, {**event, "phase": "migrating", **figures})

    # --- the destination ----------------------------------------------------------------

    async def prepare(self, params: MigrationPrepareParams) -> JsonObject:
        migration_id, vm_id = params["migration_id"], params["vm_id"]
        if params["source_host_uuid"] == self._host_id():
            raise FailedPrecondition("the destination is this host itself",
                                     reason="destination_is_source")
        coming = {**{m: i.vm_id for m, i in self._incoming.items()}, **self._preparing}
        if migration_id in coming or vm_id in coming.values():
            raise FailedPrecondition(f"VM {vm_id} is coming in already",
                                     reason="vm_migrating", object="vm", id=vm_id)
        if len(coming) >= self._config.max_incoming:
            raise ResourceExhausted(
                f"{len(coming)} migrations are coming in already "
                f"(migration.max_incoming)", reason="too_many_migrations")
        self._core.require_ready()
        self._preparing[migration_id] = vm_id  # held from here: no await came before
        try:
            return await self._prepare(params)
        finally:
            self._preparing.pop(migration_id, None)

    async def _prepare(self, params: MigrationPrepareParams) -> JsonObject:
        migration_id, vm_id = params["migration_id"], params["vm_id"]
        root = parse_xml(params["xml"], what="domain XML")
        copied = {d["target"]: d for d in params.get("disks", [])} \
            if params.get("storage") == "copy" else {}
        moved = await self._check_incoming(root, params, set(copied))
        if copied:
            await self._check_space(params["sd_id"], copied.values())
        if params.get("post_copy") and not await asyncio.to_thread(_post_copy_here):
            raise FailedPrecondition(
                "this host's QEMU cannot take a post-copy migration: it needs userfaultfd "
                "(vm.unprivileged_userfaultfd = 1, or QEMU running as root with its "
                "capabilities)", reason="post_copy_unsupported")
        name = params["name"]
        free = await self._core.hypervisor.call(lambda conn: _check_host(conn, vm_id, name),
                                                what="checking an incoming VM")
        await self._check_cpu(root)
        if free < params["memory_bytes"]:
            raise FailedPrecondition(
                f"the VM needs {params['memory_bytes']} bytes of memory; {free} are free",
                reason="insufficient_memory", need=params["memory_bytes"], free=free)
        incoming = _Incoming(vm_id, params["source_host_uuid"],
                             offline=bool(params.get("offline")))
        answer: JsonObject = {
            "libvirt_uri": self._config.libvirt_uri.format(host=params["host"]),
            "host_uuid": self._host_id()}
        try:
            paths = await self._make_disks(params, copied, incoming) if copied else {}
            if paths or moved:
                # This host's own paths: the copies, and its mounts of shared domains.
                answer["xml"] = _with_disks(root, paths, moved)
                if params.get("persistent_xml"):
                    answer["persistent_xml"] = _with_disks(
                        parse_xml(params["persistent_xml"], what="domain XML"), paths, moved)
                answer["volumes"] = [
                    {"target": target, **{k: made["volume"][k] for k in
                                          ("sd_id", "image_id", "volume_id", "path")}}
                    for target, made in zip(copied, incoming.volumes, strict=True)]
                root = parse_xml(str(answer["xml"]), what="domain XML")
            # The incoming VM must pass this host's own policy, as a VM.create would.
            await self._core.vet(_without_dynamic_labels(root), "xml")
        except BaseException:
            await self._remove_volumes(incoming)
            raise
        try:
            await self._record(MigrationRecord(
                migration_id, vm_id, "destination", params["source_host_uuid"],
                volumes=incoming.volumes, started=time.time(), offline=incoming.offline))
        except BaseException:
            await self._remove_volumes(incoming)
            raise
        self._incoming[migration_id] = incoming
        self._watch(migration_id)
        self._bus.publish(TOPIC, {"vm_id": vm_id, "migration_id": migration_id,
                                  "role": "destination", "phase": "preparing",
                                  "peer": params["source_host_uuid"]})
        return answer

    async def _check_cpu(self, root: etree._Element) -> None:
        """This host can give the VM its CPU (libvirt's comparison with what this host's
        hypervisor offers); a comparison libvirt cannot make is logged, not refused."""
        cpu = _cpu_of(root)
        if cpu is None:
            return
        arch, machine, virttype, xml = cpu
        try:
            verdict = await self._core.hypervisor.call(
                lambda conn: conn.compareHypervisorCPU(None, arch, machine, virttype, xml, 0),
                what="comparing the incoming VM's CPU")
        except ApiError as exc:
            log.warning("could not compare the incoming VM's CPU with this host's: %s", exc)
            return
        if verdict == vc.CPU_COMPARE_INCOMPATIBLE:
            model = root.findtext("cpu/model")
            raise FailedPrecondition(
                f"this host cannot give the VM its CPU ({model} and its features)",
                reason="cpu_incompatible", model=model)

    async def _check_incoming(self, root: etree._Element, params: MigrationPrepareParams,
                              copied: set[str]) -> dict[str, str]:
        """The bridges and the disks (but those to be copied) the VM needs are here.
        Returns where the source's storage domains are here (its images directory to
        this host's), for those attached here too."""
        mine = dict(self._storage_dirs())
        moved = {str(there).rstrip("/"): mine[sd_id].rstrip("/")
                 for sd_id, there in params.get("domains", {}).items() if sd_id in mine}
        dirs = list(mine.values())

        def lacking() -> tuple[list[str], list[str]]:
            bridges = [b for b in _bridges(root) if not os.path.isdir(f"/sys/class/net/{b}")]
            disks = [path for target, path in _disk_files(root) if target not in copied
                     and not (_under(_moved(path, moved), dirs)
                              and os.path.exists(_moved(path, moved)))]
            return bridges, disks

        missing, absent = await asyncio.to_thread(lacking)
        if missing:
            raise FailedPrecondition(f"bridge {missing[0]} does not exist on this host",
                                     reason="network_missing", bridge=missing[0])
        if absent and absent[0] in _media_files(root):
            raise FailedPrecondition(
                f"the CD-ROM media {absent[0]} is on no storage domain attached on this host "
                "(media is not copied): eject it (VM.changeMedia) or keep ISO images on a "
                "storage domain both hosts attach", reason="storage_missing", path=absent[0])
        if absent:
            raise FailedPrecondition(
                f"disk {absent[0]} is on no storage domain attached on this host",
                reason="storage_missing", path=absent[0])
        return {there: here for there, here in moved.items() if there != here}

    async def _check_space(self, sd_id: str, disks: Iterable[JsonObject]) -> None:
        if self._volumes is None:
            raise FailedPrecondition("this agent keeps no volumes", reason="storage_missing",
                                     sd_id=sd_id)
        try:
            free = await self._volumes.free_bytes(sd_id)
        except NotFound:
            raise FailedPrecondition(f"no storage domain {sd_id} is attached on this host",
                                     reason="storage_missing", sd_id=sd_id) from None
        need = sum(int(d["need_bytes"]) for d in disks)
        if need > free:
            raise FailedPrecondition(
                f"the disks need {need} bytes; storage domain {sd_id} has {free} free",
                reason="insufficient_space", need=need, free=free, sd_id=sd_id)

    async def _make_disks(self, params: MigrationPrepareParams,
                          copied: dict[str, JsonObject],
                          incoming: _Incoming) -> dict[str, tuple[str, str]]:
        """A volume for each copied disk: its path and format by target."""
        paths: dict[str, tuple[str, str]] = {}
        for target, disk in copied.items():
            volume = await self._new_volume(params["sd_id"], disk)
            incoming.volumes.append(volume)
            paths[target] = (str(volume["path"]), str(disk["format"]))
        return paths

    async def _new_volume(self, sd_id: str, disk: JsonObject) -> JsonObject:
        assert self._volumes is not None
        request: VolumeCreateParams = {
            "sd_id": sd_id, "size": int(disk["capacity"]),
            "format": "qcow2" if disk["format"] == "qcow2" else "raw",
            "allocation": "sparse", "shared": False,
            "description": "copied by a migration"}
        if disk.get("image_id"):
            request["image_id"] = str(disk["image_id"])
        try:
            try:
                created = await self._volumes.create(request)
            except AlreadyExists:
                # The image is here already (the VM was here before): a new one.
                request.pop("image_id", None)
                created = await self._volumes.create(request)
        except ResourceExhausted as exc:
            raise FailedPrecondition(exc.message, reason="insufficient_space",
                                     sd_id=sd_id) from None
        volume = created["volume"]
        assert isinstance(volume, dict)
        return {"volume": volume, "path": volume["path"]}

    async def _remove_volumes(self, incoming: _Incoming) -> None:
        """The volumes made for a migration that did not happen."""
        if self._volumes is None:
            return
        for made in incoming.volumes:
            volume = made["volume"]
            try:
                await self._volumes.delete({"sd_id": volume["sd_id"],
                                            "image_id": volume["image_id"],
                                            "volume_id": volume["volume_id"]})
            except ApiError as exc:
                log.warning("could not remove volume %s made for a migration: %s",
                            volume["volume_id"], exc)
        incoming.volumes.clear()

    async def finish(self, params: MigrationFinishParams) -> JsonObject:
        migration_id = params["migration_id"]
        if migration_id not in self._incoming:
            raise NotFound(f"no migration {migration_id} is coming in", reason="not_found",
                           object="migration", id=migration_id)
        await self._settle_incoming(migration_id, params["outcome"])
        return {}

    async def _settle_incoming(self, migration_id: str, outcome: str) -> None:
        """An incoming migration ended: on failure, what it left here goes."""
        incoming = self._incoming.pop(migration_id, None)
        if incoming is None:
            return  # settled already (by the source, or seen here)
        watcher = self._watchers.pop(migration_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if outcome != "succeeded":
            await self._remove_leftover(incoming.vm_id)
            await self._remove_volumes(incoming)
        await self._forget(migration_id)
        self._bus.publish(TOPIC, {
            "vm_id": incoming.vm_id, "migration_id": migration_id, "role": "destination",
            "phase": outcome, "peer": incoming.source,
            "seconds": round(time.monotonic() - incoming.started, 3)})

    def _watch(self, migration_id: str) -> None:
        self._watchers[migration_id] = asyncio.create_task(
            self._watch_incoming(migration_id), name=f"migration-in-{migration_id}")

    async def _watch_incoming(self, migration_id: str) -> None:
        """Settle an incoming migration from what libvirt shows, should the source never
        say (its agent died): the VM running here is ours; a VM that came and went
        failed (libvirt removes a failed incoming domain)."""
        seen = False
        gone: float | None = None
        waiting_since = time.monotonic()
        while migration_id in self._incoming:
            vm_id = self._incoming[migration_id].vm_id
            if not seen and time.monotonic() - waiting_since > INCOMING_WAIT:
                log.warning("migration %s of VM %s never came: removing what was made "
                            "for it", migration_id, vm_id)
                await self._settle_incoming(migration_id, "failed")
                return
            try:
                state, _ = await self._core.on_vm(vm_id, vmops.state_of)
            except NotFound:
                state = None
            except ApiError:  # libvirt is away: look again later
                await asyncio.sleep(SETTLE_INTERVAL)
                continue
            if state == "running" or (state is not None
                                      and self._incoming[migration_id].offline):
                log.info("VM %s is here: migration %s succeeded", vm_id, migration_id)
                await self._settle_incoming(migration_id, "succeeded")
                return
            if state is None and seen:
                # The source says how it ended (failed, or cancelled) unless its agent is
                # gone: its word is awaited a while.
                gone = gone if gone is not None else time.monotonic()
                if time.monotonic() - gone >= SOURCE_GRACE:
                    log.info("the incoming VM %s is gone: migration %s failed", vm_id,
                             migration_id)
                    await self._settle_incoming(migration_id, "failed")
                    return
            if state is not None and not seen:
                # libvirt has made the incoming domain: the data is coming.
                self._bus.publish(TOPIC, {
                    "vm_id": vm_id, "migration_id": migration_id, "role": "destination",
                    "phase": "migrating", "peer": self._incoming[migration_id].source})
            seen = seen or state is not None
            await asyncio.sleep(SETTLE_INTERVAL)

    async def _remove_leftover(self, vm_id: str) -> None:
        """A failed or cancelled migration's domain, if libvirt left one here."""
        def remove(conn: Connection) -> None:
            try:
                dom = vmops.lookup(conn, vm_id)
            except NotFound:
                return
            state, reason = vmops.state_of(dom)
            # Only an incoming domain that never ran is a leftover: a paused post-copy
            # domain holds the guest's newest state, wherever its migration failed.
            if state != "paused" or reason not in ("migration", "starting_up"):
                return
            with contextlib.suppress(Exception):  # gone meanwhile: nothing is left
                dom.destroy()

        with contextlib.suppress(ApiError):
            await self._core.hypervisor.call(remove, what=f"removing the leftover of {vm_id}")


@dataclass(frozen=True)
class _Described:
    name: str
    xml: str  # the migratable XML of the running (or defined) domain
    persistent_xml: str | None  # the migratable definition of a persistent VM
    memory: int  # current memory, bytes
    persistent: bool


def _describe(dom: Domain) -> _Described:
    """What the destination is told of a domain."""
    info = dom.info()
    persistent = bool(dom.isPersistent())
    active = bool(dom.isActive())
    xml = dom.XMLDesc(vc.DOMAIN_XML_MIGRATABLE)
    definition = None
    if persistent and active:
        definition = dom.XMLDesc(vc.DOMAIN_XML_MIGRATABLE | vc.DOMAIN_XML_INACTIVE)
    return _Described(dom.name(), xml, definition, int(info[2]) * 1024, persistent)


@dataclass
class _CopiedDisk:
    """A disk that a storage-copy migration copies."""

    target: str
    path: str
    format: str
    capacity: int
    need_bytes: int
    image_id: str | None = None

    def to_api(self) -> JsonObject:
        disk: JsonObject = {"target": self.target, "format": self.format,
                            "capacity": self.capacity, "need_bytes": self.need_bytes}
        if self.image_id is not None:
            disk["image_id"] = self.image_id
        return disk


def _copied_disks(dom: Domain, root: etree._Element) -> list[_CopiedDisk]:
    """The writable file disks of a running domain, with their size and what their data
    takes (every file of the chain, the destination's copy being one file)."""
    copied = []
    for disk in root.iterfind("devices/disk[@device='disk'][@type='file']"):
        source, target = disk.find("source"), disk.find("target")
        if (source is None or target is None or not source.get("file")
                or disk.find("readonly") is not None or disk.find("shareable") is not None):
            continue
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if fmt not in ("raw", "qcow2"):
            raise FailedPrecondition(f"disk {target.get('dev')} is {fmt}: only raw and qcow2 "
                                     "disks are copied", reason="storage_not_copyable")
        files = [str(source.get("file"))]
        files += [str(s.get("file")) for s in disk.iterfind(".//backingStore/source")
                  if s.get("file")]
        need = 0
        for path in files:
            with contextlib.suppress(OSError):
                need += os.stat(path).st_blocks * 512
        capacity = int(dom.blockInfo(str(target.get("dev")))[0])
        copied.append(_CopiedDisk(str(target.get("dev")), files[0], fmt, capacity,
                                  min(need, capacity + capacity // 64 + (16 << 20))))
    return copied


def _image_of(path: str, dirs: Iterable[str]) -> str | None:
    """The image a volume's file belongs to, when it is on a storage domain."""
    if not _under(path, dirs):
        return None
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(os.path.basename(os.path.dirname(os.path.realpath(path)))))
    return None


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


def _check_host(conn: Connection, vm_id: str, name: str) -> int:
    """No VM of that UUID or name here (libvirt would refuse the migration at its end);
    the free memory."""
    try:
        vmops.check_unique(conn, name, vm_id)
    except AlreadyExists as exc:
        raise FailedPrecondition(f"{exc.message} on this host", reason="vm_exists",
                                 object="vm", id=vm_id, clash=exc.reason) from None
    return conn.getFreeMemory()


def _cpu_of(root: etree._Element) -> tuple[str | None, str | None, str | None, str] | None:
    """What libvirt's hypervisor CPU comparison takes of a domain whose CPU is a model
    (host-model is one once running): arch, machine, virt type and the ``<cpu>``.

    None when nothing is checked: with ``check='none'`` (what libvirt gives a domain
    that names no CPU: ``qemu64``) QEMU gives the guest what the host has of the model,
    and libvirt starts it on any host; host-passthrough is not a model either.
    """
    cpu = root.find("cpu")
    if (cpu is None or cpu.get("mode", "custom") != "custom" or cpu.find("model") is None
            or cpu.get("check") == "none"):
        return None
    os_type = root.find("os/type")
    return (os_type.get("arch") if os_type is not None else None,
            os_type.get("machine") if os_type is not None else None,
            root.get("type"), etree.tostring(cpu, encoding="unicode"))


def _moved(path: str, moved: Mapping[str, str]) -> str:
    """A path of the source's, on this host: under this host's mount of its domain."""
    for there, here in moved.items():
        if path.startswith(there + "/"):
            return here + path[len(there):]
    return path


def _with_disks(root: etree._Element, paths: dict[str, tuple[str, str]],
                moved: Mapping[str, str]) -> str:
    """Domain XML with this host's paths: the disks with these targets are the given
    files, each alone; the files of other disks (and their chains) are under this host's
    mounts of the storage domains."""
    copy = deepcopy(root)
    for disk in copy.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in paths:
            for chained in disk.iterfind(".//source[@file]"):
                chained.set("file", _moved(str(chained.get("file")), moved))
            continue
        path, fmt = paths[dev]
        found = disk.find("source")
        source = found if found is not None else etree.SubElement(disk, "source")
        for attr in list(source.attrib):
            if attr != "file":
                del source.attrib[attr]
        source.set("file", path)
        for chain in disk.findall("backingStore"):
            disk.remove(chain)
        # One file, with no backing file: said, so that libvirt follows no chain.
        etree.SubElement(disk, "backingStore")
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", fmt)
    return etree.tostring(copy, encoding="unicode")


def _drop_here(dom: Domain) -> None:
    """Remove a domain that runs elsewhere now: stop it, and its definition here."""
    with contextlib.suppress(Exception):
        dom.destroy()
    if dom.isPersistent():
        # Its NVRAM stays: the file may be what the destination uses.
        dom.undefineFlags(vc.DOMAIN_UNDEFINE_MANAGED_SAVE
                          | vc.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                          | vc.DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _keep_going() -> None:
    """Withdraw a cancel that came too late: the VM has moved, and the job says so."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()

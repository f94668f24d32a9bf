"""The VM service: ``VM.*`` lifecycle methods over the hypervisor owner.

Mutating calls on one VM are serialised in arrival order (:class:`VmLocks`); calls on
different VMs run in parallel. The agent's own data about a VM lives in the domain XML
(``<metadata>``), so after a restart the service rebuilds its view from libvirt alone
and answers mutating calls with ``Unavailable`` (reason ``recovering``) until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from lxml import etree

from virtnode.api_schema.params import (
    VmCreateParams,
    VmDestroyParams,
    VmGetInfoParams,
    VmGetXMLParams,
    VmListParams,
    VmPauseParams,
    VmRebootParams,
    VmResetParams,
    VmResumeParams,
    VmShutdownParams,
    VmStartParams,
    VmUndefineParams,
)
from virtnode.config import VmConfig
from virtnode.errors import (
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.capabilities import parse_capabilities
from virtnode.hypervisor.connection import DomainEvent, Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.util.aio import wait_event
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ops as vmops
from virtnode.vm import pcieports
from virtnode.vm.locks import VmLocks
from virtnode.vm.policy import Policy, check_device, check_domain
from virtnode.vm.shutdown import STOPPED, shutdown
from virtnode.vm.spec import (
    check_domain_xml,
    check_spec,
    domain_xml,
    image_files,
    invalid,
    read_metadata,
    spec_field,
    with_chain,
    written_files,
)
from virtnode.vm.state import is_start_noise, lifecycle, vm_state

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Resolves ``{sd_id, image_id, volume_id}`` (and whether the disk is read-only) to the
#: volume's chain as ``(path, format)``, leaf first.
VolumeResolver = Callable[[JsonObject, bool], Awaitable[Sequence[tuple[str, str]]]]
#: The bridge of a managed network, by the network's name (raises NotFound and
#: FailedPrecondition as :meth:`NetworkService.bridge_of` says).
NetworkResolver = Callable[[str], str]
#: The directories of the attached storage domains that hold volumes.
StorageDirs = Callable[[], Iterable[str]]
#: Held while VM ``vm`` starts writing the files ``paths``: refuses (FailedPrecondition,
#: ``not_leaf``) a volume that is not its image's leaf, and keeps layers from being made
#: over them meanwhile (:meth:`VolumeService.writers`).
Writers = Callable[[Sequence[str], str], contextlib.AbstractAsyncContextManager[None]]

LIFECYCLE_TOPIC = "vm.lifecycle"
DEVICE_TOPIC = "vm.device"
_REBOOT_FLAGS = {"default": 0, "acpi": 1, "agent": 2}
#: Cancelling stops the agent's waiting; the guest keeps any request it has received.
SHUTDOWN_JOB = JobKind("VM.shutdown", cancellable=True)
_SHUTDOWN_FLAGS = {"acpi": vc.DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
                   "agent": vc.DOMAIN_SHUTDOWN_GUEST_AGENT}


def _snapshot(conn: Connection) -> list[tuple[str, str, str]]:
    records = conn.getAllDomainStats(vc.DOMAIN_STATS_STATE, 0)
    return [
        (dom.UUIDString(), dom.name(),
         vm_state(stats.get("state.state", 0), stats.get("state.reason", 0)))
        for dom, stats in records
    ]


class VmGuest:
    """A :class:`~virtnode.vm.shutdown.Guest` backed by libvirt and the event stream."""

    def __init__(self, service: VmService, vm_id: str) -> None:
        self._service = service
        self._vm_id = vm_id

    async def state(self) -> str:
        try:
            state, _ = await self._service.on_vm(self._vm_id, vmops.state_of)
        except NotFound:
            return "removed"
        return state

    async def request(self, method: str) -> None:
        flags = _SHUTDOWN_FLAGS[method]
        await self._service.on_vm(self._vm_id, lambda dom: dom.shutdownFlags(flags))

    async def destroy(self) -> None:
        with contextlib.suppress(NotFound):
            await self._service.on_vm(self._vm_id, lambda dom: dom.destroy())

    async def wait_stopped(self, timeout: float) -> bool:
        return await self._service.wait_stopped(self._vm_id, timeout)


class VmService:
    """Owns the agent's view of VMs; every libvirt call goes via the hypervisor."""

    def __init__(self, hypervisor: Hypervisor, bus: EventBus, config: VmConfig,
                 jobs: JobManager, volumes: VolumeResolver | None = None, *,
                 networks: NetworkResolver | None = None,
                 storage_dirs: StorageDirs | None = None,
                 writers: Writers | None = None) -> None:
        self._hv = hypervisor
        self._volumes = volumes
        self.writers: Writers = writers or (lambda _paths, _vm: contextlib.nullcontext())
        self._networks = networks
        self._storage_dirs = storage_dirs
        self._bus = bus
        self._config = config
        self._jobs = jobs
        jobs.register(SHUTDOWN_JOB)
        self._locks = VmLocks(config.lock_wait)
        self._states: dict[str, str] = {}
        self._names: dict[str, str] = {}
        #: Rises with every change of the view (for renderers that cache what they made).
        self.generation = 0
        self._stop_waiters: dict[str, set[asyncio.Event]] = {}
        self._removals: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._recovered = asyncio.Event()
        self._domain_type: str | None = None

    @property
    def recovering(self) -> bool:
        return not self._recovered.is_set()

    def view(self) -> list[tuple[str, str, str]]:
        """Every VM the agent knows of, running or not: ``(vm_id, name, state)``."""
        return [(vm_id, self._names.get(vm_id, ""), state)
                for vm_id, state in self._states.items()]

    @property
    def locks(self) -> VmLocks:
        return self._locks

    @property
    def hypervisor(self) -> Hypervisor:
        return self._hv

    async def start(self) -> None:
        """Follow domain events and resync after every (re)connect."""
        self._hv.add_domain_listener(self._on_domain_event)
        self._hv.add_connect_hook(self._on_connect)

    async def wait_recovered(self, timeout: float) -> bool:
        """Wait for the first view of the VMs; False if ``timeout`` passed first."""
        return await wait_event(self._recovered, timeout)

    async def close(self) -> None:
        """Nothing of its own runs in the background; kept for the agent's stop stages."""

    # --- plumbing --------------------------------------------------------------------------

    async def on_vm(self, vm_id: str, fn: Callable[[Domain], T], *, what: str = "") -> T:
        """Run ``fn(domain)`` for the VM ``vm_id`` in the libvirt pool."""
        def run(conn: Connection) -> T:
            return fn(vmops.lookup(conn, vm_id))

        try:
            return await self._hv.call(run, what=what or f"operation on VM {vm_id}")
        except NotFound as exc:
            if exc.id is None:
                raise NotFound(exc.message, reason="not_found", object="vm", id=vm_id) from None
            raise

    def require_ready(self) -> None:
        if self.recovering:
            raise Unavailable("the agent is recovering its view of the VMs; retry shortly",
                              reason="recovering")

    async def mutate(self, vm_id: str, method: str, fn: Callable[[Domain], T], *,
                     writes: Sequence[str] = ()) -> T:
        """Run a mutating ``fn(domain)`` holding the VM's lock, and the :attr:`writers`
        guard of the files it ``writes`` (taken after the VM's lock, always)."""
        self.require_ready()
        async with self._locks.hold(vm_id, method), self.writers(writes, vm_id):
            return await self.on_vm(vm_id, fn, what=f"{method} on {vm_id}")

    async def wait_stopped(self, vm_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for VM ``vm_id`` to stop (event-driven, then checked)."""
        stopped = asyncio.Event()
        waiters = self._stop_waiters.setdefault(vm_id, set())
        waiters.add(stopped)
        try:
            await wait_event(stopped, timeout)
        finally:
            waiters.discard(stopped)
            if not waiters:
                self._stop_waiters.pop(vm_id, None)
        try:
            state, _ = await self.on_vm(vm_id, vmops.state_of)
        except NotFound:
            return True
        return state in STOPPED

    def expect_removal(self, vm_id: str, alias: str) -> asyncio.Future[str]:
        """A future resolved with ``removed`` or ``removal_failed`` for a device alias."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._removals[(vm_id, alias)] = future
        future.add_done_callback(lambda _: self._removals.pop((vm_id, alias), None))
        return future

    async def _on_connect(self, _conn: Connection) -> None:
        # Run inside the connect: the connection is announced once the view is rebuilt.
        self._domain_type = None
        await self._resync_states()

    async def _resync_states(self) -> None:
        """Rebuild the view from libvirt; report changes missed while disconnected.

        Raises the API error of a failed listing: the connection is then set up again.
        """
        vms = await self._hv.call(_snapshot, what="listing VMs for recovery")
        first = self.recovering
        if first:
            # What subscribers were last told, from the journal: the agent may have died
            # before it journaled what libvirt did meanwhile (or since).
            self._states, self._names = await self._journaled_view()
        changed = 0
        seen = set()
        for vm_id, name, state in vms:
            seen.add(vm_id)
            previous = self._states.get(vm_id)
            self._states[vm_id] = state
            self._names[vm_id] = name
            if previous != state:
                changed += 1
                self._publish_lifecycle(vm_id, name, event="resync", detail="resync",
                                        state=state, previous=previous)
        for vm_id in set(self._states) - seen:
            previous = self._states.pop(vm_id)
            name = self._names.pop(vm_id, "")
            changed += 1
            self._publish_lifecycle(vm_id, name, event="undefined", detail="resync",
                                    state="removed", previous=previous)
        self.generation += 1
        if first:
            log.info("recovered the view of %d VMs; %d changed since the journal's last "
                     "word on them", len(vms), changed)
        self._recovered.set()

    async def _journaled_view(self) -> tuple[dict[str, str], dict[str, str]]:
        """The states and names of the VMs as the journaled lifecycle events leave them."""
        journal = self._bus.journal
        if journal is None:
            return {}, {}
        last = await journal.last_values(LIFECYCLE_TOPIC, "vm_id", ("state", "name"))
        states = {vm_id: str(v["state"]) for vm_id, v in last.items()
                  if isinstance(v["state"], str) and v["state"] != "removed"}
        names = {vm_id: str(last[vm_id]["name"] or "") for vm_id in states}
        return states, names

    def _on_domain_event(self, event: DomainEvent) -> None:
        if event.kind == "lifecycle":
            previous = self._states.get(event.vm_id)
            name, detail, state = lifecycle(event.event, event.detail, previous)
            if is_start_noise(name, previous):
                return
            self.generation += 1
            if state == "removed":
                self._states.pop(event.vm_id, None)
                self._names.pop(event.vm_id, None)
            else:
                self._states[event.vm_id] = state
                if event.name:
                    self._names[event.vm_id] = event.name
            self._publish_lifecycle(event.vm_id, event.name, event=name, detail=detail,
                                    state=state, previous=previous)
            if state in STOPPED:
                for waiter in self._stop_waiters.get(event.vm_id, ()):
                    waiter.set()
            return
        outcome = "removed" if event.kind == "device_removed" else "removal_failed"
        future = self._removals.get((event.vm_id, event.alias))
        if future is not None and not future.done():
            future.set_result(outcome)
        self._bus.publish(DEVICE_TOPIC, {"vm_id": event.vm_id, "name": event.name,
                                         "alias": event.alias, "event": outcome})

    def _publish_lifecycle(self, vm_id: str, name: str, *, event: str, detail: str,
                           state: str, previous: str | None) -> None:
        self._bus.publish(LIFECYCLE_TOPIC, {
            "vm_id": vm_id, "name": name, "event": event, "detail": detail,
            "state": state, "previous_state": previous or "unknown",
        })

    # --- methods ---------------------------------------------------------------------------

    async def list(self, params: VmListParams) -> JsonObject:
        vms = [
            {"vm_id": vm_id, "name": name, "state": state}
            for vm_id, name, state in await self._hv.call(_snapshot, what="listing VMs")
        ]
        wanted = params.get("state")
        if wanted is not None:
            vms = [vm for vm in vms if vm["state"] == wanted]
        vms.sort(key=lambda vm: (vm["name"], vm["vm_id"]))
        return {"vms": vms}

    async def create(self, params: VmCreateParams) -> JsonObject:
        self.require_ready()
        persistent, start = params["persistent"], params["start"]
        if ("spec" in params) == ("xml" in params):
            raise InvalidArgument("give exactly one of spec or xml", reason="invalid_spec",
                                  field="spec")
        if not persistent and not start:
            raise InvalidArgument("a transient VM exists only while it runs: start must be "
                                  "true when persistent is false", reason="invalid_spec",
                                  field="start")
        metadata = {"owner": "virtnode", "created": f"{time.time():.3f}",
                    "labels": dict(params.get("spec", {}).get("labels", {}))}
        if "spec" in params:
            raw = dict(params["spec"])
            if "disks" in raw:
                raw["disks"] = [await self.resolve_disk(d) for d in raw["disks"]]
            if "nics" in raw:
                raw["nics"] = [self.resolve_nic(n, f"spec.nics.{i}")
                               for i, n in enumerate(raw["nics"])]
            spec = check_spec(raw, await self._default_domain_type())
            name, vm_id = spec.name, spec.uuid
            given = params["spec"].get("disks", [])
            root = parse_xml(domain_xml(spec, metadata))
            await self.vet(root, "xml", lambda field: spec_field(field, given))
        else:
            name, vm_id, xml = check_domain_xml(params["xml"], metadata)
            root = parse_xml(xml, what="domain XML")
            await self.vet(root, "xml")
        spare = self._config.hotplug_ports if pcieports.manages_ports(root) else None
        if spare is not None:
            pcieports.add_ports(root, spare)
        xml = etree.tostring(root, encoding="unicode")
        # Hold the name and the uuid (in that order, as every create does) so that two
        # creates of one name cannot both pass the uniqueness check; others run in parallel.
        async with (self._locks.hold(f"name:{name}", "VM.create"),
                    self._locks.hold(vm_id, "VM.create")):
            await self._hv.call(lambda conn: vmops.check_unique(conn, name, vm_id),
                                what="checking the VM name")

            def make(conn: Connection) -> str:
                dom = vmops.create(conn, xml, persistent=persistent, start=start,
                                   hotplug_ports=spare)
                if start:
                    vmops.mark_started(dom, metadata)
                return vmops.state_of(dom)[0]

            async with self.writers(written_files(root) if start else (), vm_id):
                state = await self._hv.call(make, what=f"creating VM {name}")
        return {"vm_id": vm_id, "name": name, "state": state}

    async def vet(self, element: etree._Element, prefix: str,
                  rename: Callable[[str], str] | None = None) -> None:
        """Check a ``<domain>``, or one device, before it goes to libvirt: the host-access
        policy (:mod:`virtnode.vm.policy`; host paths are replaced resolved), then its
        image files. Runs in a thread: it reads the filesystem. ``rename`` maps the XML
        field of a refusal to the field the caller gave.

        Raises PermissionDenied and InvalidArgument as the policy does, NotFound
        (``no_such_file``) for a missing image and InvalidArgument (``has_backing_file``)
        for a qcow2 image used without a chain that names a backing file (its guest would
        see holes where the backing file's data is).
        """
        dirs = list(self._storage_dirs()) if self._storage_dirs is not None else []

        def check() -> None:
            policy = Policy.of(self._config, dirs)
            if element.tag == "domain":
                check_domain(element, policy, prefix)
            else:
                check_device(element, policy, prefix)
            for path, where, alone in image_files(element, prefix):
                if not os.path.exists(path):
                    raise NotFound(f"no such file: {path}", reason="no_such_file",
                                   object="file", id=path)
                if alone and vmops.names_backing(path):
                    raise InvalidArgument(
                        f"{where}: {path} has a backing file; give it as a volume, or its "
                        "whole chain in the XML", reason="has_backing_file", field=where)

        try:
            await asyncio.to_thread(check)
        except (PermissionDenied, InvalidArgument) as exc:
            where = exc.details.get("field")
            if rename is None or not isinstance(where, str) or rename(where) == where:
                raise
            raise _renamed(exc, where, rename(where)) from None

    async def resolve_disk(self, raw: JsonObject) -> JsonObject:
        """A disk spec with ``volume`` rewritten as its chain's paths; others as given.

        Raises what resolving a volume raises (NotFound, FailedPrecondition), and
        Unavailable when this agent has no volumes.
        """
        if "volume" not in raw:
            return raw
        if self._volumes is None:
            raise Unavailable("volumes are not available", reason="no_volumes")
        chain = await self._volumes(raw["volume"], bool(raw.get("readonly", False)))
        return with_chain(raw, list(chain))

    def resolve_nic(self, raw: JsonObject, field: str) -> JsonObject:
        """A NIC spec on a managed network rewritten to that network's bridge."""
        if "network" not in raw:
            return raw
        if raw.get("bridge") is not None or raw.get("libvirt_network") is not None:
            raise invalid(field, "needs exactly one of bridge, network or libvirt_network")
        if self._networks is None:
            raise Unavailable("managed networks are not available", reason="no_networks")
        nic = {k: v for k, v in raw.items() if k != "network"}
        nic["bridge"] = self._networks(raw["network"])
        return nic

    async def _default_domain_type(self) -> str:
        """kvm when the host has it, else qemu (TCG); read once per connection."""
        def pick(conn: Connection) -> str:
            types = parse_capabilities(conn.getCapabilities())["domain_types"]
            return next((t for t in ("kvm", "qemu", "test") if t in types), "qemu")

        if self._domain_type is None:
            self._domain_type = await self._hv.call(pick, what="reading domain types")
        return self._domain_type

    async def start_vm(self, params: VmStartParams) -> JsonObject:
        vm_id = params["vm_id"]

        def disks(dom: Domain) -> list[str]:
            vmops.require_stopped(dom, vm_id)
            return written_files(parse_xml(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE),
                                           what="domain XML"))

        def run(dom: Domain) -> str:
            vmops.require_stopped(dom, vm_id)
            dom.create()
            vmops.mark_started(dom, read_metadata(dom.XMLDesc(0)))
            return vmops.state_of(dom)[0]

        # The definition can name a volume that has become internal since (a layer was
        # made over it while the VM was off): starting it would change that layer.
        self.require_ready()
        async with self._locks.hold(vm_id, "VM.start"):
            files = await self.on_vm(vm_id, disks, what=f"reading the disks of {vm_id}")
            async with self.writers(files, vm_id):
                state = await self.on_vm(vm_id, run, what=f"VM.start on {vm_id}")
        return {"state": state}

    async def destroy(self, params: VmDestroyParams) -> JsonObject:
        def run(dom: Domain) -> None:
            vmops.require_running(dom, params["vm_id"])
            dom.destroy()

        await self.mutate(params["vm_id"], "VM.destroy", run)
        return {}

    def _state_change(self, method: str, needs: str, action: Callable[[Domain], object]
                      ) -> Callable[[Domain], str]:
        def run(dom: Domain) -> str:
            state, _ = vmops.state_of(dom)
            if state != needs:
                raise FailedPrecondition(f"{method} needs a {needs} VM; it is {state}",
                                         reason=f"vm_not_{needs}", object="vm",
                                         id=dom.UUIDString())
            action(dom)
            return vmops.state_of(dom)[0]

        return run

    async def pause(self, params: VmPauseParams) -> JsonObject:
        run = self._state_change("VM.pause", "running", lambda dom: dom.suspend())
        return {"state": await self.mutate(params["vm_id"], "VM.pause", run)}

    async def resume(self, params: VmResumeParams) -> JsonObject:
        run = self._state_change("VM.resume", "paused", lambda dom: dom.resume())
        return {"state": await self.mutate(params["vm_id"], "VM.resume", run)}

    async def reset(self, params: VmResetParams) -> JsonObject:
        run = self._state_change("VM.reset", "running", lambda dom: dom.reset(0))
        return {"state": await self.mutate(params["vm_id"], "VM.reset", run)}

    async def reboot(self, params: VmRebootParams) -> JsonObject:
        flags = _REBOOT_FLAGS[params["method"]]
        run = self._state_change("VM.reboot", "running", lambda dom: dom.reboot(flags))
        return {"state": await self.mutate(params["vm_id"], "VM.reboot", run)}

    async def undefine(self, params: VmUndefineParams) -> JsonObject:
        vm_id, force = params["vm_id"], params["force"]

        def run(dom: Domain) -> None:
            state, _ = vmops.state_of(dom)
            if state not in ("shutoff", "defined", "crashed"):
                if not force:
                    raise FailedPrecondition(
                        f"VM {vm_id} is {state}; stop it first or pass force",
                        reason="vm_running", object="vm", id=vm_id)
                persistent = dom.isPersistent()
                dom.destroy()
                if not persistent:
                    return  # a transient VM is gone once destroyed
            vmops.undefine(dom)

        await self.mutate(vm_id, "VM.undefine", run)
        return {}

    async def shutdown(self, params: VmShutdownParams) -> JsonObject:
        vm_id, timeout, fallback = params["vm_id"], params["timeout"], params["fallback"]
        methods = tuple(dict.fromkeys(params["methods"]))
        if not methods:
            raise InvalidArgument("methods must name at least one of agent, acpi",
                                  reason="invalid_spec", field="methods")
        request_key = params.get("request_key")
        if not params["async"]:
            if request_key is not None:
                raise InvalidArgument("request_key is for async calls only",
                                      reason="request_key_needs_async", field="request_key")
            async with self._hold_running(vm_id, "VM.shutdown"):
                return await self._shutdown(vm_id, methods, timeout, fallback)

        async def run(handle: JobHandle) -> JsonObject:
            ticker = asyncio.create_task(_tick(handle, timeout), name=f"progress {handle.job_id}")
            try:
                return await self._shutdown(vm_id, methods, timeout, fallback)
            finally:
                ticker.cancel()

        job = await self._jobs.submit(
            SHUTDOWN_JOB.name,
            {k: v for k, v in params.items() if k not in ("async", "request_key")},
            run, description=f"shut down VM {vm_id}", target=vm_id, request_key=request_key,
            prepare=lambda: self._hold_running(vm_id, "VM.shutdown"),
        )
        return {"job_id": job.job_id, "job": job.to_api()}

    @contextlib.asynccontextmanager
    async def _hold_running(self, vm_id: str, method: str) -> AsyncIterator[None]:
        """Hold a VM that is running: an unknown VM is NotFound, as for every method, and
        a job is only made for a request that can start.

        Raises ``Unavailable`` (recovering), ``Aborted`` (busy), ``NotFound`` and
        ``FailedPrecondition`` (``vm_not_running``).
        """
        self.require_ready()
        async with self._locks.hold(vm_id, method):
            state, _ = await self.on_vm(vm_id, vmops.state_of)
            if state in STOPPED:
                raise FailedPrecondition(f"the VM is not running (state {state})",
                                         reason="vm_not_running", object="vm", id=vm_id)
            yield

    async def _shutdown(self, vm_id: str, methods: tuple[str, ...], timeout: float,
                        fallback: str) -> JsonObject:
        outcome = await shutdown(VmGuest(self, vm_id), methods=methods, timeout=timeout,
                                 fallback=fallback, acpi_interval=self._config.acpi_interval)
        return {"stopped_by": outcome.stopped_by, "seconds": round(outcome.seconds, 3),
                "tried": list(outcome.tried)}

    async def get_info(self, params: VmGetInfoParams) -> JsonObject:
        info = await self.on_vm(params["vm_id"], vmops.info)
        operation = self._locks.holder(params["vm_id"])
        info["operation"] = None if operation is None else operation.describe()
        return info

    async def get_xml(self, params: VmGetXMLParams) -> JsonObject:
        flags = vc.DOMAIN_XML_INACTIVE if params["inactive"] else 0
        return {"xml": await self.on_vm(params["vm_id"], lambda dom: dom.XMLDesc(flags))}


async def _tick(handle: JobHandle, timeout: float) -> None:
    """Report the share of ``timeout`` spent as progress (short of 100 until the end)."""
    started = time.monotonic()
    while True:
        handle.progress(min(99.0, (time.monotonic() - started) / timeout * 100))
        await asyncio.sleep(1.0)


def _renamed(exc: ApiError, old: str, new: str) -> ApiError:
    message = exc.message.replace(old, new, 1)
    return type(exc)(message, reason=exc.reason, object=exc.object, id=exc.id,
                     **{**exc.details, "field": new})

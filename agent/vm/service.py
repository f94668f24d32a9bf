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
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from lxml import etree

from virtnode.api_schema.params import (
    VmCreateParams,
    VmDestroyParams,
    VmFreezeParams,
    VmGetInfoParams,
    VmGetXMLParams,
    VmListParams,
    VmPauseParams,
    VmRebootParams,
    VmResetParams,
    VmResumeParams,
    VmShutdownParams,
    VmStartParams,
    VmThawParams,
    VmUndefineParams,
)
from virtnode.config import GuestAgentConfig, VmConfig
from virtnode.errors import (
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from virtnode.events.bus import EventBus
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import DomainEvent, Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.jobs.manager import JobHandle, JobKind, JobManager
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import cloudinit, pcieports
from virtnode.vm import ops as vmops
from virtnode.vm.core import (
    Images,
    NetworkResolver,
    StorageDirs,
    VmCore,
    VolumeResolver,
    Writers,
)
from virtnode.vm.guestagent import GuestAgents
from virtnode.vm.locks import VmLocks
from virtnode.vm.shutdown import STOPPED, shutdown
from virtnode.vm.spec import (
    Spec,
    check_domain_xml,
    check_spec,
    domain_xml,
    read_metadata,
    seed_element,
    spec_field,
    written_files,
)
from virtnode.vm.state import is_start_noise, lifecycle, vm_state

log = logging.getLogger(__name__)

T = TypeVar("T")
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

    def __init__(self, core: VmCore, guests: GuestAgents, vm_id: str) -> None:
        self._service = core
        self._guests = guests
        self._vm_id = vm_id

    async def state(self) -> str:
        try:
            state, _ = await self._service.on_vm(self._vm_id, vmops.state_of)
        except NotFound:
            return "removed"
        return state

    async def request(self, method: str) -> None:
        flags = _SHUTDOWN_FLAGS[method]
        if method == "agent":
            # Skipped at once when no guest agent is there to ask, and asked with the
            # guest agent's deadline when one is.
            self._guests.require_connected(self._vm_id, "shutting down through the agent")
            await self._guests.command(self._vm_id, lambda dom: dom.shutdownFlags(flags),
                                       "VM.shutdown")
            return
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
                 writers: Writers | None = None, images: Images | None = None,
                 guest_agent: GuestAgentConfig | None = None) -> None:
        #: What this service and the device service share; see :mod:`virtnode.vm.core`.
        self.core = core = VmCore(hypervisor, config, volumes, networks=networks,
                                  storage_dirs=storage_dirs, writers=writers, images=images)
        self._hv = hypervisor
        self._locks = core.locks
        self._bus = bus
        self._config = config
        self._jobs = jobs
        #: The guest agents of the running VMs.
        self.guests = GuestAgents(hypervisor, bus, guest_agent or GuestAgentConfig())
        jobs.register(SHUTDOWN_JOB)
        self._states: dict[str, str] = {}
        self._names: dict[str, str] = {}
        #: Rises with every change of the view (for renderers that cache what they made).
        self.generation = 0
        #: The migration a VM is in, if any (set by the migration service).
        self.migration_of: Callable[[str], JsonObject | None] = lambda _vm_id: None

    @property
    def recovering(self) -> bool:
        return self.core.recovering

    def view(self) -> list[tuple[str, str, str]]:
        """Every VM the agent knows of, running or not: ``(vm_id, name, state)``."""
        return [(vm_id, self._names.get(vm_id, ""), state)
                for vm_id, state in self._states.items()]

    @property
    def locks(self) -> VmLocks:
        return self._locks

    async def start(self) -> None:
        """Follow domain events and resync after every (re)connect."""
        self._hv.add_domain_listener(self._on_domain_event)
        self._hv.add_connect_hook(self._on_connect)
        await self.guests.start()

    async def wait_recovered(self, timeout: float) -> bool:
        """Wait for the first view of the VMs; False if ``timeout`` passed first."""
        return await self.core.wait_recovered(timeout)

    async def close(self) -> None:
        """Stop following the guest agents."""
        await self.guests.close()

    async def _on_connect(self, _conn: Connection) -> None:
        # Run inside the connect: the connection is announced once the view is rebuilt.
        self.core.forget_domain_type()
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
        self.core.recovered()

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
                self.core.stopped(event.vm_id)
            return
        outcome = "removed" if event.kind == "device_removed" else "removal_failed"
        self.core.device_outcome(event.vm_id, event.alias, outcome)
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
        vms: list[JsonObject] = [
            {"vm_id": vm_id, "name": name, "state": state}
            for vm_id, name, state in await self._hv.call(_snapshot, what="listing VMs")
        ]
        for vm in vms:
            migration = self.migration_of(str(vm["vm_id"]))
            if migration is not None:
                vm["migration"] = migration
        wanted = params.get("state")
        if wanted is not None:
            vms = [vm for vm in vms if vm["state"] == wanted]
        vms.sort(key=lambda vm: (vm["name"], vm["vm_id"]))
        return {"vms": vms}

    async def create(self, params: VmCreateParams) -> JsonObject:
        self.core.require_ready()
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
        spec, seed = None, None
        if "spec" in params:
            raw = dict(params["spec"])
            if "disks" in raw:
                raw["disks"] = [await self.core.resolve_disk(d) for d in raw["disks"]]
            if "cdroms" in raw:
                raw["cdroms"] = [await self.core.resolve_media(c, f"spec.cdroms.{i}")
                                 for i, c in enumerate(raw["cdroms"])]
            if "nics" in raw:
                raw["nics"] = [self.core.resolve_nic(n, f"spec.nics.{i}")
                               for i, n in enumerate(raw["nics"])]
            spec = check_spec(raw, await self.core.default_domain_type())
            name, vm_id = spec.name, spec.uuid
            if spec.cloud_init is not None:
                seed = self._seed_place(params["spec"], persistent)
                metadata["seed"] = "/".join(seed)
            given = params["spec"]
            root = parse_xml(domain_xml(spec, metadata))
            await self.core.vet(root, "xml", lambda field: spec_field(
                field, given.get("disks", []), given.get("cdroms", [])))
        else:
            name, vm_id, xml = check_domain_xml(params["xml"], metadata)
            root = parse_xml(xml, what="domain XML")
            await self.core.vet(root, "xml")
        spare = self._config.hotplug_ports if pcieports.manages_ports(root) else None
        if spare is not None:
            pcieports.add_ports(root, spare)
        # Hold the name and the uuid (in that order, as every create does) so that two
        # creates of one name cannot both pass the uniqueness check; others run in parallel.
        async with (self._locks.hold(f"name:{name}", "VM.create"),
                    self._locks.hold(vm_id, "VM.create")):
            await self._hv.call(lambda conn: vmops.check_unique(conn, name, vm_id),
                                what="checking the VM name")
            if spec is not None and seed is not None:
                path = await self._make_seed(spec, seed)
                devices = root.find("devices")
                assert devices is not None
                devices.append(seed_element(spec, path))
            xml = etree.tostring(root, encoding="unicode")

            def make(conn: Connection) -> str:
                dom = vmops.create(conn, xml, persistent=persistent, start=start,
                                   hotplug_ports=spare)
                if start:
                    vmops.mark_started(dom, metadata)
                return vmops.state_of(dom)[0]

            try:
                async with self.core.writers(written_files(root) if start else (), vm_id):
                    state = await self._hv.call(make, what=f"creating VM {name}")
            except BaseException:
                if seed is not None:
                    await self._remove_seed(seed, vm_id)
                raise
        return {"vm_id": vm_id, "name": name, "state": state}

    def _seed_place(self, spec: JsonObject, persistent: bool) -> tuple[str, str, str]:
        """``(sd_id, image_id, volume_id)`` for a new VM's cloud-init seed: in the storage
        domain named, or that of its first disk given as a volume."""
        if self.core.images is None:
            raise Unavailable("volumes are not available", reason="no_volumes")
        if not persistent:
            raise InvalidArgument(
                "spec.cloud_init: a transient VM cannot have cloud-init (its seed is removed "
                "with the VM, which a transient VM never is)", reason="invalid_cloud_init",
                field="spec.cloud_init")
        sd_id = spec["cloud_init"].get("sd_id") or next(
            (d["volume"]["sd_id"] for d in spec.get("disks", []) if "volume" in d), None)
        if sd_id is None:
            raise InvalidArgument(
                "spec.cloud_init.sd_id: the seed needs a storage domain: give sd_id, or a "
                "disk from a volume", reason="invalid_cloud_init", field="spec.cloud_init.sd_id")
        return str(sd_id), str(uuid.uuid4()), str(uuid.uuid4())

    async def _make_seed(self, spec: Spec, seed: tuple[str, str, str]) -> str:
        """Build the NoCloud seed of ``spec`` into a new ISO volume; returns its path."""
        assert spec.cloud_init is not None and self.core.images is not None
        data = await asyncio.to_thread(cloudinit.seed_image, spec.cloud_init)
        sd_id, image_id, volume_id = seed
        volume = await self.core.images.create_image(
            sd_id, data, content="iso", description=f"cloud-init seed of VM {spec.name} "
            f"({spec.uuid})", image_id=image_id, volume_id=volume_id, method="VM.create")
        return str(volume["path"])

    async def _remove_seed(self, seed: Sequence[str], vm_id: str) -> None:
        """Remove a VM's cloud-init seed; a failure is logged (the seed stays, an ISO
        volume its description names), never raised over what the caller was doing."""
        if self.core.images is None or len(seed) != 3:
            return
        try:
            await self.core.images.remove_image(*seed)
        except ApiError as exc:
            log.warning("the cloud-init seed %s of VM %s stays: %s", "/".join(seed), vm_id,
                        exc.message)

    async def start_vm(self, params: VmStartParams) -> JsonObject:
        vm_id = params["vm_id"]

        def disks(dom: Domain) -> list[str]:
            vmops.require_stopped(dom, vm_id)
            xml = dom.XMLDesc(vc.DOMAIN_XML_INACTIVE)
            if (read_metadata(xml) or {}).get("template") == "yes":
                raise FailedPrecondition(
                    f"VM {vm_id} is a template: its disks are shared and never written; "
                    "start a clone of it (VM.clone)", reason="is_template", object="vm",
                    id=vm_id)
            return written_files(parse_xml(xml, what="domain XML"))

        def run(dom: Domain) -> str:
            vmops.require_stopped(dom, vm_id)
            dom.create()
            vmops.mark_started(dom, read_metadata(dom.XMLDesc(0)))
            return vmops.state_of(dom)[0]

        # The definition can name a volume that has become internal since (a layer was
        # made over it while the VM was off): starting it would change that layer.
        self.core.require_ready()
        async with self._locks.hold(vm_id, "VM.start"):
            files = await self.core.on_vm(vm_id, disks, what=f"reading the disks of {vm_id}")
            async with self.core.writers(files, vm_id):
                state = await self.core.on_vm(vm_id, run, what=f"VM.start on {vm_id}")
        return {"state": state}

    async def destroy(self, params: VmDestroyParams) -> JsonObject:
        def run(dom: Domain) -> None:
            vmops.require_running(dom, params["vm_id"])
            dom.destroy()

        await self.core.mutate(params["vm_id"], "VM.destroy", run)
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
        return {"state": await self.core.mutate(params["vm_id"], "VM.pause", run)}

    async def resume(self, params: VmResumeParams) -> JsonObject:
        run = self._state_change("VM.resume", "paused", lambda dom: dom.resume())
        return {"state": await self.core.mutate(params["vm_id"], "VM.resume", run)}

    async def reset(self, params: VmResetParams) -> JsonObject:
        run = self._state_change("VM.reset", "running", lambda dom: dom.reset(0))
        return {"state": await self.core.mutate(params["vm_id"], "VM.reset", run)}

    async def reboot(self, params: VmRebootParams) -> JsonObject:
        flags = _REBOOT_FLAGS[params["method"]]
        run = self._state_change("VM.reboot", "running", lambda dom: dom.reboot(flags))
        return {"state": await self.core.mutate(params["vm_id"], "VM.reboot", run)}

    async def undefine(self, params: VmUndefineParams) -> JsonObject:
        vm_id, force = params["vm_id"], params["force"]

        def run(dom: Domain) -> str:
            seed = str((read_metadata(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE)) or {})
                       .get("seed", ""))
            state, _ = vmops.state_of(dom)
            if state not in ("shutoff", "defined", "crashed"):
                if not force:
                    raise FailedPrecondition(
                        f"VM {vm_id} is {state}; stop it first or pass force",
                        reason="vm_running", object="vm", id=vm_id)
                persistent = dom.isPersistent()
                dom.destroy()
                if not persistent:
                    return seed  # a transient VM is gone once destroyed
            vmops.undefine(dom)
            return seed

        seed = await self.core.mutate(vm_id, "VM.undefine", run)
        if seed:
            await self._remove_seed(seed.split("/"), vm_id)
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
        self.core.require_ready()
        async with self._locks.hold(vm_id, method):
            state, _ = await self.core.on_vm(vm_id, vmops.state_of)
            if state in STOPPED:
                raise FailedPrecondition(f"the VM is not running (state {state})",
                                         reason="vm_not_running", object="vm", id=vm_id)
            yield

    async def _shutdown(self, vm_id: str, methods: tuple[str, ...], timeout: float,
                        fallback: str) -> JsonObject:
        outcome = await shutdown(VmGuest(self.core, self.guests, vm_id), methods=methods,
                                 timeout=timeout,
                                 fallback=fallback, acpi_interval=self._config.acpi_interval)
        return {"stopped_by": outcome.stopped_by, "seconds": round(outcome.seconds, 3),
                "tried": list(outcome.tried)}

    async def get_info(self, params: VmGetInfoParams) -> JsonObject:
        info = await self.core.on_vm(params["vm_id"], vmops.info)
        operation = self._locks.holder(params["vm_id"])
        info["operation"] = None if operation is None else operation.describe()
        migration = self.migration_of(params["vm_id"])
        if migration is not None:
            info["migration"] = migration
        if info["state"] in ("running", "paused") and not self.guests.known(params["vm_id"]):
            await self.guests.learn(params["vm_id"])  # started a moment ago
        info["guest"] = self.guests.section(params["vm_id"])
        return info

    async def freeze(self, params: VmFreezeParams) -> JsonObject:
        vm_id = params["vm_id"]
        self.core.require_ready()
        async with self._locks.hold(vm_id, "VM.freeze"):
            await self._require_running(vm_id)
            return await self.guests.freeze(vm_id, list(params.get("mountpoints", [])),
                                            params["timeout"])

    async def thaw(self, params: VmThawParams) -> JsonObject:
        vm_id = params["vm_id"]
        self.core.require_ready()
        # Not behind the VM's lock: a thaw must never wait for the call it would unblock.
        await self._require_running(vm_id)
        self.guests.require_connected(vm_id, "VM.thaw")
        return await self.guests.thaw(vm_id)

    async def _require_running(self, vm_id: str) -> None:
        state, _ = await self.core.on_vm(vm_id, vmops.state_of)
        if state != "running":
            raise FailedPrecondition(f"the VM is not running (state {state})",
                                     reason="vm_not_running", object="vm", id=vm_id)

    async def get_xml(self, params: VmGetXMLParams) -> JsonObject:
        flags = vc.DOMAIN_XML_INACTIVE if params["inactive"] else 0
        return {"xml": await self.core.on_vm(params["vm_id"], lambda dom: dom.XMLDesc(flags))}


async def _tick(handle: JobHandle, timeout: float) -> None:
    """Report the share of ``timeout`` spent as progress (short of 100 until the end)."""
    started = time.monotonic()
    while True:
        handle.progress(min(99.0, (time.monotonic() - started) / timeout * 100))
        await asyncio.sleep(1.0)

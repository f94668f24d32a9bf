"""What the VM services share: running a closure on a VM's domain, the per-VM locks and
the readiness check, waits for a VM to stop and for a device to go, and the checks and
resolutions a domain or device goes through before it reaches libvirt.

Both :class:`~virtnode.vm.service.VmService` (lifecycle) and
:class:`~virtnode.vm.devices.VmDeviceService` (live changes) call down into it; the
lifecycle service feeds it the domain events it waits on. Neither service calls the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from lxml import etree

from virtnode.config import VmConfig
from virtnode.errors import (
    ApiError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from virtnode.hypervisor.capabilities import parse_capabilities
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.storage.layout import Content
from virtnode.util.aio import wait_event
from virtnode.util.jsontypes import JsonObject
from virtnode.vm import ops as vmops
from virtnode.vm.locks import VmLocks
from virtnode.vm.policy import Policy, check_device, check_domain
from virtnode.vm.shutdown import STOPPED
from virtnode.vm.spec import image_files, invalid, with_chain, with_media

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


class Images(Protocol):
    """The volumes the VM services make and remove themselves: cloud-init seeds
    (:class:`~virtnode.storage.volumes.service.VolumeService`)."""

    async def create_image(self, sd_id: str, data: bytes, *, content: Content,
                           description: str, image_id: str, volume_id: str,
                           method: str) -> JsonObject: ...

    async def remove_image(self, sd_id: str, image_id: str, volume_id: str) -> None: ...


class VmCore:
    """The hypervisor, the per-VM locks and the waits and checks both VM services use."""

    def __init__(self, hypervisor: Hypervisor, config: VmConfig,
                 volumes: VolumeResolver | None = None, *,
                 networks: NetworkResolver | None = None,
                 storage_dirs: StorageDirs | None = None,
                 writers: Writers | None = None, images: Images | None = None) -> None:
        self._hv = hypervisor
        #: Where cloud-init seeds are made, if this agent has volumes.
        self.images = images
        self._config = config
        self._volumes = volumes
        self.writers: Writers = writers or (lambda _paths, _vm: contextlib.nullcontext())
        self._networks = networks
        self._storage_dirs = storage_dirs
        self._locks = VmLocks(config.lock_wait)
        self._stop_waiters: dict[str, set[asyncio.Event]] = {}
        self._removals: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._recovered = asyncio.Event()
        self._domain_type: str | None = None

    @property
    def locks(self) -> VmLocks:
        return self._locks

    @property
    def hypervisor(self) -> Hypervisor:
        return self._hv

    @property
    def recovering(self) -> bool:
        return not self._recovered.is_set()

    def recovered(self) -> None:
        """The lifecycle service has its first view of the VMs: mutating calls may run."""
        self._recovered.set()

    async def wait_recovered(self, timeout: float) -> bool:
        """Wait for the first view of the VMs; False if ``timeout`` passed first."""
        return await wait_event(self._recovered, timeout)

    def forget_domain_type(self) -> None:
        """A new connection: read the default domain type again when next needed."""
        self._domain_type = None

    def stopped(self, vm_id: str) -> None:
        """VM ``vm_id`` stopped (a lifecycle event): wake whoever waits for it."""
        for waiter in self._stop_waiters.get(vm_id, ()):
            waiter.set()

    def device_outcome(self, vm_id: str, alias: str, outcome: str) -> None:
        """A device's removal ended (``removed`` or ``removal_failed``, an event)."""
        future = self._removals.get((vm_id, alias))
        if future is not None and not future.done():
            future.set_result(outcome)

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

    async def resolve_media(self, raw: JsonObject, field: str) -> JsonObject:
        """A CD-ROM (or media) spec with ``volume`` rewritten as the volume's path; others
        as given. Raises InvalidArgument for both path and volume, or a volume that is not
        one raw image (``invalid_media``), and what resolving a volume raises."""
        if "path" in raw and "volume" in raw:
            raise invalid(field, "give path or volume, not both")
        if "volume" not in raw:
            return raw
        if self._volumes is None:
            raise Unavailable("volumes are not available", reason="no_volumes")
        chain = await self._volumes(raw["volume"], True)
        return with_media(raw, chain, field)

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

    async def default_domain_type(self) -> str:
        """kvm when the host has it, else qemu (TCG); read once per connection."""
        def pick(conn: Connection) -> str:
            types = parse_capabilities(conn.getCapabilities())["domain_types"]
            return next((t for t in ("kvm", "qemu", "test") if t in types), "qemu")

        if self._domain_type is None:
            self._domain_type = await self._hv.call(pick, what="reading domain types")
        return self._domain_type


def _renamed(exc: ApiError, old: str, new: str) -> ApiError:
    message = exc.message.replace(old, new, 1)
    return type(exc)(message, reason=exc.reason, object=exc.object, id=exc.id,
                     **{**exc.details, "field": new})

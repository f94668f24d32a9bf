"""What the volume service and its copy and merge jobs share: finding volumes and their
chains, the per-domain locks, busy marks, the checks before a change, discarding a volume
and publishing its events.

Both the service (:mod:`virtnode.storage.volumes.service`) and the jobs
(:mod:`virtnode.storage.volumes.jobs`) call down into it; neither calls the other back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal, overload

from virtnode.errors import FailedPrecondition, NotFound, ResourceExhausted
from virtnode.events.bus import EventBus
from virtnode.jobs.manager import JobManager
from virtnode.storage import layout as lay
from virtnode.storage import usage
from virtnode.storage.domains.service import Domain, StorageDomainService, VmDisks
from virtnode.storage.images import qemuimg
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes.files import Found, Listed
from virtnode.storage.volumes.view import qemu_guard
from virtnode.util.aio import to_the_end

TOPIC = "storage.volume"


def volumes_named(domains: Sequence[Domain], paths: Sequence[str]
                  ) -> list[tuple[Domain, str, str]]:
    """The domain, image id and volume id of each path that names a volume's data file
    in one of ``domains`` (after links: the agent writes resolved paths into domain XML)."""
    images = {os.path.realpath(d.layout.domain_dir / lay.IMAGES): d for d in domains}
    reals = [PurePosixPath(os.path.realpath(path)) for path in paths]
    return [(domain, real.parent.name, real.name) for real in reals
            if (domain := images.get(str(real.parent.parent))) is not None
            and lay.is_uuid(real.parent.name) and lay.is_uuid(real.name)]


class VolumeCore:
    """The volumes of the attached storage domains, below the API."""

    def __init__(self, domains: StorageDomainService, jobs: JobManager, bus: EventBus,
                 vm_disks: VmDisks, all_vm_disks: VmDisks | None = None) -> None:
        self._domains = domains
        self._jobs = jobs
        self._bus = bus
        self._vm_disks = vm_disks
        self._all_vm_disks = all_vm_disks or vm_disks
        #: Blocking storage work, in the storage I/O threads with their deadline.
        self.io = domains.io_call
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: dict[str, str] = {}  # volume id -> what holds it
        #: Busy volumes no VM may start writing either (a download is reading them).
        self._no_writers: set[str] = set()

    @property
    def domains(self) -> StorageDomainService:
        return self._domains

    @property
    def jobs(self) -> JobManager:
        return self._jobs

    def lock(self, domain: Domain) -> asyncio.Lock:
        return self._locks.setdefault(domain.sd_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def writers(self, paths: Sequence[str], vm: str) -> AsyncIterator[None]:
        """Hold while VM ``vm`` starts writing the disk files ``paths``.

        Each of them that is a volume of an attached domain must be its image's leaf: a
        VM that wrote an internal volume or a template would change every layer above it.
        Raises FailedPrecondition (``not_leaf``). The domains' locks are held until the
        block ends, so no layer is made over those volumes meanwhile (a layer over a leaf
        that a VM runs on is refused ``in_use``). Files that are no volume are not looked
        at here.
        """
        named = await self.io(volumes_named, self._domains.attached(), paths,
                              what="finding the VM's volumes") if paths else []
        domains = sorted({d.sd_id: d for d, _, _ in named}.values(), key=lambda d: d.sd_id)
        async with contextlib.AsyncExitStack() as stack:
            for domain in domains:
                await stack.enter_async_context(self.lock(domain))
            for domain, image_id, volume_id in named:
                try:
                    _, listed = await self.volume({"sd_id": domain.sd_id, "image_id": image_id,
                                                   "volume_id": volume_id}, data=False)
                except NotFound:
                    continue  # a file the agent did not make; libvirt judges it
                if volume_id in self._no_writers:
                    raise FailedPrecondition(
                        f"VM {vm} would write volume {volume_id}, which is being read "
                        f"({self._busy.get(volume_id)}); end that first",
                        reason="volume_busy", object="volume", id=volume_id, vm=vm)
                role = listed.metadata.role
                if role != "leaf":
                    raise FailedPrecondition(
                        f"VM {vm} would write volume {volume_id}, which is {role} now (a "
                        "layer was made over it): only the leaf of an image is written",
                        reason="not_leaf", object="volume", id=volume_id, vm=vm)
            yield

    @overload
    async def volume(self, ref: Mapping[str, Any]) -> tuple[Domain, Found]: ...

    @overload
    async def volume(self, ref: Mapping[str, Any], *, data: Literal[False]
                     ) -> tuple[Domain, Listed]: ...

    async def volume(self, ref: Mapping[str, Any], *, data: bool = True
                     ) -> tuple[Domain, Listed | Found]:
        """The domain and the volume ``ref`` names, its data file checked unless ``data``
        is false. Raises NotFound, FailedPrecondition (``unsafe_path``,
        ``metadata_corrupt``...) naming the volume."""
        domain = self._domains.domain(ref["sd_id"])
        image_id = lay.check_uuid(ref["image_id"], "image_id")
        volume_id = lay.check_uuid(ref["volume_id"], "volume_id")
        try:
            found = await self.io(volfiles.read if data else volfiles.read_listed,
                                  domain.layout, image_id, volume_id,
                                  what="reading the volume")
        except FileNotFoundError:
            raise NotFound(f"no volume {volume_id} in image {image_id} of storage domain "
                           f"{domain.sd_id}", reason="no_volume", object="volume",
                           id=volume_id) from None
        except (lay.MetadataError, lay.UnsafePath) as exc:
            if exc.object is None:  # say which volume its files belong to
                exc.object, exc.id = "volume", volume_id
            raise
        return domain, found

    async def chain(self, domain: Domain, found: Found) -> Sequence[Found]:
        """The volume's chain, leaf first, every image's header checked against the
        metadata: what qemu-img and libvirt are given. Raises FailedPrecondition
        (``broken_chain``, ``backing_mismatch``...)."""
        result: Sequence[Found] = await self.io(volfiles.usable_chain, domain.layout, found,
                                                what="reading the chain")
        return result

    def check_free(self, found: Listed) -> None:
        holder = self._busy.get(found.volume_id)
        if holder is not None:
            raise FailedPrecondition(f"volume {found.volume_id} is busy ({holder})",
                                     reason="volume_busy", object="volume",
                                     id=found.volume_id)

    @contextlib.asynccontextmanager
    async def hold(self, volumes: Sequence[Found], what: str, *,
                   no_writers: bool = False) -> AsyncIterator[None]:
        """Mark volumes busy for a job; with ``no_writers`` no VM may start writing them
        meanwhile either. Raises FailedPrecondition (``volume_busy``)."""
        for found in volumes:
            self.check_free(found)
        for found in volumes:
            self._busy[found.volume_id] = what
            if no_writers:
                self._no_writers.add(found.volume_id)
        try:
            yield
        finally:
            for found in volumes:
                self._busy.pop(found.volume_id, None)
                self._no_writers.discard(found.volume_id)

    async def check_unused(self, domain: Domain, volumes: Sequence[Listed], *,
                           defined: bool = False) -> None:
        """Refuse (``in_use``) volumes a running VM uses; with ``defined``, also those a
        VM that is only defined names (CD-ROM media: its next start needs it)."""
        paths = [str(domain.layout.volume_name(f.image_id, f.volume_id)) for f in volumes]
        listed = await (self._all_vm_disks if defined else self._vm_disks)()
        users = sorted(vm for vm, used in listed.items()
                       if any(usage.paths_under(used, p) for p in paths))
        if users:
            kind = "VMs" if defined else "running VMs"
            raise FailedPrecondition(f"volume {volumes[0].volume_id} is used by {kind}: "
                                     f"{', '.join(users)}", reason="in_use", object="volume",
                                     id=volumes[0].volume_id, vms=users)

    async def check_space(self, domain: Domain, fmt: str, size: int, allocation: str,
                           measured: Awaitable[qemuimg.Measurement] | None = None) -> None:
        if measured is None and fmt == "raw" and allocation == "sparse":
            return  # a sparse raw file takes no space until written
        if measured is None:
            measured = qemuimg.measure(fmt, size=size, timeout=self._domains.io_timeout)
        with qemu_guard("measuring the volume"):
            measurement = await measured
        need = (measurement.fully_allocated if allocation == "preallocated"
                else measurement.required)
        free = await self.io(volfiles.free_bytes, domain.layout,
                              what="reading free space")
        if need > free:
            raise ResourceExhausted(f"the volume needs {need} bytes; storage domain "
                                    f"{domain.sd_id} has {free} free", reason="no_space",
                                    need=need, free=free)

    async def discard(self, domain: Domain, found: Listed) -> None:
        """Remove a volume, and give its parent back its role. Runs to its end even when
        the caller is cancelled (which is raised afterwards, so a lock held stays held)."""
        async def run() -> None:
            await self.io(volfiles.remove, domain.layout, found.image_id,
                           found.volume_id, what="removing the volume")
            if found.metadata.parent is not None:
                await self.io(volfiles.restore_parent_role, domain.layout,
                               found.metadata.parent, found.image_id,
                               what="updating the parent")
        await to_the_end(run(), "volume discard")

    def publish(self, domain: Domain, image_id: str, volume_id: str, event: str,
                 **extra: str) -> None:
        self._bus.publish(TOPIC, {"sd_id": domain.sd_id, "image_id": image_id,
                                  "volume_id": volume_id, "event": event, **extra})

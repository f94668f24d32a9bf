"""``Volume.*``: create, list, inspect, delete, resize, copy and merge volumes.

An image is a chain of volumes, base first; its leaf is what a VM writes. A layer over a
parent in the same image is a snapshot (the parent becomes ``internal``); a layer in a new
image over a template (role ``shared``) is a clone, and the template stays ``shared``.

Crash safety rests on legality: a volume's metadata is written ``illegal`` before its data
is made or changed and ``legal`` only once the data is complete and durable. The rule the
start-up scan applies is in :func:`virtnode.storage.volumes.files.scan_illegal`.

Copy and merge are jobs (cancellable; qemu-img's progress is the job's). Every change
holds its domains shared (:mod:`virtnode.storage.domains.gate`) from the call's checks to
its end (a job's), so that deleting or detaching a domain waits for it, or cancels it.
Changes to one domain's metadata are serialised by a per-domain lock; volumes a job works
on are marked busy so that delete, resize, merge and new layers refuse them until the job
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal, overload

from virtnode.errors import (
    AlreadyExists,
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from virtnode.events.bus import EventBus
from virtnode.jobs.manager import JobManager
from virtnode.rpc.dispatch import CallContext, rpc_method
from virtnode.storage import layout as lay
from virtnode.storage import usage
from virtnode.storage.domains.service import Domain, StorageDomainService, VmDisks
from virtnode.storage.images import qemuimg
from virtnode.storage.layout import VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes import jobs as volcopy
from virtnode.storage.volumes.files import Found, Listed
from virtnode.storage.volumes.view import (
    preallocation,
    qemu_chain,
    qemu_guard,
    require_legal,
    volume_api,
)
from virtnode.util.aio import to_the_end

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
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


class VolumeService:
    """The volumes of the attached storage domains."""

    def __init__(self, domains: StorageDomainService, jobs: JobManager, bus: EventBus,
                 vm_disks: VmDisks) -> None:
        self._domains = domains
        self._jobs = jobs
        self._bus = bus
        self._vm_disks = vm_disks
        #: Blocking storage work, in the storage I/O threads with their deadline.
        self.io = domains.io_call
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: dict[str, str] = {}  # volume id -> what holds it
        jobs.register(volcopy.COPY_JOB)
        jobs.register(volcopy.MERGE_JOB)

    async def start(self) -> None:
        """Scan the attached domains for volumes a crash left illegal (logged, published)."""
        for domain in self._domains.attached():
            try:
                found = await self.io(volfiles.scan_illegal, domain.layout,
                                       what="scanning for illegal volumes")
            except ApiError as exc:
                log.error("storage domain %s: cannot scan volumes: %s", domain.sd_id,
                          exc.message)
                continue
            for item in found:
                log.warning("storage domain %s: volume %s/%s was left illegal (%s): %s",
                            domain.sd_id, item.image_id, item.volume_id, item.why,
                            "removed" if item.removed else "kept")
                self.publish(domain, item.image_id, item.volume_id,
                              "removed_incomplete" if item.removed else "illegal",
                              reason=item.why)

    # --- reading ----------------------------------------------------------------------------

    @rpc_method("Volume.list")
    async def list(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        domain = self._domains.domain(params["sd_id"])
        image_id = params.get("image_id")

        def read() -> list[JsonObject]:
            images = [image_id] if image_id is not None else lay.list_images(domain.layout)
            result: list[JsonObject] = []
            for image in images:
                for entry in lay.list_volumes(domain.layout, image):
                    error = entry.error
                    if entry.metadata is not None:
                        try:
                            result.append(volume_api(domain, Found.at(
                                domain.layout, image, entry.volume_id, entry.metadata)))
                            continue
                        except lay.UnsafePath as exc:  # a damaged data file
                            error = exc.message
                    result.append({"sd_id": domain.sd_id, "image_id": image,
                                   "volume_id": entry.volume_id, "error": error})
            return result

        if image_id is not None:
            lay.check_uuid(image_id, "image_id")
        try:
            volumes = await self.io(read, what="listing volumes")
        except FileNotFoundError:
            raise NotFound(f"no image {image_id} in storage domain {domain.sd_id}",
                           reason="no_image", object="image", id=image_id) from None
        return {"volumes": volumes}

    @rpc_method("Volume.getInfo")
    async def get_info(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        domain, found = await self.volume(params)
        result = volume_api(domain, found)
        chain = await self.chain(domain, found)
        with qemu_guard(f"reading volume {found.volume_id}"):
            info = await qemuimg.info(qemu_chain(chain), backing_chain=False,
                                      timeout=self._domains.io_timeout)
        result["actual_size"] = info.actual_size
        result["qemu_virtual_size"] = info.virtual_size
        result["chain"] = [{"image_id": f.image_id, "volume_id": f.volume_id,
                            "format": f.metadata.format, "role": f.metadata.role,
                            "legality": f.metadata.legality} for f in chain]
        return {"volume": result}

    async def resolve(self, ref: JsonObject, *, readonly: bool) -> Sequence[tuple[str, str]]:
        """``(path, format)`` of a volume's chain, leaf first, for a VM's disk.

        The whole chain must be legal, and the volume a leaf (a template only read-only).
        Raises NotFound, FailedPrecondition (``volume_illegal``, ``not_leaf``).
        """
        domain, found = await self.volume(ref)
        role = found.metadata.role
        if role == "internal" or (role == "shared" and not readonly):
            raise FailedPrecondition(
                f"volume {found.volume_id} is {role}: a VM writes only to the leaf of an "
                "image (a template may be attached read-only)", reason="not_leaf",
                object="volume", id=found.volume_id)
        chain = await self.chain(domain, found)
        require_legal(chain)
        return [(str(f.path), f.metadata.format) for f in chain]

    # --- changing ----------------------------------------------------------------------------

    @rpc_method("Volume.create")
    async def create(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        domain = self._domains.domain(params["sd_id"])
        fmt, allocation = params["format"], params["allocation"]
        image_id = params.get("image_id")
        if image_id is not None:
            image_id = lay.check_uuid(image_id, "image_id")
        volume_id = str(uuid.uuid4())
        async with domain.gate.shared("Volume.create"), self.lock(domain):
            parent = await self._parent_for(domain, params.get("parent"), image_id, fmt)
            if image_id is None and parent is not None and parent.metadata.role != "shared":
                image_id = parent.image_id  # a snapshot in the parent's image
            wanted = image_id
            new_image = wanted is None or not await self.io(
                lambda: domain.layout.image_dir(wanted).is_dir(), what="reading the image")
            if not new_image and parent is None:
                raise AlreadyExists(f"image {image_id} exists; a volume in it needs a parent "
                                    "(its leaf)", reason="image_exists", object="image",
                                    id=image_id)
            image_id = image_id or str(uuid.uuid4())
            if parent is not None:
                self._check_parent(parent, image_id)
                if parent.metadata.role == "leaf":
                    # the VM would go on writing the parent: the layer would not be
                    # point-in-time (until VM snapshots switch the VM to the new leaf)
                    await self.check_unused(domain, [parent])
            size = params.get("size") or (parent.metadata.virtual_size if parent else None)
            if size is None:
                raise InvalidArgument("size is needed for a volume without parent",
                                      reason="invalid_size", field="size")
            if parent is not None and size < parent.metadata.virtual_size:
                raise InvalidArgument("a layer cannot be smaller than its parent",
                                      reason="invalid_size", field="size")
            await self.check_space(domain, fmt, size, allocation)
            metadata = VolumeMetadata.new(
                fmt, allocation, size, parent=None if parent is None else parent.volume_id,
                shared=params["shared"], description=params["description"])
            found = await self.io(volfiles.start_new, domain.layout, image_id,
                                   volume_id, metadata, new_image=new_image,
                                   what="writing volume metadata")
            try:
                await self._make(domain, found, parent)
                if parent is not None and parent.metadata.role == "leaf":
                    await self.io(volfiles.update, domain.layout, parent,
                                   role="internal", what="updating the parent")
                found = await self.io(volfiles.update, domain.layout, found,
                                       legality="legal", what="writing volume metadata")
            except BaseException:
                await self.discard(domain, found)
                raise
        self.publish(domain, image_id, volume_id, "created")
        return {"volume": volume_api(domain, found)}

    @rpc_method("Volume.delete")
    async def delete(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        domain = self._domains.domain(params["sd_id"])
        async with domain.gate.shared("Volume.delete"), self.lock(domain):
            # By its metadata alone: a volume whose data file is damaged (a link, a
            # special file) can be deleted; remove() unlinks its names, never their target.
            domain, found = await self.volume(params, data=False)
            self.check_free(found)
            kids = await self.io(volfiles.children, domain.layout, found.volume_id,
                                  what="looking for children")
            if kids:
                raise FailedPrecondition(
                    f"volume {found.volume_id} has {len(kids)} child volume(s); delete or "
                    "merge them first", reason="has_children", object="volume",
                    id=found.volume_id, children=[k.volume_id for k in kids])
            await self.check_unused(domain, [found])
            found = await self.io(volfiles.update, domain.layout, found,
                                   legality="illegal", what="writing volume metadata")
            await self.discard(domain, found)
        self.publish(domain, found.image_id, found.volume_id, "deleted")
        return {}

    @rpc_method("Volume.resize")
    async def resize(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        size = params["size"]
        domain = self._domains.domain(params["sd_id"])
        async with domain.gate.shared("Volume.resize"), self.lock(domain):
            domain, found = await self.volume(params)
            self.check_free(found)
            if found.metadata.role != "leaf" or found.metadata.legality != "legal":
                raise FailedPrecondition("only a legal leaf volume can be resized",
                                         reason="not_leaf", object="volume",
                                         id=found.volume_id)
            await self.check_unused(domain, [found])
            chain = await self.chain(domain, found)
            prealloc = preallocation(found.metadata.allocation)
            # A smaller size is refused by qemuimg.resize (shrink_refused) before it runs.
            if prealloc is not None and size > found.metadata.virtual_size:
                await self.check_space(domain, "raw", size - found.metadata.virtual_size,
                                        "preallocated")
            with qemu_guard(f"resizing volume {found.volume_id}"):
                await qemuimg.resize(qemu_chain(chain), size, preallocation=prealloc,
                                     timeout=self._domains.io_timeout)
            found = await self.io(volfiles.update, domain.layout, found,
                                   virtual_size=size, what="writing volume metadata")
        return {"volume": volume_api(domain, found)}

    @rpc_method("Volume.copy")
    async def copy(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return await volcopy.start_copy(self, params)

    @rpc_method("Volume.merge")
    async def merge(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return await volcopy.start_merge(self, params)

    # --- helpers (also used by the copy and merge jobs) ---------------------------------------

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
                role = listed.metadata.role
                if role != "leaf":
                    raise FailedPrecondition(
                        f"VM {vm} would write volume {volume_id}, which is {role} now (a "
                        "layer was made over it): only the leaf of an image is written",
                        reason="not_leaf", object="volume", id=volume_id, vm=vm)
            yield

    @overload
    async def volume(self, ref: JsonObject) -> tuple[Domain, Found]: ...

    @overload
    async def volume(self, ref: JsonObject, *, data: Literal[False]
                     ) -> tuple[Domain, Listed]: ...

    async def volume(self, ref: JsonObject, *, data: bool = True
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


    async def _parent_for(self, domain: Domain, ref: JsonObject | None, image_id: str | None,
                          fmt: str) -> Found | None:
        if ref is None:
            return None
        if fmt != "qcow2":
            raise InvalidArgument("a layer over a parent must be qcow2", reason="invalid_format",
                                  field="format")
        _, parent = await self.volume({"sd_id": domain.sd_id, **ref})
        self.check_free(parent)
        if parent.metadata.legality != "legal":
            raise FailedPrecondition(f"parent {parent.volume_id} is illegal",
                                     reason="volume_illegal", object="volume",
                                     id=parent.volume_id)
        await self.chain(domain, parent)  # a layer must not sit on a header that lies
        return parent

    def _check_parent(self, parent: Found, image_id: str) -> None:
        """A layer goes over its image's leaf (a snapshot), or over a template in a new
        image (a clone)."""
        role = parent.metadata.role
        if parent.image_id == image_id and role != "leaf":
            raise FailedPrecondition(f"parent {parent.volume_id} is {role}, not the image's "
                                     "leaf", reason="not_leaf", object="volume",
                                     id=parent.volume_id)
        if parent.image_id != image_id and role != "shared":
            raise FailedPrecondition(
                f"parent {parent.volume_id} is in image {parent.image_id} and is not a "
                "template (role shared); only a template can be the base of another image",
                reason="not_shared", object="volume", id=parent.volume_id)

    def check_free(self, found: Listed) -> None:
        holder = self._busy.get(found.volume_id)
        if holder is not None:
            raise FailedPrecondition(f"volume {found.volume_id} is busy ({holder})",
                                     reason="volume_busy", object="volume",
                                     id=found.volume_id)

    @contextlib.asynccontextmanager
    async def hold(self, volumes: Sequence[Found], what: str) -> AsyncIterator[None]:
        """Mark volumes busy for a job; raises FailedPrecondition (``volume_busy``)."""
        for found in volumes:
            self.check_free(found)
        for found in volumes:
            self._busy[found.volume_id] = what
        try:
            yield
        finally:
            for found in volumes:
                self._busy.pop(found.volume_id, None)

    async def check_unused(self, domain: Domain, volumes: Sequence[Listed]) -> None:
        paths = [str(domain.layout.volume_name(f.image_id, f.volume_id)) for f in volumes]
        users = sorted(vm for vm, used in (await self._vm_disks()).items()
                       if any(usage.paths_under(used, p) for p in paths))
        if users:
            raise FailedPrecondition(f"volume {volumes[0].volume_id} is used by running VMs: "
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


    async def _make(self, domain: Domain, found: Found, parent: Found | None) -> None:
        md = found.metadata
        backing = (None if parent is None
                   else volfiles.backing_name(domain.layout, found.image_id, parent))
        with qemu_guard(f"creating volume {found.volume_id}"):
            await qemuimg.create(
                found.path, md.format, md.virtual_size, backing=backing,
                backing_fmt=None if parent is None else parent.metadata.format,
                preallocation=preallocation(md.allocation), timeout=self._domains.io_timeout)
        await self.io(volfiles.sync_data, found.path, what="flushing the volume")

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

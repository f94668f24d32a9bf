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

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtnode.api_schema.params import (
    VolumeCancelTransferParams,
    VolumeCopyParams,
    VolumeCreateParams,
    VolumeDeleteParams,
    VolumeFinalizeTransferParams,
    VolumeGetInfoParams,
    VolumeImportParams,
    VolumeListParams,
    VolumeMergeParams,
    VolumePrepareTransferParams,
    VolumeResizeParams,
)
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
from virtnode.storage import layout as lay
from virtnode.storage.domains.service import Domain, StorageDomainService, VmDisks
from virtnode.storage.images import qemuimg
from virtnode.storage.layout import Content, VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes import imports
from virtnode.storage.volumes import jobs as volcopy
from virtnode.storage.volumes.core import VolumeCore
from virtnode.storage.volumes.files import Found, Listed
from virtnode.storage.volumes.transfers import TransferService
from virtnode.storage.volumes.view import (
    preallocation,
    qemu_chain,
    qemu_guard,
    require_legal,
    volume_api,
)
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

#: Layers made for a VM snapshot, with their domains.
Layers = list[tuple[Domain, Found]]


@dataclass
class Fold:
    """A layer being folded into its parent (:meth:`VolumeService.folding`)."""

    domain: Domain
    top: Found
    parent: Found
    chain: Sequence[Found]  # top, parent, and what lies below, as marked
    kids: Sequence[Listed]  # the layer's children

class VolumeService:
    """The volumes of the attached storage domains."""

    def __init__(self, domains: StorageDomainService, jobs: JobManager, bus: EventBus,
                 vm_disks: VmDisks, all_vm_disks: VmDisks | None = None, *,
                 transfer_timeout: float = 300.0, import_paths: Sequence[str] = ()) -> None:
        """``vm_disks`` lists the disks of running VMs, ``all_vm_disks`` those of every
        VM (defined ones too), which ISO images are checked against before deletion."""
        self._domains = domains
        #: What the service and its jobs share; the VM service holds volumes through it.
        self.core = core = VolumeCore(domains, jobs, bus, vm_disks, all_vm_disks)
        self.io = core.io
        jobs.register(volcopy.COPY_JOB)
        jobs.register(volcopy.MERGE_JOB)
        jobs.register(imports.IMPORT_JOB)
        self._import_paths = tuple(import_paths)
        #: Uploads and downloads; the HTTP side reads and writes through it.
        self.transfers = TransferService(core, timeout=transfer_timeout)

    async def start(self) -> None:
        """Scan the attached domains for volumes a crash left illegal (logged, published)."""
        self.transfers.start()
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
                self.core.publish(domain, item.image_id, item.volume_id,
                              "removed_incomplete" if item.removed else "illegal",
                              reason=item.why)

    # --- reading ----------------------------------------------------------------------------

    async def list(self, params: VolumeListParams) -> JsonObject:
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
        content = params.get("content")
        if content is not None:
            volumes = [v for v in volumes if v.get("content") == content]
        return {"volumes": volumes}

    async def get_info(self, params: VolumeGetInfoParams) -> JsonObject:
        domain, found = await self.core.volume(params)
        result = volume_api(domain, found)
        chain = await self.core.chain(domain, found)
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
        domain, found = await self.core.volume(ref)
        role = found.metadata.role
        if role == "internal" or (role == "shared" and not readonly):
            raise FailedPrecondition(
                f"volume {found.volume_id} is {role}: a VM writes only to the leaf of an "
                "image (a template may be attached read-only)", reason="not_leaf",
                object="volume", id=found.volume_id)
        chain = await self.core.chain(domain, found)
        require_legal(chain)
        return [(str(f.path), f.metadata.format) for f in chain]

    async def free_bytes(self, sd_id: str) -> int:
        """Bytes free on an attached storage domain's filesystem; NotFound for an unknown
        domain."""
        domain = self._domains.domain(sd_id)
        return await self.io(volfiles.free_bytes, domain.layout, what="reading free space")

    # --- changing ----------------------------------------------------------------------------

    async def create(self, params: VolumeCreateParams) -> JsonObject:
        domain = self._domains.domain(params["sd_id"])
        fmt, allocation = params["format"], params["allocation"]
        image_id = params.get("image_id")
        if image_id is not None:
            image_id = lay.check_uuid(image_id, "image_id")
        volume_id = str(uuid.uuid4())
        async with domain.gate.shared("Volume.create"), self.core.lock(domain):
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
                    await self.core.check_unused(domain, [parent])
            size = params.get("size") or (parent.metadata.virtual_size if parent else None)
            if size is None:
                raise InvalidArgument("size is needed for a volume without parent",
                                      reason="invalid_size", field="size")
            if parent is not None and size < parent.metadata.virtual_size:
                raise InvalidArgument("a layer cannot be smaller than its parent",
                                      reason="invalid_size", field="size")
            await self.core.check_space(domain, fmt, size, allocation)
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
                await self.core.discard(domain, found)
                raise
        self.core.publish(domain, image_id, volume_id, "created")
        return {"volume": volume_api(domain, found)}

    async def delete(self, params: VolumeDeleteParams) -> JsonObject:
        domain = self._domains.domain(params["sd_id"])
        async with domain.gate.shared("Volume.delete"), self.core.lock(domain):
            # By its metadata alone: a volume whose data file is damaged (a link, a
            # special file) can be deleted; remove() unlinks its names, never their target.
            domain, found = await self.core.volume(params, data=False)
            self.core.check_free(found)
            kids = await self.io(volfiles.children, domain.layout, found.volume_id,
                                  what="looking for children")
            if kids:
                raise FailedPrecondition(
                    f"volume {found.volume_id} has {len(kids)} child volume(s); delete or "
                    "merge them first", reason="has_children", object="volume",
                    id=found.volume_id, children=[k.volume_id for k in kids])
            await self.core.check_unused(domain, [found],
                                         defined=found.metadata.content == "iso")
            found = await self.io(volfiles.update, domain.layout, found,
                                   legality="illegal", what="writing volume metadata")
            await self.core.discard(domain, found)
        self.core.publish(domain, found.image_id, found.volume_id, "deleted")
        return {}

    # --- layers for VM snapshots --------------------------------------------------------

    async def add_layers(self, refs: Sequence[Mapping[str, Any]], volume_ids: Sequence[str],
                         *, description: str, branch: bool = False) -> Layers:
        """For VM.snapshot: a new qcow2 layer ``volume_ids[i]`` (chosen by the caller, who
        journals them first) over each leaf volume ``refs`` names, made,
        durable and legal, while each parent stays its image's leaf (a running VM goes on
        writing it until it is switched to the layer in one atomic step); then
        :meth:`adopt_layers` or :meth:`drop_layers`. What was made is removed if one
        fails. With ``branch`` (reverting to a snapshot) a parent may be internal: the
        layer starts a new branch of its image. Raises NotFound, FailedPrecondition
        (``not_leaf``, ``volume_illegal``, ``volume_busy``...), ResourceExhausted."""
        made: Layers = []
        try:
            for ref, volume_id in zip(refs, volume_ids, strict=True):
                domain = self._domains.domain(ref["sd_id"])
                async with domain.gate.shared("VM.snapshot"), self.core.lock(domain):
                    parent = await self._parent_for(domain, dict(ref), None, "qcow2")
                    assert parent is not None
                    roles = ("leaf", "internal") if branch else ("leaf",)
                    if parent.metadata.role not in roles or parent.metadata.content != "disk":
                        raise FailedPrecondition(
                            f"volume {parent.volume_id} is {parent.metadata.role}, not the "
                            "leaf of a disk image", reason="not_leaf", object="volume",
                            id=parent.volume_id)
                    size = parent.metadata.virtual_size
                    await self.core.check_space(domain, "qcow2", size, "sparse")
                    metadata = VolumeMetadata.new("qcow2", "sparse", size,
                                                  parent=parent.volume_id, shared=False,
                                                  description=description)
                    found = await self.io(volfiles.start_new, domain.layout, parent.image_id,
                                          lay.check_uuid(volume_id, "volume_id"), metadata,
                                          new_image=False, what="writing volume metadata")
                    made.append((domain, found))
                    await self._make(domain, found, parent)
                    found = await self.io(volfiles.update, domain.layout, found,
                                          legality="legal", what="writing volume metadata")
                    made[-1] = (domain, found)
        except BaseException:
            await self.drop_layers(made)
            raise
        for domain, found in made:
            self.core.publish(domain, found.image_id, found.volume_id, "created")
        return made

    async def adopt_layers(self, layers: Sequence[tuple[Domain, Found]]) -> None:
        """The VM writes the layers now: each parent becomes internal."""
        for domain, found in layers:
            async with self.core.lock(domain):
                assert found.metadata.parent is not None
                parent = await self.io(volfiles.locate, domain.layout, found.metadata.parent,
                                       found.image_id, what="reading the parent")
                if parent.metadata.role == "leaf":
                    await self.io(volfiles.update, domain.layout, parent, role="internal",
                                  what="updating the parent")

    async def fold_layer(self, ref: Mapping[str, Any],
                         progress: qemuimg.ProgressCallback | None = None
                         ) -> tuple[Domain, Found]:
        """For VM.deleteSnapshot on a stopped VM: commit the layer ``ref`` names into its
        parent, which then stands where the layer stood (the layer's children are rebased
        onto it, it takes the layer's role), and remove the layer. Returns the parent.

        A fold cut short is finished by calling this again with the same layer. Raises
        what :meth:`folding` raises, and ResourceExhausted, Internal."""
        async with self.folding(ref, live=False) as fold:
            await self.commit_fold(fold, progress)
            return await self.finish_fold(fold, rebase=True)

    async def commit_fold(self, fold: Fold,
                          progress: qemuimg.ProgressCallback | None = None) -> None:
        """Commit the layer's data into its parent with qemu-img (no VM runs on them)."""
        with qemu_guard(f"folding volume {fold.top.volume_id}"):
            await qemuimg.commit(qemu_chain(fold.chain), progress=progress)

    @contextlib.asynccontextmanager
    async def folding(self, ref: Mapping[str, Any], *, live: bool) -> AsyncIterator[Fold]:
        """Check that the layer ``ref`` names can be folded into its parent and mark both
        illegal; the caller commits the data (``qemu-img commit``, or with ``live`` the
        running VM that uses them, by a block commit) and calls :meth:`finish_fold`
        within. The domain is held meanwhile.

        The parent must have no other child (a branch left by a revert relies on it as
        it is: ``has_branches``). Without ``live``, no running VM may use the two
        (``in_use``). Raises NotFound, FailedPrecondition (``no_parent``,
        ``parent_shared``, ``has_branches``, ``in_use``)."""
        domain = self._domains.domain(ref["sd_id"])
        async with domain.gate.shared("VM.deleteSnapshot"):
            _, top = await self.core.volume(ref)
            parent_id = top.metadata.parent
            if parent_id is None:
                raise FailedPrecondition(f"volume {top.volume_id} has no parent",
                                         reason="no_parent", object="volume", id=top.volume_id)
            chain = await self.core.chain(domain, top)  # the headers as the metadata says
            async with self.core.lock(domain):
                parent = chain[1]
                if parent.metadata.role == "shared" or parent.image_id != top.image_id:
                    raise FailedPrecondition(
                        f"parent {parent_id} is a template", reason="parent_shared",
                        object="volume", id=parent_id)
                siblings = [k for k in await self.io(volfiles.children, domain.layout,
                                                     parent_id, what="looking for children")
                            if k.volume_id != top.volume_id]
                if siblings:
                    raise FailedPrecondition(
                        f"volume {parent_id} has other children "
                        f"({', '.join(k.volume_id for k in siblings)}): folding into it "
                        "would change them", reason="has_branches", object="volume",
                        id=parent_id)
                kids = await self.io(volfiles.children, domain.layout, top.volume_id,
                                     what="looking for children")
                if not live:
                    await self.core.check_unused(domain, [top, parent])
                parent, top = await volcopy.mark_merging(self.core, domain, parent, top)
            yield Fold(domain, top, parent, [top, parent, *chain[2:]], kids)

    async def finish_fold(self, fold: Fold, *, rebase: bool) -> tuple[Domain, Found]:
        """After the layer's data is in its parent: its children name the parent (with
        ``rebase`` their headers are rewritten too; a live block commit has done that),
        the parent is legal with the layer's role, and the layer is removed. Returns the
        parent."""
        domain, top, parent = fold.domain, fold.top, fold.parent
        await self.io(volfiles.sync_data, parent.path, what="flushing the parent")
        async with self.core.lock(domain):
            for kid in fold.kids:
                kid_found = await self.io(volfiles.read, domain.layout, kid.image_id,
                                          kid.volume_id, what="reading a child")
                if rebase:
                    with qemu_guard(f"rebasing volume {kid.volume_id}"):
                        await qemuimg.rebase_header(
                            kid_found.path, kid.metadata.format,
                            volfiles.backing_name(domain.layout, kid.image_id, parent),
                            parent.metadata.format)
                    await self.io(volfiles.sync_data, kid_found.path,
                                  what="flushing a child")
                await self.io(volfiles.update, domain.layout, kid, parent=parent.volume_id,
                              what="writing volume metadata")
            parent = await self.io(
                volfiles.update, domain.layout, parent, legality="legal",
                role=top.metadata.role,
                virtual_size=max(parent.metadata.virtual_size, top.metadata.virtual_size),
                what="writing volume metadata")
            await self.io(volfiles.remove, domain.layout, top.image_id, top.volume_id,
                          what="removing the layer")
        self.core.publish(domain, top.image_id, top.volume_id, "merged")
        return domain, parent

    async def drop_layers(self, layers: Sequence[tuple[Domain, Found]]) -> None:
        """Remove layers :meth:`add_layers` made that no VM came to write."""
        for domain, found in layers:
            async with self.core.lock(domain):
                with contextlib.suppress(FileNotFoundError):
                    await self.io(volfiles.update, domain.layout, found, legality="illegal",
                                  what="writing volume metadata")
                await self.core.discard(domain, found)
            self.core.publish(domain, found.image_id, found.volume_id, "deleted")

    # --- for templates and clones ---------------------------------------------------------

    async def share(self, ref: Mapping[str, Any]) -> None:
        """For VM.makeTemplate: the leaf volume ``ref`` names becomes a template (role
        ``shared``): read-only from now on, a base for linked clones. A volume that is
        shared already is left so. Raises NotFound, FailedPrecondition (``not_leaf``,
        ``volume_illegal``, ``in_use``, ``volume_busy``)."""
        domain = self._domains.domain(ref["sd_id"])
        async with domain.gate.shared("VM.makeTemplate"), self.core.lock(domain):
            _, found = await self.core.volume(ref)
            if found.metadata.role == "shared":
                return
            self.core.check_free(found)
            require_legal([found])
            if found.metadata.role != "leaf" or found.metadata.content != "disk":
                raise FailedPrecondition(
                    f"volume {found.volume_id} is {found.metadata.role}, not the leaf of a "
                    "disk image", reason="not_leaf", object="volume", id=found.volume_id)
            await self.core.check_unused(domain, [found])
            await self.io(volfiles.update, domain.layout, found, role="shared",
                          what="writing volume metadata")
        self.core.publish(domain, found.image_id, found.volume_id, "shared")

    async def copy_image(self, ref: Mapping[str, Any], sd_id: str, image_id: str,
                         volume_id: str, *, description: str,
                         progress: qemuimg.ProgressCallback | None = None) -> JsonObject:
        """For VM.clone: what the chain ending in ``ref`` shows, copied into a new qcow2
        image ``image_id`` of the domain ``sd_id`` (ids chosen by the caller, who journals
        them first). No running VM may write the chain. Raises NotFound,
        FailedPrecondition (``volume_illegal``, ``in_use``), ResourceExhausted."""
        src_domain = self._domains.domain(ref["sd_id"])
        dst = self._domains.domain(sd_id)
        image_id = lay.check_uuid(image_id, "image_id")
        volume_id = lay.check_uuid(volume_id, "volume_id")
        async with contextlib.AsyncExitStack() as stack:
            for gate in dict.fromkeys((src_domain.gate, dst.gate)):
                await stack.enter_async_context(gate.shared("VM.clone"))
            _, leaf = await self.core.volume(ref)
            chain = await self.core.chain(src_domain, leaf)
            require_legal(chain)
            if leaf.metadata.role != "shared":
                await self.core.check_unused(src_domain, [leaf])
            await self.core.check_space(dst, "qcow2", 0, "sparse", measured=qemuimg.measure(
                "qcow2", src=qemu_chain(chain), timeout=self._domains.io_timeout))
            await stack.enter_async_context(self.core.hold(chain, "VM.clone"))
            target = await volcopy.copy_chain(
                self.core, chain, dst, image_id, volume_id, fmt="qcow2", allocation="sparse",
                shared=False, description=description, progress=progress)
        return volume_api(dst, target)

    async def drop_unused(self, ref: Mapping[str, Any]) -> bool:
        """For VM.deleteSnapshot: remove a snapshot's volume that nothing needs any more
        (no child, no VM running or defined names it); whether it was removed."""
        domain = self._domains.domain(ref["sd_id"])
        async with domain.gate.shared("VM.deleteSnapshot"), self.core.lock(domain):
            try:
                _, found = await self.core.volume(ref, data=False)
            except NotFound:
                return False
            kids = await self.io(volfiles.children, domain.layout, found.volume_id,
                                 what="looking for children")
            if kids or found.metadata.role == "shared":
                return False
            try:
                await self.core.check_unused(domain, [found], defined=True)
            except FailedPrecondition:
                return False
            await self.io(volfiles.update, domain.layout, found, legality="illegal",
                          what="writing volume metadata")
            await self.core.discard(domain, found)
        self.core.publish(domain, found.image_id, found.volume_id, "deleted")
        return True

    async def remove_new_image(self, sd_id: str, image_id: str) -> None:
        """Remove every volume of an image that a VM.clone which failed made (children
        first); an image that is not there is no error."""
        domain = self._domains.domain(sd_id)
        async with domain.gate.shared("VM.clone"), self.core.lock(domain):
            left = [f for f in await self.io(volfiles.all_volumes, domain.layout,
                                             what="listing volumes")
                    if f.image_id == image_id]
            while left:
                parents = {f.metadata.parent for f in left}
                for found in [f for f in left if f.volume_id not in parents]:
                    with contextlib.suppress(FileNotFoundError):
                        await self.io(volfiles.update, domain.layout, found,
                                      legality="illegal", what="writing volume metadata")
                    await self.core.discard(domain, found)
                    self.core.publish(domain, image_id, found.volume_id, "deleted")
                    left.remove(found)

    async def add_memory_volume(self, sd_id: str, image_id: str, volume_id: str,
                                size: int, *, description: str) -> tuple[Domain, Found]:
        """For VM.snapshot with memory: a new image of one empty raw volume (ids chosen by
        the caller, who journals them first) for libvirt to write a VM's memory into, at
        most ``size`` bytes; illegal until :meth:`seal_memory_volume`, or removed with
        :meth:`drop_layers`. Raises NotFound, AlreadyExists, ResourceExhausted
        (``no_space``)."""
        domain = self._domains.domain(sd_id)
        image_id = lay.check_uuid(image_id, "image_id")
        volume_id = lay.check_uuid(volume_id, "volume_id")
        metadata = VolumeMetadata.new("raw", "sparse", 0, parent=None, shared=False,
                                      description=description, content="memory")
        async with domain.gate.shared("VM.snapshot"), self.core.lock(domain):
            found = await self._new_raw_image(domain, image_id, volume_id, metadata, b"",
                                              need=size)
        return domain, found

    async def seal_memory_volume(self, volume: tuple[Domain, Found]) -> None:
        """The VM's memory is written: durable, legal, its size recorded."""
        domain, found = volume
        await self.io(volfiles.sync_data, found.path, what="flushing the memory image")
        size = await self.io(lambda: found.path.stat().st_size, what="reading its size")
        async with self.core.lock(domain):
            found = await self.io(volfiles.read, domain.layout, found.image_id,
                                  found.volume_id, what="reading volume metadata")
            if found.metadata.legality != "legal":
                await self.io(volfiles.update, domain.layout, found, legality="legal",
                              virtual_size=size, what="writing volume metadata")
        self.core.publish(domain, found.image_id, found.volume_id, "created")

    async def create_image(self, sd_id: str, data: bytes, *, content: Content,
                           description: str, image_id: str, volume_id: str,
                           method: str) -> JsonObject:
        """A new image of one raw volume holding ``data`` (an ISO image the agent made,
        such as a cloud-init seed), shared and legal once its data is durable. Raises
        NotFound for an unknown domain, AlreadyExists for a taken id, ResourceExhausted
        (``no_space``)."""
        domain = self._domains.domain(sd_id)
        image_id = lay.check_uuid(image_id, "image_id")
        volume_id = lay.check_uuid(volume_id, "volume_id")
        metadata = VolumeMetadata.new("raw", "sparse", len(data), parent=None, shared=True,
                                      description=description, content=content)
        async with domain.gate.shared(method), self.core.lock(domain):
            found = await self._new_raw_image(domain, image_id, volume_id, metadata, data,
                                              need=len(data))
            try:
                found = await self.io(volfiles.update, domain.layout, found,
                                      legality="legal", what="writing volume metadata")
            except BaseException:
                await self.core.discard(domain, found)
                raise
        self.core.publish(domain, image_id, volume_id, "created")
        return volume_api(domain, found)

    async def _new_raw_image(self, domain: Domain, image_id: str, volume_id: str,
                             metadata: VolumeMetadata, data: bytes, *, need: int) -> Found:
        """A new image of one raw volume holding ``data``, illegal, durable (with the
        domain's lock held); ``need`` bytes must be free. Removed if it fails."""
        free = await self.io(volfiles.free_bytes, domain.layout, what="reading free space")
        if need > free:
            raise ResourceExhausted(f"the volume needs {need} bytes; storage domain "
                                    f"{domain.sd_id} has {free} free", reason="no_space",
                                    need=need, free=free)
        try:
            found: Found = await self.io(volfiles.start_new, domain.layout, image_id,
                                         volume_id, metadata, new_image=True,
                                         what="writing volume metadata")
        except FileExistsError:
            raise AlreadyExists(f"image {image_id} exists", reason="image_exists",
                                object="image", id=image_id) from None
        try:
            await self.io(volfiles.write_new_data, found.path, data, what="writing the volume")
        except BaseException:
            await self.core.discard(domain, found)
            raise
        return found

    async def remove_image(self, sd_id: str, image_id: str, volume_id: str) -> None:
        """Delete a volume the agent made with :meth:`create_image`, as ``Volume.delete``
        would (refused while a VM still names it)."""
        await self.delete({"sd_id": sd_id, "image_id": image_id, "volume_id": volume_id})

    async def resize(self, params: VolumeResizeParams) -> JsonObject:
        size = params["size"]
        domain = self._domains.domain(params["sd_id"])
        async with domain.gate.shared("Volume.resize"), self.core.lock(domain):
            domain, found = await self.core.volume(params)
            self.core.check_free(found)
            if found.metadata.role != "leaf" or found.metadata.legality != "legal":
                raise FailedPrecondition("only a legal leaf volume can be resized",
                                         reason="not_leaf", object="volume",
                                         id=found.volume_id)
            await self.core.check_unused(domain, [found])
            chain = await self.core.chain(domain, found)
            prealloc = preallocation(found.metadata.allocation)
            # A smaller size is refused by qemuimg.resize (shrink_refused) before it runs.
            if prealloc is not None and size > found.metadata.virtual_size:
                await self.core.check_space(domain, "raw", size - found.metadata.virtual_size,
                                        "preallocated")
            with qemu_guard(f"resizing volume {found.volume_id}"):
                await qemuimg.resize(qemu_chain(chain), size, preallocation=prealloc,
                                     timeout=self._domains.io_timeout)
            found = await self.io(volfiles.update, domain.layout, found,
                                   virtual_size=size, what="writing volume metadata")
        return {"volume": volume_api(domain, found)}

    async def copy(self, params: VolumeCopyParams) -> JsonObject:
        return await volcopy.start_copy(self.core, params)

    async def merge(self, params: VolumeMergeParams) -> JsonObject:
        return await volcopy.start_merge(self.core, params)

    async def import_volume(self, params: VolumeImportParams) -> JsonObject:
        return await imports.start_import(self.core, params, self._import_paths,
                                          self.transfers)

    def import_source(self, path: str) -> str:
        """The resolved path of a file under ``storage.import_paths`` that is not an image
        (an OVA); blocking. Raises PermissionDenied (``path_not_allowed``),
        InvalidArgument (``invalid_path``)."""
        return imports.package_path(path, self._import_paths)

    async def import_range(self, sd_id: str, src: str, offset: int, size: int, *,
                           name: str, description: str, image_id: str,
                           progress: qemuimg.ProgressCallback) -> JsonObject:
        """For VM.import: the image at ``offset`` of the package ``src`` (from
        :meth:`import_source`) as a new qcow2 volume of a new image ``image_id`` (the
        caller journals it first) of ``sd_id``, checked as any image from outside; its
        API view."""
        domain = self._domains.domain(sd_id)
        async with domain.gate.shared("VM.import"):
            return await imports.import_range(self.core, domain, src, offset, size,
                                              name=name, description=description,
                                              image_id=lay.check_uuid(image_id, "image_id"),
                                              progress=progress)

    async def prepare_transfer(self, params: VolumePrepareTransferParams) -> JsonObject:
        return await self.transfers.prepare(params)

    async def finalize_transfer(self, params: VolumeFinalizeTransferParams) -> JsonObject:
        return await self.transfers.finalize(params)

    async def cancel_transfer(self, params: VolumeCancelTransferParams) -> JsonObject:
        return await self.transfers.cancel(params)

    def close(self) -> None:
        """Stop the transfer threads; call once the jobs have ended."""
        self.transfers.close()

    # --- helpers --------------------------------------------------------------------------

    async def _parent_for(self, domain: Domain, ref: JsonObject | None, image_id: str | None,
                          fmt: str) -> Found | None:
        if ref is None:
            return None
        if fmt != "qcow2":
            raise InvalidArgument("a layer over a parent must be qcow2", reason="invalid_format",
                                  field="format")
        _, parent = await self.core.volume({"sd_id": domain.sd_id, **ref})
        self.core.check_free(parent)
        if parent.metadata.legality != "legal":
            raise FailedPrecondition(f"parent {parent.volume_id} is illegal",
                                     reason="volume_illegal", object="volume",
                                     id=parent.volume_id)
        await self.core.chain(domain, parent)  # a layer must not sit on a header that lies
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

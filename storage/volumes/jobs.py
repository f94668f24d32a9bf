"""The two volume jobs: ``Volume.copy`` (qemu-img convert) and ``Volume.merge`` (commit).

Both are checked before a job exists (bad ids, missing or illegal volumes, no space, a
volume in use are errors of the call), hold the volumes they read or change busy until
they end, and report qemu-img's progress as the job's.

Both hold their domains shared (:mod:`virtnode.storage.domains.gate`) from the call's
checks until the job ends; the job names itself on those leases, so that a forced delete
of the domain can cancel it.

- Copy writes the target's metadata ``illegal`` in a new image, converts, flushes the
  target file and its directory (a finished ``qemu-img convert`` is not durable), then
  marks it ``legal``. A failed or cancelled copy removes the target and its metadata.
- Merge commits a leaf into its parent: the parent is marked ``illegal`` first (a commit
  cut short leaves it half written), then the leaf; after the commit the parent is flushed,
  marked ``legal`` and becomes the leaf, and the merged layer is removed. A merge cut short
  leaves both illegal; running ``Volume.merge`` again on the same layer finishes it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from virtnode.api_schema.params import VolumeCopyParams, VolumeMergeParams
from virtnode.errors import FailedPrecondition, InvalidArgument
from virtnode.jobs.manager import JobHandle, JobKind
from virtnode.jobs.store import JobRecord
from virtnode.storage.domains.gate import Lease
from virtnode.storage.domains.service import Domain
from virtnode.storage.images import qemuimg
from virtnode.storage.layout import Allocation, VolumeFormat, VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes.core import VolumeCore
from virtnode.storage.volumes.files import Found
from virtnode.storage.volumes.view import (
    preallocation,
    qemu_chain,
    qemu_guard,
    require_legal,
    volume_api,
)
from virtnode.util.jsontypes import JsonObject

COPY_JOB = JobKind("Volume.copy", cancellable=True)
#: Cancelling a merge stops qemu-img; the chain stays illegal and the merge can be rerun.
MERGE_JOB = JobKind("Volume.merge", cancellable=True)


def job_params(params: Mapping[str, Any]) -> JsonObject:
    return {k: v for k, v in params.items() if k != "request_key"}


def _progress(handle: JobHandle) -> qemuimg.ProgressCallback:
    # 100 is the job manager's to give, once the target is durable and legal.
    return lambda percent: handle.progress(min(percent, 99.0))


async def leased(domains: Sequence[Domain], what: str,
                 start: Callable[[list[Lease]], Awaitable[JobRecord]]) -> JsonObject:
    """Hold ``domains`` shared while ``start(leases)`` checks the call and submits its job,
    which takes the leases over (:func:`job_context`); they are given back here unless
    it did."""
    leases: list[Lease] = []
    try:
        for gate in dict.fromkeys(d.gate for d in domains):  # the same domain once
            leases.append(await gate.enter(what))
        job = await start(leases)
    finally:
        for lease in leases:
            if not lease.taken:
                lease.release()
    return {"job_id": job.job_id, "job": job.to_api()}


async def fill_target(core: VolumeCore, domain: Domain, target: Found,
                      convert: Callable[[], Awaitable[None]], *, what: str) -> Found:
    """Run ``convert`` (qemu-img writing the new, illegal ``target``), flush the file and
    mark the volume legal; returns it. On any failure the target is removed."""
    try:
        with qemu_guard(what):
            await convert()
        await core.io(volfiles.sync_data, target.path, what=f"flushing ({what})")
        async with core.lock(domain):
            legal: Found = await core.io(volfiles.update, domain.layout, target,
                                         legality="legal", what="writing volume metadata")
    except BaseException:
        await core.discard(domain, target)
        raise
    return legal


async def copy_chain(core: VolumeCore, chain: Sequence[Found], dst: Domain, image_id: str,
                     volume_id: str, *, fmt: VolumeFormat, allocation: Allocation,
                     shared: bool, description: str,
                     progress: qemuimg.ProgressCallback | None) -> Found:
    """Copy what the chain (leaf first) shows into one new volume ``volume_id`` of a new
    image ``image_id`` of ``dst``: illegal while qemu-img writes it, legal once durable,
    removed on failure. Returns it."""
    leaf = chain[0]
    metadata = VolumeMetadata.new(fmt, allocation, leaf.metadata.virtual_size, parent=None,
                                  shared=shared, description=description)
    async with core.lock(dst):
        target: Found = await core.io(
            volfiles.start_new, dst.layout, image_id, volume_id, metadata,
            new_image=True, what="writing volume metadata")
    dst_path, src = target.path, qemu_chain(chain)
    target = await fill_target(core, dst, target, lambda: qemuimg.convert(
        src, dst_path, dst_fmt=fmt, preallocation=preallocation(allocation),
        progress=progress), what=f"copying volume {leaf.volume_id}")
    core.publish(dst, image_id, volume_id, "created")
    return target


@contextlib.asynccontextmanager
async def job_context(core: VolumeCore, volumes: Sequence[Found], what: str,
                      leases: list[Lease], *, no_writers: bool = False
                      ) -> AsyncIterator[None]:
    """A job's resources: its volumes busy (and with ``no_writers`` kept from VMs that
    would write them), and its domain leases until it ends."""
    for lease in leases:
        lease.taken = True  # released when the job ends
    try:
        async with core.hold(volumes, what, no_writers=no_writers):
            yield
    finally:
        for lease in leases:
            lease.release()


def name_job(handle: JobHandle, leases: list[Lease]) -> None:
    for lease in leases:
        lease.job_id = handle.job_id


async def start_copy(core: VolumeCore, params: VolumeCopyParams) -> JsonObject:
    """Check a ``Volume.copy`` call and start its job; returns ``{job_id, job}``."""
    src_domain = core.domains.domain(params["src"]["sd_id"])
    dst = core.domains.domain(params["dst_sd"])
    return await leased([src_domain, dst], COPY_JOB.name,
                        lambda leases: _submit_copy(core, params, leases))


async def _submit_copy(core: VolumeCore, params: VolumeCopyParams,
                       leases: list[Lease]) -> JobRecord:
    src_domain, leaf = await core.volume(params["src"])
    dst = core.domains.domain(params["dst_sd"])
    dst_fmt, allocation = params["dst_format"], params["allocation"]
    if not params["collapse"] and leaf.metadata.parent is not None:
        raise InvalidArgument(
            "collapse=false copies a single volume, and this one has a parent; use "
            "collapse=true to copy its whole chain into one volume",
            reason="has_parent", field="collapse")
    chain = await core.chain(src_domain, leaf)
    require_legal(chain)
    await core.check_space(dst, dst_fmt, 0, allocation, measured=qemuimg.measure(
        dst_fmt, src=qemu_chain(chain), timeout=core.domains.io_timeout))

    async def run(handle: JobHandle) -> JsonObject:
        name_job(handle, leases)
        target = await copy_chain(
            core, chain, dst, str(uuid.uuid4()), str(uuid.uuid4()), fmt=dst_fmt,
            allocation=allocation, shared=params["shared"],
            description=params.get("description", leaf.metadata.description),
            progress=_progress(handle))
        return {"volume": volume_api(dst, target)}

    return await core.jobs.submit(
        COPY_JOB.name, job_params(params), run,
        description=f"copy volume {leaf.volume_id} to storage domain {dst.sd_id}",
        target=leaf.volume_id, request_key=params.get("request_key"),
        prepare=lambda: job_context(core, chain, COPY_JOB.name, leases))


async def _merge_chain(core: VolumeCore, params: VolumeMergeParams
                       ) -> tuple[Domain, Sequence[Found]]:
    """The domain and the chain of the layer to merge (the layer, its parent, and what
    lies below)."""
    domain, top = await core.volume(params)
    parent_id = top.metadata.parent
    if parent_id is None:
        raise FailedPrecondition(f"volume {top.volume_id} has no parent to merge into",
                                 reason="no_parent", object="volume", id=top.volume_id)
    chain = await core.chain(domain, top)
    parent = chain[1]
    if parent.metadata.role == "shared" or parent.image_id != top.image_id:
        raise FailedPrecondition(
            f"parent {parent_id} is a template; merging into it would change every image "
            "made from it", reason="parent_shared", object="volume", id=parent_id)
    kids = await core.io(volfiles.children, domain.layout, top.volume_id,
                            what="looking for children")
    if kids:
        raise FailedPrecondition(f"volume {top.volume_id} has child volumes; only an image's "
                                 "leaf can be merged", reason="has_children",
                                 object="volume", id=top.volume_id)
    # Both legal, or the parent illegal: a merge cut short, which may be run again.
    if parent.metadata.legality == "legal" and top.metadata.legality != "legal":
        raise FailedPrecondition(f"volume {top.volume_id} is illegal",
                                 reason="volume_illegal", object="volume", id=top.volume_id)
    await core.check_unused(domain, [top, parent])
    return domain, chain


async def mark_merging(core: VolumeCore, domain: Domain, parent: Found, top: Found
                       ) -> tuple[Found, Found]:
    """Mark ``parent`` and ``top`` illegal before ``top`` is committed into ``parent``
    (with the domain's lock held); returns both as written.

    The parent first: a crash between the two leaves an illegal parent under a legal
    layer, never an illegal layer over a legal parent (which the start-up scan would
    take for a half-made volume and remove)."""
    if parent.metadata.legality == "legal":
        parent = await core.io(volfiles.update, domain.layout, parent, legality="illegal",
                               what="marking the chain")
    if top.metadata.legality == "legal":
        top = await core.io(volfiles.update, domain.layout, top, legality="illegal",
                            what="marking the chain")
    return parent, top


async def start_merge(core: VolumeCore, params: VolumeMergeParams) -> JsonObject:
    """Check a ``Volume.merge`` call and start its job; returns ``{job_id, job}``."""
    return await leased([core.domains.domain(params["sd_id"])], MERGE_JOB.name,
                        lambda leases: _submit_merge(core, params, leases))


async def _submit_merge(core: VolumeCore, params: VolumeMergeParams,
                        leases: list[Lease]) -> JobRecord:
    domain, chain = await _merge_chain(core, params)
    top, parent = chain[0], chain[1]
    committed, base_path = qemu_chain(chain), parent.path

    async def run(handle: JobHandle) -> JsonObject:
        nonlocal top, parent
        name_job(handle, leases)
        async with core.lock(domain):
            parent, top = await mark_merging(core, domain, parent, top)
        with qemu_guard(f"merging volume {top.volume_id}"):
            await qemuimg.commit(committed, progress=_progress(handle))
        await core.io(volfiles.sync_data, base_path, what="flushing the parent")
        async with core.lock(domain):
            parent = await core.io(
                volfiles.update, domain.layout, parent, legality="legal", role="leaf",
                virtual_size=max(parent.metadata.virtual_size, top.metadata.virtual_size),
                what="writing volume metadata")
            await core.discard(domain, top)
        core.publish(domain, top.image_id, top.volume_id, "merged")
        return {"volume": volume_api(domain, parent)}

    return await core.jobs.submit(
        MERGE_JOB.name, job_params(params), run,
        description=f"merge volume {top.volume_id} into {parent.volume_id}",
        target=top.volume_id, request_key=params.get("request_key"),
        prepare=lambda: job_context(core, [top, parent], MERGE_JOB.name, leases))

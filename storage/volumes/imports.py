"""``Volume.import``: an image file of this host (vmdk, vdi, vhdx, qcow2, raw) converted
into a new volume with ``qemu-img convert``, as a job.

The agent runs as root and the path comes from the client, so it is read only under the
directories of ``storage.import_paths``, judged after every symlink is resolved (a link
in an import directory to ``/etc/shadow`` is refused like the path itself); the file
must be a regular file. Then it is checked as any image from outside
(:mod:`virtnode.storage.images.foreign`) before anything is made: its format told by its
own bytes, no backing or data file, no extents elsewhere, no encryption, no corruption,
and room in the domain for what ``qemu-img measure`` says the copy needs.

The job works as ``Volume.copy`` does: the target's metadata ``illegal`` in a new image,
convert with qemu-img's progress as the job's, flush, ``legal``; a failed or cancelled
import removes the target. qemu-img opens the source again by its resolved path: the
check guards against what lies in the import directories, not against someone swapping
files in them meanwhile (only root should write there).
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

from virtnode.api_schema.params import VolumeImportParams
from virtnode.errors import InvalidArgument, PermissionDenied
from virtnode.jobs.manager import JobHandle, JobKind
from virtnode.jobs.store import JobRecord
from virtnode.storage.domains.gate import Lease
from virtnode.storage.domains.service import Domain
from virtnode.storage.images import foreign, formats, qemuimg
from virtnode.storage.layout import VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes.core import VolumeCore
from virtnode.storage.volumes.files import Found
from virtnode.storage.volumes.jobs import job_context, job_params, leased, name_job
from virtnode.storage.volumes.view import preallocation, qemu_guard, volume_api
from virtnode.util.jsontypes import JsonObject

IMPORT_JOB = JobKind("Volume.import", cancellable=True)
#: The largest virtual size a volume may have (as Volume.create's schema says).
MAX_VIRTUAL_SIZE = 2 ** 56


def source_path(path: str, roots: Sequence[str]) -> tuple[str, foreign.Examined]:
    """The resolved path of an import source under one of ``roots``, and what its bytes
    say. Blocking. Raises PermissionDenied (``path_not_allowed``), InvalidArgument
    (``invalid_path``, and what :func:`foreign.examine` refuses)."""
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root) for root in roots]
    if not any(real.startswith(root.rstrip("/") + "/") for root in allowed):
        raise PermissionDenied(
            f"{path} is not under a directory of storage.import_paths "
            f"({', '.join(roots) or 'none configured'})", reason="path_not_allowed",
            field="path")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}", reason="invalid_path",
                              field="path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{path} is not a regular file", reason="invalid_path",
                                  field="path")
        try:
            return real, foreign.examine(fd)
        except foreign.Refused as exc:
            raise InvalidArgument(f"{path} is refused: {exc}", reason=exc.reason,
                                  field="path") from None
    finally:
        os.close(fd)


def _iso9660(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        foreign.require_iso9660(fd)
    finally:
        os.close(fd)


async def start_import(core: VolumeCore, params: VolumeImportParams,
                       roots: Sequence[str]) -> JsonObject:
    """Check a ``Volume.import`` call and start its job; returns ``{job_id, job}``."""
    domain = core.domains.domain(params["sd_id"])
    return await leased([domain], IMPORT_JOB.name,
                        lambda leases: _submit(core, domain, params, roots, leases))


async def _probe(core: VolumeCore, params: VolumeImportParams, roots: Sequence[str]
                 ) -> tuple[str, str, qemuimg.ImageInfo]:
    path, examined = await core.io(source_path, params["path"], roots,
                                   what="reading the import source")
    fmt = examined.format
    if params["format"] != "auto" and params["format"] != fmt:
        raise InvalidArgument(f"{params['path']} is {fmt}, not {params['format']}",
                              reason="format_mismatch", field="format")
    if fmt not in formats.IMPORTABLE:
        raise InvalidArgument(f"{params['path']} is {fmt}; imports take "
                              f"{', '.join(formats.IMPORTABLE)}", reason="unsupported_format",
                              field="path")
    if params["content"] == "iso":
        if fmt != "raw" or params["dst_format"] != "raw":
            raise InvalidArgument("an ISO image is raw: its source and dst_format must be",
                                  reason="invalid_format", field="dst_format")
        try:
            await core.io(_iso9660, path, what="reading the import source")
        except foreign.Refused as exc:
            raise InvalidArgument(f"{params['path']} is refused: {exc}", reason=exc.reason,
                                  field="path") from None
    timeout = core.domains.io_timeout
    try:
        with qemu_guard(f"probing {params['path']}"):
            info = await foreign.probe(path, fmt, timeout=timeout)
            await foreign.verify(path, fmt, timeout=timeout)
    except foreign.Refused as exc:
        raise InvalidArgument(f"{params['path']} is refused: {exc}", reason=exc.reason,
                              field="path") from None
    if not 0 < info.virtual_size <= MAX_VIRTUAL_SIZE:
        raise InvalidArgument(f"{params['path']} claims a virtual size of "
                              f"{info.virtual_size} bytes", reason="invalid_size",
                              field="path")
    return path, fmt, info


async def _submit(core: VolumeCore, domain: Domain, params: VolumeImportParams,
                  roots: Sequence[str], leases: list[Lease]) -> JobRecord:
    path, fmt, info = await _probe(core, params, roots)
    dst_fmt, allocation = params["dst_format"], params["allocation"]
    await core.check_space(domain, dst_fmt, 0, allocation, measured=qemuimg.measure(
        dst_fmt, src=path, src_fmt=fmt, timeout=core.domains.io_timeout))

    async def run(handle: JobHandle) -> JsonObject:
        name_job(handle, leases)
        image_id, volume_id = str(uuid.uuid4()), str(uuid.uuid4())
        metadata = VolumeMetadata.new(dst_fmt, allocation, info.virtual_size, parent=None,
                                      shared=False, description=params["description"],
                                      content=params["content"])
        async with core.lock(domain):
            target: Found = await core.io(volfiles.start_new, domain.layout, image_id,
                                          volume_id, metadata, new_image=True,
                                          what="writing volume metadata")
        try:
            with qemu_guard(f"importing {params['path']}"):
                await qemuimg.convert(path, target.path, src_fmt=fmt, dst_fmt=dst_fmt,
                                      preallocation=preallocation(allocation),
                                      progress=lambda p: handle.progress(min(p, 99.0)))
            await core.io(volfiles.sync_data, target.path, what="flushing the import")
            async with core.lock(domain):
                target = await core.io(volfiles.update, domain.layout, target,
                                       legality="legal", what="writing volume metadata")
        except BaseException:
            await core.discard(domain, target)
            raise
        core.publish(domain, image_id, volume_id, "created")
        return {"volume": volume_api(domain, target)}

    return await core.jobs.submit(
        IMPORT_JOB.name, job_params(params), run,
        description=f"import {Path(path).name} ({fmt}) into storage domain {domain.sd_id}",
        target=domain.sd_id, request_key=params.get("request_key"),
        prepare=lambda: job_context(core, [], IMPORT_JOB.name, leases))

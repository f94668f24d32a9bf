"""``Volume.import``: an image (vmdk, vdi, vhdx, qcow2, raw) converted into a new volume
with ``qemu-img convert``, as a job. The image is a file of this host, or is sent over HTTP
first (an upload staged in the domain by the transfer service, see the end of this module).

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

import asyncio
import contextlib
import os
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from virtnode.api_schema.params import VolumeImportParams
from virtnode.errors import (
    ApiError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from virtnode.jobs.manager import JobHandle, JobKind
from virtnode.jobs.store import JobRecord
from virtnode.storage.domains.gate import Lease
from virtnode.storage.domains.service import Domain
from virtnode.storage.images import foreign, formats, qemuimg
from virtnode.storage.layout import VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes.core import VolumeCore
from virtnode.storage.volumes.files import Found
from virtnode.storage.volumes.jobs import (
    fill_target,
    job_context,
    job_params,
    leased,
    name_job,
)
from virtnode.storage.volumes.view import preallocation, qemu_guard, volume_api
from virtnode.util.aio import to_the_end
from virtnode.util.jsontypes import JsonObject

if TYPE_CHECKING:
    from virtnode.storage.volumes.transfers import Transfer, TransferService

IMPORT_JOB = JobKind("Volume.import", cancellable=True)
#: The largest virtual size a volume may have (as Volume.create's schema says).
MAX_VIRTUAL_SIZE = 2 ** 56
#: An upload's share of an import's progress; the conversion has the rest.
UPLOAD_SHARE = 50.0
#: Seconds between progress reports while an import's upload comes.
UPLOAD_PROGRESS_INTERVAL = 1.0


def source_path(path: str, roots: Sequence[str]) -> tuple[str, foreign.Examined]:
    """The resolved path of an import source under one of ``roots``, and what its bytes
    say. Blocking. Raises PermissionDenied (``path_not_allowed``), InvalidArgument
    (``invalid_path``, and what :func:`foreign.examine` refuses)."""
    real = _allowed(path, roots)
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


def _allowed(path: str, roots: Sequence[str]) -> str:
    """``path`` resolved, if it is under one of ``roots`` (resolved too)."""
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root) for root in roots]
    if not any(real.startswith(root.rstrip("/") + "/") for root in allowed):
        raise PermissionDenied(
            f"{path} is not under a directory of storage.import_paths "
            f"({', '.join(roots) or 'none configured'})", reason="path_not_allowed",
            field="path")
    return real


def package_path(path: str, roots: Sequence[str]) -> str:
    """The resolved path of a package (an OVA) under one of ``roots``: a regular file.
    Blocking. Raises PermissionDenied (``path_not_allowed``), InvalidArgument
    (``invalid_path``)."""
    real = _allowed(path, roots)
    try:
        mode = os.stat(real, follow_symlinks=False).st_mode
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}", reason="invalid_path",
                              field="path") from None
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{path} is not a regular file", reason="invalid_path",
                              field="path")
    return real


def _examine_own(path: str) -> foreign.Examined:
    """What the bytes of a file the agent wrote (an import's upload) say."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return foreign.examine(fd)
    finally:
        os.close(fd)


def _iso9660(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        foreign.require_iso9660(fd)
    finally:
        os.close(fd)


async def start_import(core: VolumeCore, params: VolumeImportParams, roots: Sequence[str],
                       transfers: TransferService) -> JsonObject:
    """Check a ``Volume.import`` call and start its job; returns ``{job_id, job}``, and
    ``transfer`` for an upload."""
    if ("path" in params) == ("upload" in params):
        raise InvalidArgument("give the image as exactly one of path and upload",
                              reason="invalid_params", field="path")
    domain = core.domains.domain(params["sd_id"])
    if "upload" in params:
        return await _start_upload(core, domain, params, transfers)
    return await leased([domain], IMPORT_JOB.name,
                        lambda leases: _submit(core, domain, params, roots, leases))


def _check_content(params: VolumeImportParams, fmt: str | None) -> None:
    if params["content"] == "iso" and (fmt not in (None, "auto", "raw")
                                       or params["dst_format"] != "raw"):
        raise InvalidArgument("an ISO image is raw: its source and dst_format must be",
                              reason="invalid_format", field="dst_format")


async def _probe(core: VolumeCore, params: VolumeImportParams, path: str,
                 examined: foreign.Examined, *, field: str, name: str
                 ) -> tuple[str, qemuimg.ImageInfo]:
    """The format and qemu-img's view of the image at ``path`` (resolved, and examined),
    or the InvalidArgument refusing it (naming ``field``; ``name`` is the image in
    messages)."""
    fmt = examined.format
    if params["format"] != "auto" and params["format"] != fmt:
        raise InvalidArgument(f"{name} is {fmt}, not {params['format']}",
                              reason="format_mismatch", field="format")
    if fmt not in formats.IMPORTABLE:
        raise InvalidArgument(f"{name} is {fmt}; imports take "
                              f"{', '.join(formats.IMPORTABLE)}", reason="unsupported_format",
                              field=field)
    _check_content(params, fmt)
    if params["content"] == "iso":
        try:
            await core.io(_iso9660, path, what="reading the import source")
        except foreign.Refused as exc:
            raise InvalidArgument(f"{name} is refused: {exc}", reason=exc.reason,
                                  field=field) from None
    timeout = core.domains.io_timeout
    try:
        with qemu_guard(f"probing {name}"):
            info = await foreign.probe(path, fmt, timeout=timeout)
            await foreign.verify(path, fmt, timeout=timeout)
    except foreign.Refused as exc:
        raise InvalidArgument(f"{name} is refused: {exc}", reason=exc.reason,
                              field=field) from None
    if not 0 < info.virtual_size <= MAX_VIRTUAL_SIZE:
        raise InvalidArgument(f"{name} claims a virtual size of {info.virtual_size} bytes",
                              reason="invalid_size", field=field)
    return fmt, info


async def _submit(core: VolumeCore, domain: Domain, params: VolumeImportParams,
                  roots: Sequence[str], leases: list[Lease]) -> JobRecord:
    _check_content(params, params["format"])
    path, examined = await core.io(source_path, params["path"], roots,
                                   what="reading the import source")
    fmt, info = await _probe(core, params, path, examined, field="path", name=params["path"])
    await _check_space(core, domain, params, path, fmt)

    async def run(handle: JobHandle) -> JsonObject:
        name_job(handle, leases)
        return await _convert(core, domain, params, path, fmt=fmt, info=info,
                              progress=lambda p: handle.progress(min(p, 99.0)))

    return await core.jobs.submit(
        IMPORT_JOB.name, job_params(params), run,
        description=f"import {Path(path).name} ({fmt}) into storage domain {domain.sd_id}",
        target=domain.sd_id, request_key=params.get("request_key"),
        prepare=lambda: job_context(core, [], IMPORT_JOB.name, leases))


async def _check_space(core: VolumeCore, domain: Domain, params: VolumeImportParams,
                       path: str, fmt: str) -> None:
    dst_fmt = params["dst_format"]
    await core.check_space(domain, dst_fmt, 0, params["allocation"], measured=qemuimg.measure(
        dst_fmt, src=path, src_fmt=fmt, timeout=core.domains.io_timeout))


async def _convert(core: VolumeCore, domain: Domain, params: VolumeImportParams, path: str,
                   *, fmt: str, info: qemuimg.ImageInfo,
                   progress: qemuimg.ProgressCallback,
                   image_id: str | None = None) -> JsonObject:
    """Convert the checked image at ``path`` into a new volume (of a new image, its id
    ``image_id`` when the caller chose one); its API view."""
    dst_fmt, allocation = params["dst_format"], params["allocation"]
    image_id, volume_id = image_id or str(uuid.uuid4()), str(uuid.uuid4())
    metadata = VolumeMetadata.new(dst_fmt, allocation, info.virtual_size, parent=None,
                                  shared=False, description=params["description"],
                                  content=params["content"])
    async with core.lock(domain):
        target: Found = await core.io(volfiles.start_new, domain.layout, image_id,
                                      volume_id, metadata, new_image=True,
                                      what="writing volume metadata")
    target = await fill_target(core, domain, target, lambda: qemuimg.convert(
        path, target.path, src_fmt=fmt, dst_fmt=dst_fmt,
        preallocation=preallocation(allocation), progress=progress),
        what=f"importing {params.get('path', 'the upload')}")
    core.publish(domain, image_id, volume_id, "created")
    return {"volume": volume_api(domain, target)}


# --- from an upload --------------------------------------------------------------------------
#
# The image comes over HTTP into a file of the domain: an upload transfer (the transfer
# service's, with its own job, expiry and cancel) whose finalize checks only the bytes and
# their SHA-256. The import's job waits for it, then checks the file as it would a path and
# converts it, and removes the file whatever happens. The file is an illegal volume without
# parent, so what a crash leaves is removed by the start-up scan.


async def _start_upload(core: VolumeCore, domain: Domain, params: VolumeImportParams,
                        transfers: TransferService) -> JsonObject:
    _check_content(params, params["format"])
    size = params["upload"]["size"]
    transfer = await transfers.stage(domain, size, description="an image to import")
    try:
        started = await leased([domain], IMPORT_JOB.name, lambda leases: _submit_upload(
            core, domain, params, transfer, leases))
    except BaseException:
        await to_the_end(transfers.drop(transfer, by="Volume.import"), "transfer end")
        raise
    started["transfer"] = {"transfer_id": transfer.transfer_id, "url": transfer.url,
                           "expires_at": transfer.expires_at, "job_id": transfer.job_id,
                           "size": transfer.size}
    return started


async def _submit_upload(core: VolumeCore, domain: Domain, params: VolumeImportParams,
                         transfer: Transfer, leases: list[Lease]) -> JobRecord:
    async def run(handle: JobHandle) -> JsonObject:
        name_job(handle, leases)
        try:
            await _received(transfer, handle)
            staged = transfer.found
            path = str(staged.path)
            try:
                examined = await core.io(_examine_own, path, what="reading the upload")
            except foreign.Refused as exc:
                raise InvalidArgument(f"the uploaded image is refused: {exc}",
                                      reason=exc.reason, field="upload") from None
            fmt, info = await _probe(core, params, path, examined, field="upload",
                                     name="the uploaded image")
            await _check_space(core, domain, params, path, fmt)
            rest = 100.0 - UPLOAD_SHARE
            return await _convert(
                core, domain, params, path, fmt=fmt, info=info,
                progress=lambda p: handle.progress(min(UPLOAD_SHARE + p * rest / 100, 99.0)))
        finally:
            await to_the_end(_drop_staged(core, domain, transfer), "import upload removal")

    job: JobRecord = await core.jobs.submit(
        IMPORT_JOB.name, job_params(params), run,
        description=f"import an uploaded image into storage domain {domain.sd_id}",
        target=domain.sd_id, request_key=params.get("request_key"),
        prepare=lambda: job_context(core, [], IMPORT_JOB.name, leases))
    transfer.import_job_id = job.job_id
    return job


async def _received(transfer: Transfer, handle: JobHandle) -> None:
    """Wait until the upload is finalized, reporting its share of the progress; raises
    what ended it otherwise (expired, cancelled, refused)."""
    outcome = transfer.outcome
    while not outcome.done():
        if transfer.size:
            handle.progress(UPLOAD_SHARE * transfer.moved / transfer.size)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UPLOAD_PROGRESS_INTERVAL):
                await asyncio.shield(outcome)
    exc = outcome.exception()
    if exc is not None:
        if isinstance(exc, ApiError):
            raise exc
        raise FailedPrecondition(f"the upload ended: {exc}", reason="transfer_ended",
                                 object="transfer")
    handle.progress(UPLOAD_SHARE)


async def _drop_staged(core: VolumeCore, domain: Domain, transfer: Transfer) -> None:
    """The import is over: end its upload if it is still open (its volume goes with it),
    or remove the file a finalized one left."""
    if transfer.state != "closed":
        await core.jobs.cancel(transfer.job_id, by="Volume.import")
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(transfer.outcome)
    if transfer.outcome.done() and transfer.outcome.exception() is None:
        async with core.lock(domain):
            await core.discard(domain, transfer.found)


# --- from a file inside a package (an OVA's disk) -------------------------------------------


def _copy_range(src: str, offset: int, size: int, dst: Path) -> None:
    """Copy ``size`` bytes of ``src`` from ``offset`` into the new file ``dst``, durable."""
    with open(src, "rb", buffering=0) as source, open(dst, "r+b", buffering=0) as out:
        left, at = size, offset
        while left:
            moved = os.copy_file_range(source.fileno(), out.fileno(), min(left, 1 << 30), at)
            if moved == 0:
                raise InvalidArgument("the package ends inside a disk",
                                      reason="truncated_package", field="path")
            left -= moved
            at += moved
        os.fsync(out.fileno())


async def import_range(core: VolumeCore, domain: Domain, src: str, offset: int, size: int,
                       *, name: str, description: str, image_id: str,
                       progress: qemuimg.ProgressCallback) -> JsonObject:
    """Import the image stored at ``offset`` (``size`` bytes) of the file ``src`` (the
    caller resolved and checked it) into a new qcow2 volume of ``domain``: staged first
    as an illegal volume of the domain (a crash leaves it to the start-up scan), then
    checked as any image from outside and converted; the staged file is removed."""
    metadata = VolumeMetadata.new("raw", "sparse", size, parent=None, shared=False,
                                  description=f"staged: {description}")
    free = await core.io(volfiles.free_bytes, domain.layout, what="reading free space")
    if size > free:
        raise ResourceExhausted(f"{name} needs {size} bytes to be staged; storage domain "
                                f"{domain.sd_id} has {free} free", reason="no_space",
                                need=size, free=free)
    async with core.lock(domain):
        staged: Found = await core.io(volfiles.start_new, domain.layout, str(uuid.uuid4()),
                                      str(uuid.uuid4()), metadata, new_image=True,
                                      what="writing volume metadata")
    try:
        await core.io(volfiles.write_new_data, staged.path, b"", what="staging the image")
        await asyncio.to_thread(_copy_range, src, offset, size, staged.path)
        path = str(staged.path)
        params: VolumeImportParams = {
            "sd_id": domain.sd_id, "format": "auto", "dst_format": "qcow2",
            "allocation": "sparse", "content": "disk", "description": description}
        try:
            examined = await core.io(_examine_own, path, what="reading the image")
        except foreign.Refused as exc:
            raise InvalidArgument(f"{name} is refused: {exc}", reason=exc.reason,
                                  field="path") from None
        fmt, info = await _probe(core, params, path, examined, field="path", name=name)
        await _check_space(core, domain, params, path, fmt)
        return await _convert(core, domain, params, path, fmt=fmt, info=info,
                              progress=progress, image_id=image_id)
    finally:
        async with core.lock(domain):
            await core.discard(domain, staged)

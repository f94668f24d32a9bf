"""Volume transfers: a volume's bytes in (upload) and out (download) over HTTP, in the way
of oVirt's imageio tickets.

``Volume.prepareTransfer`` makes a :class:`Transfer` and returns its id, which the HTTP
side (:mod:`virtnode.rpc.transfers`) takes as the credential of ``/transfer/{id}``; the
bytes then move with :meth:`TransferService.write` and :meth:`TransferService.read`.
``Volume.finalizeTransfer`` checks and ends it, ``Volume.cancelTransfer`` drops it.

Each transfer is a job (kind ``Volume.prepareTransfer``) whose task lives as long as the
transfer: it holds the domain shared and the volume busy, reports the share of the bytes
moved as progress, and ends the transfer when it expires (``storage.transfer_timeout``
without a request) or is cancelled (``Job.cancel``, ``Volume.cancelTransfer``, the agent
stopping, a forced delete of the domain). A transfer that ends without being finalized
removes the volume an upload made; the start-up scan removes one that a crash left
(it is ``illegal`` and has no parent).

An upload's data is checked before its volume becomes legal, as any image from outside
(:mod:`virtnode.storage.images.foreign`): format, backing and data files, qemu-img check,
virtual size. Its SHA-256 is taken at finalize, from the file (mostly still in the page
cache): hashing as the bytes came took a core from the receive path on a small host and
halved an upload's throughput (see docs/performance.md), and chunks that arrive out of
order or twice would need the file read again anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import select
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from virtnode.api_schema.params import (
    VolumeCancelTransferParams,
    VolumeFinalizeTransferParams,
    VolumePrepareTransferParams,
)
from virtnode.errors import (
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from virtnode.jobs.manager import JobHandle, JobKind
from virtnode.jobs.store import JobRecord
from virtnode.storage import layout as lay
from virtnode.storage.domains.gate import Lease
from virtnode.storage.domains.service import Domain
from virtnode.storage.images import foreign
from virtnode.storage.layout import VolumeMetadata
from virtnode.storage.volumes import files as volfiles
from virtnode.storage.volumes.core import VolumeCore
from virtnode.storage.volumes.files import Found
from virtnode.storage.volumes.jobs import job_context, job_params, leased, name_job
from virtnode.storage.volumes.ranges import Received
from virtnode.storage.volumes.view import qemu_guard, require_legal, volume_api
from virtnode.util.aio import DaemonThreadPool, to_the_end
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSFER_JOB = JobKind("Volume.prepareTransfer", cancellable=True)
#: Where the HTTP side serves a transfer; the id is the credential.
URL_PREFIX = "/transfer/"
#: Threads for transfer I/O (reads, writes, hashing), apart from the storage I/O threads
#: so that a long transfer never holds up metadata work.
IO_THREADS = 4
#: How long finalize and cancel wait for the request under way to end (a PUT whose
#: connection dropped ends as soon as its handler sees it).
REQUEST_GRACE = 5.0
#: Buffers one pwritev takes at most (the kernel's UIO_MAXIOV).
IOV_MAX = 1024
#: Block size of the hashing pass over a file at finalize.
HASH_BLOCK = 4 * 1024 * 1024

Direction = Literal["upload", "download"]


class TransferBusy(Exception):
    """Another request of the transfer is under way (one PUT at a time)."""


class TransferGone(Exception):
    """The transfer ended (finalized, cancelled, expired) while the request ran."""


@dataclass(eq=False)
class Transfer:
    """One open transfer, as the service and the HTTP side share it."""

    transfer_id: str
    direction: Direction
    domain: Domain
    found: Found
    #: The bytes to move: the file's length.
    size: int
    timeout: float
    fd: int
    job_id: str = ""
    #: Upload only: the declared format, and the largest virtual size it may show.
    format: str = "raw"
    virtual_size: int | None = None
    #: Upload for a Volume.import (that job's id): finalizing checks only the bytes, and
    #: the file is the import's to convert and remove, not a volume of its own.
    import_job_id: str | None = None
    received: Received = field(init=False)
    sent: int = 0
    #: Requests under way; an open transfer does not expire while one is.
    active: int = 0
    state: Literal["open", "finalizing", "closed"] = "open"
    deadline: float = 0.0
    expires_at: float = 0.0
    handle: JobHandle | None = None
    #: One PUT (or finalize) at a time; each file operation under ``io_lock``, so that
    #: closing waits for the one under way and none starts after.
    put_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    io_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Set when the transfer ends: the job's result, or the error it ends with.
    outcome: asyncio.Future[JsonObject] = field(init=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.received = Received(self.size)
        self.outcome = asyncio.get_running_loop().create_future()
        self.touch()

    def touch(self) -> None:
        """A request came: the transfer lives ``timeout`` seconds more."""
        self.deadline = time.monotonic() + self.timeout
        self.expires_at = round(time.time() + self.timeout, 3)

    @property
    def url(self) -> str:
        return URL_PREFIX + self.transfer_id

    @property
    def moved(self) -> int:
        return self.received.total if self.direction == "upload" else self.sent


class TransferService:
    """The open transfers of this agent."""

    def __init__(self, core: VolumeCore, *, timeout: float) -> None:
        self._core = core
        self._timeout = timeout
        self._transfers: dict[str, Transfer] = {}
        self._pool = DaemonThreadPool(IO_THREADS, "transfer-io")
        core.jobs.register(TRANSFER_JOB)

    def start(self) -> None:
        self._pool.start()

    def close(self) -> None:
        """Stop the I/O threads (the transfers ended with their jobs)."""
        self._pool.shutdown(wait=False)

    # --- the API --------------------------------------------------------------------------

    async def prepare(self, params: VolumePrepareTransferParams) -> JsonObject:
        domain = self._core.domains.domain(params["sd_id"])
        start = self._start_upload if params["direction"] == "upload" else self._start_download
        started = await leased([domain], TRANSFER_JOB.name,
                               lambda leases: start(domain, params, leases))
        transfer = self._by_job(started["job_id"])
        return {"transfer_id": transfer.transfer_id, "url": transfer.url,
                "expires_at": transfer.expires_at, "job_id": transfer.job_id,
                "direction": transfer.direction, "size": transfer.size,
                "volume": volume_api(transfer.domain, transfer.found)}

    async def stage(self, domain: Domain, size: int, *, description: str) -> Transfer:
        """Start an upload of ``size`` bytes for a Volume.import into ``domain``: a file
        there (an illegal volume, so that a crash leaves nothing the start-up scan keeps)
        that finalizing checks only for its bytes; the caller sets ``import_job_id`` and,
        once the transfer's outcome is a result, converts and removes the file."""
        params: VolumePrepareTransferParams = {
            "sd_id": domain.sd_id, "direction": "upload", "size": size, "format": "raw",
            "content": "disk", "description": description}
        started = await leased([domain], TRANSFER_JOB.name,
                               lambda leases: self._start_upload(domain, params, leases,
                                                                 staged=True))
        return self._by_job(started["job_id"])

    async def finalize(self, params: VolumeFinalizeTransferParams) -> JsonObject:
        transfer = self._lookup(params["transfer_id"])
        try:
            async with asyncio.timeout(REQUEST_GRACE):
                await transfer.put_lock.acquire()
        except TimeoutError:
            raise FailedPrecondition("a request of the transfer is still under way; try "
                                     "again once it has ended", reason="transfer_busy",
                                     object="transfer") from None
        try:
            if transfer.state != "open":
                raise self._gone()
            transfer.state = "finalizing"
            try:
                result = await self._finish(transfer, params.get("sha256"))
            except FailedPrecondition as exc:
                if exc.reason == "transfer_incomplete":
                    transfer.state = "open"
                    raise
                await self._end(transfer, error=exc)
                raise
            except BaseException as exc:
                error = exc if isinstance(exc, ApiError) else None
                await to_the_end(self._end(transfer, error=error), "transfer end")
                raise
            await self._end(transfer, result=result)
        finally:
            transfer.put_lock.release()
            transfer.changed.set()
        await self._core.jobs.wait(transfer.job_id, REQUEST_GRACE)
        return result

    async def cancel(self, params: VolumeCancelTransferParams) -> JsonObject:
        await self.drop(self._lookup(params["transfer_id"]), by="Volume.cancelTransfer")
        return {}

    async def drop(self, transfer: Transfer, *, by: str) -> None:
        """Cancel the transfer's job, which ends it (an upload's volume removed)."""
        await self._core.jobs.cancel(transfer.job_id, by=by)

    # --- for the HTTP side ----------------------------------------------------------------

    def get(self, transfer_id: str) -> Transfer | None:
        """The open transfer with this id, or None."""
        transfer = self._transfers.get(transfer_id)
        return transfer if transfer is not None and transfer.state != "closed" else None

    @contextlib.asynccontextmanager
    async def request(self, transfer: Transfer, *, exclusive: bool,
                      wait: float = REQUEST_GRACE) -> AsyncIterator[None]:
        """Hold while an HTTP request works on ``transfer``: it does not expire meanwhile.
        ``exclusive`` (a PUT) waits up to ``wait`` seconds for the one under way to end;
        raises :class:`TransferBusy` past it and :class:`TransferGone` once it ended."""
        if transfer.state != "open":
            raise TransferGone
        transfer.active += 1
        transfer.touch()
        try:
            if not exclusive:
                yield
                return
            try:
                async with asyncio.timeout(wait):
                    await transfer.put_lock.acquire()
            except TimeoutError:
                raise TransferBusy from None
            try:
                if transfer.state != "open":
                    raise TransferGone
                yield
            finally:
                transfer.put_lock.release()
        finally:
            transfer.active -= 1
            transfer.touch()

    async def write(self, transfer: Transfer, offset: int, data: Sequence[bytes]) -> None:
        """Write the buffers ``data`` one after the other at ``offset`` of an upload and
        record them received. Raises :class:`TransferGone`, ``ValueError`` (outside the
        size), ``OSError`` and DeadlineExceeded."""
        end = offset + sum(len(buffer) for buffer in data)
        if not 0 <= offset <= end <= transfer.size:
            raise ValueError(f"bytes {offset}-{end} lie outside the upload's {transfer.size}")
        async with transfer.io_lock:
            if transfer.state == "closed":
                raise TransferGone
            await self._io(_pwrite, transfer.fd, data, offset, what="writing the upload")
            transfer.received.add(offset, end)
        transfer.touch()
        self._progress(transfer)

    async def splice(self, transfer: Transfer, sock: socket.socket, offset: int, length: int,
                     *, idle: float) -> int:
        """Move up to ``length`` bytes from ``sock`` (a plain stream socket whose reading
        the event loop has paused) straight into the upload at ``offset``: ``os.splice``
        through a pipe, in a transfer thread, no byte through Python. Returns the bytes
        moved, fewer when the peer closed; what moved counts as received. Raises
        :class:`TransferGone`, ``OSError`` and DeadlineExceeded (``body_timeout``: no data
        for ``idle`` seconds)."""
        if not 0 <= offset <= offset + length <= transfer.size:
            raise ValueError(f"bytes {offset}-{offset + length} lie outside the upload's "
                             f"{transfer.size}")
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        moved = 0

        def report(count: int) -> None:
            nonlocal moved
            if count > moved:
                transfer.received.add(offset + moved, offset + count)
                moved = count
                transfer.touch()
                self._progress(transfer)

        def stopped() -> bool:  # read in the thread
            return stop.is_set() or transfer.state == "closed"

        async with transfer.io_lock:
            if transfer.state == "closed":
                raise TransferGone
            future = asyncio.wrap_future(self._pool.submit(
                _splice, sock.fileno(), transfer.fd, offset, length, idle=idle,
                stopped=stopped,
                progress=lambda count: loop.call_soon_threadsafe(report, count)))
            try:
                done = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The file stays open (io_lock held) until the thread has let go of it.
                stop.set()
                await asyncio.wait([future])
                raise
            except TimeoutError:
                raise DeadlineExceeded(f"no data arrived for {idle:g} s",
                                       reason="body_timeout") from None
            except _Stopped:
                raise TransferGone from None
        report(done)
        return done

    async def read(self, transfer: Transfer, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a download at ``offset``. Raises
        :class:`TransferGone`, ``OSError`` and DeadlineExceeded."""
        async with transfer.io_lock:
            if transfer.state == "closed":
                raise TransferGone
            data = await self._io(os.pread, transfer.fd, length, offset,
                                  what="reading the volume")
        transfer.sent += len(data)
        transfer.touch()
        self._progress(transfer)
        return data

    # --- starting -------------------------------------------------------------------------

    async def _start_upload(self, domain: Domain, params: VolumePrepareTransferParams,
                            leases: list[Lease], *, staged: bool = False) -> JobRecord:
        core = self._core
        for name in ("image_id", "volume_id"):
            if name in params:
                raise InvalidArgument(f"an upload makes a new volume; {name} is for "
                                      "downloads", reason="invalid_params", field=name)
        size, fmt = params.get("size"), params.get("format")
        if size is None:
            raise InvalidArgument("an upload needs size: the bytes to be sent",
                                  reason="invalid_size", field="size")
        if fmt is None:
            raise InvalidArgument("an upload needs format: raw or qcow2",
                                  reason="invalid_format", field="format")
        virtual_size = params.get("virtual_size")
        if fmt == "raw" and virtual_size is not None and virtual_size != size:
            raise InvalidArgument("a raw image's virtual size is its size",
                                  reason="invalid_size", field="virtual_size")
        content = params["content"]
        if content == "iso" and fmt != "raw":
            raise InvalidArgument("an ISO image is raw", reason="invalid_format",
                                  field="format")
        await core.check_space(domain, "raw", size, "preallocated")
        image_id, volume_id = str(uuid.uuid4()), str(uuid.uuid4())
        metadata = VolumeMetadata.new(fmt, "sparse", virtual_size or size, parent=None,
                                      shared=False, description=params["description"],
                                      content=content)
        async with core.lock(domain):
            found = await core.io(volfiles.start_new, domain.layout, image_id, volume_id,
                                  metadata, new_image=True, what="writing volume metadata")
        try:
            fd = await core.io(_create_data, found, what="creating the volume")
        except BaseException:
            await core.discard(domain, found)
            raise
        transfer = Transfer(secrets.token_urlsafe(32), "upload", domain, found, size,
                            self._timeout, fd, format=fmt, virtual_size=virtual_size)
        if staged:
            transfer.import_job_id = ""  # set by the import once its job exists
        return await self._submit(transfer, params, leases,
                                  "upload of an image to import" if staged
                                  else f"upload into volume {volume_id}")

    async def _start_download(self, domain: Domain, params: VolumePrepareTransferParams,
                              leases: list[Lease]) -> JobRecord:
        core = self._core
        for name in ("size", "format", "virtual_size"):
            if name in params:
                raise InvalidArgument(f"{name} is for uploads", reason="invalid_params",
                                      field=name)
        if params["content"] != "disk":
            raise InvalidArgument("content is for uploads", reason="invalid_params",
                                  field="content")
        for name in ("image_id", "volume_id"):
            if name not in params:
                raise InvalidArgument(f"a download needs {name}", reason="invalid_params",
                                      field=name)
        _, found = await core.volume({"sd_id": domain.sd_id, "image_id": params["image_id"],
                                      "volume_id": params["volume_id"]})
        if found.metadata.parent is not None:
            raise FailedPrecondition(
                f"volume {found.volume_id} is a layer over {found.metadata.parent}; its file "
                "alone is not a disk. Copy it with collapse first, then download the copy",
                reason="has_parent", object="volume", id=found.volume_id)
        chain = await core.chain(domain, found)  # its header names no other file
        require_legal(chain)
        core.check_free(found)
        await core.check_unused(domain, [found])
        fd, size = await core.io(_open_data, found, what="opening the volume")
        transfer = Transfer(secrets.token_urlsafe(32), "download", domain, found, size,
                            self._timeout, fd)
        return await self._submit(transfer, params, leases,
                                  f"download of volume {found.volume_id}")

    async def _submit(self, transfer: Transfer, params: VolumePrepareTransferParams,
                      leases: list[Lease], description: str) -> JobRecord:
        """Start the transfer's job; the job owns the transfer from then on. If it cannot
        start, what was made is undone."""
        core = self._core
        self._transfers[transfer.transfer_id] = transfer

        async def run(handle: JobHandle) -> JsonObject:
            name_job(handle, leases)
            transfer.handle = handle
            try:
                return await self._live(transfer)
            except asyncio.CancelledError:
                await to_the_end(self._abandon(transfer), "transfer end")
                if transfer.outcome.done() and not transfer.outcome.exception():
                    return transfer.outcome.result()  # finalized meanwhile: too late
                raise

        try:
            job: JobRecord = await core.jobs.submit(
                TRANSFER_JOB.name, job_params(params), run, description=description,
                target=transfer.found.volume_id,
                prepare=lambda: self._owned(transfer, job_context(
                    core, [transfer.found], TRANSFER_JOB.name, leases,
                    no_writers=transfer.direction == "download")))
        except BaseException:
            await to_the_end(self._end(transfer), "transfer end")
            raise
        transfer.job_id = job.job_id
        log.info("transfer %s… (%s) of volume %s started as job %s",
                 transfer.transfer_id[:6], transfer.direction, transfer.found.volume_id,
                 job.job_id)
        return job

    @contextlib.asynccontextmanager
    async def _owned(self, transfer: Transfer,
                     resources: contextlib.AbstractAsyncContextManager[None]
                     ) -> AsyncIterator[None]:
        """The job's resources, and the transfer ended with the job whatever happens: a job
        cancelled before its task began never runs it."""
        async with resources:
            try:
                yield
            finally:
                await to_the_end(self._abandon(transfer), "transfer end")

    async def _live(self, transfer: Transfer) -> JsonObject:
        """The job's task: wait until the transfer is finalized, or expires. Requests
        push the deadline back; one under way, or a finalize, keeps it open."""
        while not transfer.outcome.done():
            remaining = transfer.deadline - time.monotonic()
            if remaining <= 0 and not transfer.active and transfer.state == "open":
                await self._end(transfer, error=DeadlineExceeded(
                    f"the transfer had no request for {transfer.timeout:g} s",
                    reason="transfer_expired", object="transfer"))
                break
            transfer.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining if remaining > 0 else transfer.timeout):
                    await transfer.changed.wait()
        return await transfer.outcome

    async def _abandon(self, transfer: Transfer) -> None:
        """End a transfer whose job is cancelled, once a finalize under way is over."""
        while transfer.state == "finalizing":
            transfer.changed.clear()
            await transfer.changed.wait()
        await self._end(transfer)

    # --- ending ---------------------------------------------------------------------------

    async def _finish(self, transfer: Transfer, sha256: str | None) -> JsonObject:
        """Check what was moved; the result of finalizing. Raises the API error that ends
        it (``transfer_incomplete`` leaves it open)."""
        if transfer.direction == "download":
            digest = None
            if sha256 is not None:
                digest = await self._io(_hash_file, transfer.fd, transfer.size,
                                        what="hashing the volume")
                _compare(sha256, digest)
            result: JsonObject = {"volume": volume_api(transfer.domain, transfer.found),
                                  "size": transfer.size}
            if digest is not None:
                result["sha256"] = digest
            return result
        received = transfer.received
        if not received.complete:
            raise FailedPrecondition(
                f"{received.contiguous} of {transfer.size} bytes were received without a "
                f"gap ({received.total} in all); send the rest, then finalize",
                reason="transfer_incomplete", object="transfer", received=received.contiguous,
                size=transfer.size)
        digest = await self._io(_hash_file, transfer.fd, transfer.size,
                                what="hashing the upload")
        if sha256 is not None:
            _compare(sha256, digest)
        if transfer.import_job_id is not None:  # the import checks the image
            return {"import_job_id": transfer.import_job_id, "size": transfer.size,
                    "sha256": digest}
        found = await self._check_image(transfer)
        result = {"volume": volume_api(transfer.domain, found), "size": transfer.size,
                  "sha256": digest}
        transfer.found = found
        return result

    async def _check_image(self, transfer: Transfer) -> Found:
        """Check an uploaded image as :mod:`foreign` says, then mark its volume legal with
        the virtual size it shows; returns it."""
        core, domain, found = self._core, transfer.domain, transfer.found
        timeout = core.domains.io_timeout
        path = str(found.path)
        with _refusals():
            examined = await self._io(_examine, transfer.fd, what="reading the upload")
            if examined.format != transfer.format:
                raise foreign.Refused("format_mismatch", f"the upload was declared "
                                      f"{transfer.format}, but the image is "
                                      f"{examined.format}")
            if found.metadata.content == "iso":
                await self._io(foreign.require_iso9660, transfer.fd,
                               what="reading the upload")
            with qemu_guard(f"checking volume {found.volume_id}"):
                virtual = transfer.size
                if transfer.format != "raw":
                    info = await foreign.probe(path, transfer.format, timeout=timeout)
                    await foreign.verify(path, transfer.format, timeout=timeout)
                    virtual = info.virtual_size
        if transfer.virtual_size is not None and virtual > transfer.virtual_size:
            raise InvalidArgument(
                f"the image's virtual size is {virtual} bytes, more than the "
                f"{transfer.virtual_size} declared", reason="virtual_size_too_large",
                field="virtual_size")
        free = await core.io(volfiles.free_bytes, domain.layout, what="reading free space")
        if virtual - transfer.size > free:
            raise ResourceExhausted(
                f"the image's virtual size is {virtual} bytes; storage domain "
                f"{domain.sd_id} could never hold it ({free} bytes free)", reason="no_space",
                need=virtual - transfer.size, free=free)
        await core.io(volfiles.sync_data, found.path, what="flushing the upload")
        async with core.lock(domain):
            return await core.io(volfiles.update, domain.layout, found, legality="legal",
                                 virtual_size=virtual, what="writing volume metadata")

    async def _end(self, transfer: Transfer, *, result: JsonObject | None = None,
                   error: BaseException | None = None) -> None:
        """End the transfer: forget it, close its file, remove the volume an upload made
        unless it was finalized, and settle its outcome. Idempotent."""
        if transfer.state == "closed":
            return
        transfer.state = "closed"
        self._transfers.pop(transfer.transfer_id, None)
        core, found = self._core, transfer.found
        try:
            async with transfer.io_lock:  # the file operation under way ends first
                await self._io(os.close, transfer.fd, what="closing the volume")
            if transfer.direction == "upload" and result is None:
                async with core.lock(transfer.domain):
                    await core.discard(transfer.domain, found)
                log.info("upload into volume %s ended unfinished; volume removed",
                         found.volume_id)
            elif transfer.direction == "upload" and transfer.import_job_id is None:
                core.publish(transfer.domain, found.image_id, found.volume_id, "created")
        finally:
            if not transfer.outcome.done():
                if result is not None:
                    transfer.outcome.set_result(result)
                else:
                    transfer.outcome.set_exception(error or FailedPrecondition(
                        "the transfer ended", reason="transfer_ended", object="transfer"))
                    transfer.outcome.exception()  # retrieved: nobody may wait for it
            transfer.changed.set()

    # --- helpers --------------------------------------------------------------------------

    def _by_job(self, job_id: str) -> Transfer:
        return next(t for t in self._transfers.values() if t.job_id == job_id)

    def _lookup(self, transfer_id: str) -> Transfer:
        transfer = self.get(transfer_id)
        if transfer is None:
            raise self._gone()
        return transfer

    @staticmethod
    def _gone() -> NotFound:
        return NotFound("no such transfer: it never existed, or it has ended",
                        reason="no_transfer", object="transfer")

    def _progress(self, transfer: Transfer) -> None:
        if transfer.handle is not None and transfer.size:
            transfer.handle.progress(min(99.0, 100.0 * transfer.moved / transfer.size))

    async def _io(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        """Run blocking ``fn(*args)`` in the transfer threads with ``storage.io_timeout``;
        raises DeadlineExceeded (``storage_timeout``) past it."""
        timeout = self._core.domains.io_timeout
        future = asyncio.wrap_future(self._pool.submit(fn, *args))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        except TimeoutError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise DeadlineExceeded(f"{what} did not finish within {timeout:g}s",
                                   reason="storage_timeout") from None


def _compare(expected: str, digest: str) -> None:
    if expected != digest:
        raise FailedPrecondition(f"the data's SHA-256 is {digest}, not {expected}",
                                 reason="checksum_mismatch", object="transfer",
                                 sha256=digest)


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except foreign.Refused as exc:
        raise InvalidArgument(f"the uploaded image is refused: {exc}", reason=exc.reason,
                              object="transfer") from None


# --- blocking helpers, run in the transfer threads --------------------------------------


def _create_data(found: Found) -> int:
    """Create an upload's data file (it must not exist) and return it open for writing."""
    fd = os.open(found.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    os.fchmod(fd, 0o644)
    return fd


def _open_data(found: Found) -> tuple[int, int]:
    """Open a volume's data file for reading (checked as the domain's files are); returns
    the descriptor and the file's length."""
    fd = lay.open_file(found.path)
    try:
        os.set_blocking(fd, True)
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


class _Stopped(Exception):
    """A splice stopped because its transfer ended."""


#: Bytes one splice call moves at most, and the pipe's size.
SPLICE_BLOCK = 1024 * 1024
#: Seconds between checks that a splice's transfer is still open.
SPLICE_CHECK = 0.5
#: How often a splice reports its progress (bytes).
SPLICE_REPORT = 64 * 1024 * 1024
F_SETPIPE_SZ = 1031


def _splice(sock_fd: int, fd: int, offset: int, length: int, *, idle: float,
            stopped: Callable[[], bool], progress: Callable[[int], None]) -> int:
    """Move up to ``length`` bytes from the non-blocking socket ``sock_fd`` into ``fd`` at
    ``offset`` through a pipe; returns the bytes moved. Raises TimeoutError after ``idle``
    seconds without data and :class:`_Stopped` once ``stopped()``."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only costs more calls
            fcntl.fcntl(write_end, F_SETPIPE_SZ, SPLICE_BLOCK)
        done = reported = 0
        waited = 0.0
        while done < length:
            if stopped():
                raise _Stopped
            try:
                got = os.splice(sock_fd, write_end, min(SPLICE_BLOCK, length - done),
                                flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if waited >= idle:
                    raise TimeoutError from None
                ready, _, _ = select.select([sock_fd], [], [], SPLICE_CHECK)
                waited = 0.0 if ready else waited + SPLICE_CHECK
                continue
            if got == 0:
                break  # the peer closed
            waited = 0.0
            while got:
                wrote = os.splice(read_end, fd, got, offset_dst=offset + done,
                                  flags=os.SPLICE_F_MOVE)
                done += wrote
                got -= wrote
            if done - reported >= SPLICE_REPORT:
                progress(done)
                reported = done
        return done
    finally:
        os.close(read_end)
        os.close(write_end)


def _pwrite(fd: int, data: Sequence[bytes], offset: int) -> None:
    views = [memoryview(buffer) for buffer in data if buffer]
    while views:
        written = os.pwritev(fd, views[:IOV_MAX], offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views and written:
            views[0] = views[0][written:]


def _hash_file(fd: int, size: int) -> str:
    """The SHA-256 of the file's first ``size`` bytes; the file is flushed too."""
    hasher = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(HASH_BLOCK, size - offset), offset)
        if not block:
            raise OSError(f"the file ends at {offset} bytes, before {size}")
        hasher.update(block)
        offset += len(block)
    os.fsync(fd)
    return str(hasher.hexdigest())


def _examine(fd: int) -> foreign.Examined:
    return foreign.examine(fd)

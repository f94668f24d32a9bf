"""``/transfer/{transfer_id}``: the bytes of volume transfers over plain HTTP.

``Volume.prepareTransfer`` returns the path; the transfer id in it is the credential, and
the request must also come from a caller with the admin role (a reader who learned an id
can do nothing with it). The routes live on every listener and pass the same guards as
``/rpc`` (connection caps, Host and Origin: a page of another site cannot PUT).

- ``PUT`` writes an upload: the whole body at once, or one chunk with ``Content-Range:
  bytes a-b/size``. The body is streamed to the file in batches of :data:`BATCH` bytes,
  one batch written in an I/O thread while the next is read, so memory stays bounded
  whatever the size (the 16 MiB message limit of ``/rpc`` is for JSON, never applied
  here). Each read must bring data within ``server.body_timeout`` (408 otherwise). What
  arrived before a connection dropped is written and counts as received. On a plain
  (not TLS) listener a body of at least :data:`SPLICE_MIN` bytes with a Content-Length
  is not read through Python: once aiohttp has parsed the head, its reading is paused
  and a transfer thread splices the socket into the file through a pipe (one thread
  moving the bytes instead of the loop and a writer, which on two cores is what curl
  leaves); the connection is closed after the answer.
- ``HEAD`` tells the size (``Upload-Length``) and, for an upload, ``Upload-Offset``: the
  bytes received without a gap, where a client resumes after an interruption.
- ``GET`` reads a download, whole (200) or one ``Range`` (206 with ``Content-Range``; 416
  for a range it cannot serve).

One PUT at a time per transfer: another waits a moment for the one under way (which ends
as soon as it notices its connection is gone) and is then refused with 409. Errors have
the body of a JSON-RPC error (``error.data.name``, ``reason``) and an HTTP status.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from virtnode import jsonrpc
from virtnode.errors import (
    Aborted,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from virtnode.rpc.httpranges import RangeError, byte_range, content_range
from virtnode.rpc.identity import Caller
from virtnode.rpc.server import CallerOf
from virtnode.storage.volumes.transfers import (
    URL_PREFIX,
    Transfer,
    TransferBusy,
    TransferGone,
    TransferService,
)

log = logging.getLogger(__name__)

#: Bytes of a PUT written at a time (one batch in an I/O thread, the next being read).
BATCH = 4 * 1024 * 1024
#: Bytes of a GET read at a time.
BLOCK = 1024 * 1024
OCTETS = "application/octet-stream"


class _Refused(Exception):
    def __init__(self, status: int, error: ApiError, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.Response(text=jsonrpc.encode(jsonrpc.error(None, self.error)),
                            status=self.status, content_type="application/json",
                            headers=self.headers)


_Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


class TransferRoutes:
    """The HTTP side of :class:`TransferService`."""

    def __init__(self, transfers: TransferService, *, body_timeout: float) -> None:
        self._transfers = transfers
        self._body_timeout = body_timeout

    def add_routes(self, router: web.UrlDispatcher, caller: CallerOf) -> None:
        path = URL_PREFIX + "{transfer_id}"
        router.add_route("PUT", path, self._refusing(self.put, caller))
        router.add_route("GET", path, self._refusing(self.get, caller))
        router.add_route("HEAD", path, self._refusing(self.head, caller))

    async def close(self) -> None:
        """Nothing to end here: a transfer's requests end with their connections, and the
        transfers themselves are jobs, which the job manager stops."""

    @staticmethod
    def _refusing(handler: _Handler, caller: CallerOf
                  ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request, caller(request))
            except _Refused as refused:
                return refused.response()
        return handle

    # --- the methods ---------------------------------------------------------------------

    async def head(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        transfer = self._transfer(request, caller)
        headers = {"Accept-Ranges": "bytes", "Upload-Length": str(transfer.size),
                   "Cache-Control": "no-store"}
        if transfer.direction == "upload":
            try:
                # A PUT whose connection just dropped may still be writing its last bytes.
                async with self._transfers.request(transfer, exclusive=True):
                    pass
            except TransferBusy:
                pass  # a PUT is going on: what was received so far
            except TransferGone:
                raise _gone() from None
            headers["Upload-Offset"] = str(transfer.received.contiguous)
        else:
            headers["Content-Length"] = str(transfer.size)
            headers["Content-Type"] = OCTETS
        return web.Response(status=200, headers=headers)

    async def put(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        transfer = self._transfer(request, caller)
        if transfer.direction != "upload":
            raise _wrong_method("a download is read with GET", "GET, HEAD")
        start, end = self._put_range(request, transfer)
        spliced = False
        try:
            async with self._transfers.request(transfer, exclusive=True):
                sock = _spliceable(request, end - start)
                if sock is not None:
                    spliced = True
                    await self._splice(request, transfer, sock, start, end)
                else:
                    await self._receive(request, transfer, start, end)
        except TransferBusy:
            raise _Refused(409, Aborted("another PUT of this transfer is under way",
                                        reason="transfer_busy", object="transfer")) from None
        except TransferGone:
            raise _gone() from None
        except DeadlineExceeded as exc:
            raise _Refused(408 if exc.reason == "body_timeout" else 504, exc) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _Refused(507, ResourceExhausted("no space left in the storage domain",
                                                      reason="no_space")) from None
            log.error("upload into volume %s: %s", transfer.found.volume_id, exc)
            raise _Refused(500, ApiError("cannot write the upload; see the agent log",
                                         reason="io_error")) from None
        received = transfer.received
        response = web.json_response(
            {"received": received.contiguous, "size": transfer.size},
            headers={"Upload-Offset": str(received.contiguous), "Cache-Control": "no-store"})
        if spliced:
            response.force_close()  # aiohttp's parser never saw the body: no next request
        return response

    async def get(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        transfer = self._transfer(request, caller)
        if transfer.direction != "download":
            raise _wrong_method("an upload is written with PUT; HEAD tells how much arrived",
                                "PUT, HEAD")
        size = transfer.size
        start, end, status = 0, size, 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": OCTETS,
                   "Cache-Control": "no-store"}
        if "Range" in request.headers:
            try:
                start, end = byte_range(request.headers["Range"], size)
            except RangeError as exc:
                raise _Refused(416, InvalidArgument(str(exc), reason="range_not_satisfiable"),
                               {"Content-Range": f"bytes */{size}"}) from None
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        response = web.StreamResponse(status=status, headers=headers)
        try:
            async with self._transfers.request(transfer, exclusive=False):
                await response.prepare(request)
                await self._send(response, transfer, start, end)
        except TransferGone:
            if not response.prepared:
                raise _gone() from None
            response.force_close()  # the client sees the body cut short
        except (DeadlineExceeded, OSError, ConnectionError) as exc:
            if not response.prepared:
                raise _Refused(500, ApiError("cannot read the volume; see the agent log",
                                             reason="io_error")) from None
            log.info("download of volume %s cut short: %s", transfer.found.volume_id, exc)
            response.force_close()
        return response

    # --- moving the bytes ----------------------------------------------------------------

    async def _splice(self, request: web.Request, transfer: Transfer, sock: socket.socket,
                      start: int, end: int) -> None:
        """Write the body into ``[start, end)`` of the upload straight from the socket:
        what aiohttp has read of it already, then the rest spliced by a transfer thread
        while aiohttp reads nothing more. A dropped connection ends it quietly; what
        arrived until then is written."""
        content, transport = request.content, request.transport
        assert transport is not None
        head: list[bytes] = []
        while data := content.read_nowait():
            head.append(data)
        transport.pause_reading()
        try:
            size = sum(len(data) for data in head)
            if size > end - start:
                raise _Refused(400, InvalidArgument(
                    f"the body is longer than the {end - start} bytes of its range",
                    reason="body_too_long"))
            if head:
                await self._transfers.write(transfer, start, head)
            position = start + size
            if position < end:
                position += await self._transfers.splice(
                    transfer, sock, position, end - position, idle=self._body_timeout)
            if position < end:
                log.info("upload into volume %s: connection lost after %d bytes",
                         transfer.found.volume_id, position - start)
        finally:
            content.feed_eof()

    async def _receive(self, request: web.Request, transfer: Transfer, start: int,
                       end: int) -> None:
        """Stream the body into ``[start, end)`` of the upload. A dropped connection ends
        it quietly; what arrived until then is written."""
        content = request.content
        offset = position = start
        batch: list[bytes] = []
        size = 0
        writing: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            # One deadline for the whole body, pushed back as data comes (at most once a
            # second: a timer per read would cost more than the read).
            async with asyncio.timeout(self._body_timeout) as deadline:
                pushed = loop.time()
                while position < end:
                    chunk = await content.readany()
                    if not chunk:
                        break  # the body ended early (chunked encoding)
                    if len(chunk) > end - position:
                        raise _Refused(400, InvalidArgument(
                            f"the body is longer than the {end - start} bytes of its range",
                            reason="body_too_long"))
                    batch.append(chunk)  # written as they are (pwritev): no copy
                    size += len(chunk)
                    position += len(chunk)
                    if size >= BATCH:
                        if writing is not None:
                            await writing
                        writing = asyncio.create_task(
                            self._transfers.write(transfer, offset, batch),
                            name="upload-write")
                        offset, batch, size = offset + size, [], 0
                    now = loop.time()
                    if now - pushed > 1.0:
                        deadline.reschedule(now + self._body_timeout)
                        pushed = now
            if position == end and not content.at_eof():
                raise _Refused(400, InvalidArgument(
                    f"the body is longer than the {end - start} bytes of its range",
                    reason="body_too_long"))
        except TimeoutError:
            raise DeadlineExceeded(f"no data arrived for {self._body_timeout:g} s",
                                   reason="body_timeout") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.info("upload into volume %s: connection lost after %d bytes (%s)",
                     transfer.found.volume_id, position - start, exc)
        finally:
            if writing is not None:
                await writing
        if batch:
            await self._transfers.write(transfer, offset, batch)

    async def _send(self, response: web.StreamResponse, transfer: Transfer, start: int,
                    end: int) -> None:
        position = start
        reading = asyncio.create_task(self._transfers.read(
            transfer, position, min(BLOCK, end - position)), name="download-read")
        try:
            while position < end:
                data = await reading
                if not data:
                    raise OSError(f"the volume ends at {position} bytes, before {end}")
                position += len(data)
                if position < end:
                    reading = asyncio.create_task(self._transfers.read(
                        transfer, position, min(BLOCK, end - position)), name="download-read")
                try:
                    async with asyncio.timeout(self._body_timeout):
                        await response.write(data)
                except TimeoutError:
                    raise ConnectionError(f"the client read nothing for "
                                          f"{self._body_timeout:g} s") from None
            await response.write_eof()
        finally:
            if not reading.done():
                reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    # --- checks --------------------------------------------------------------------------

    def _transfer(self, request: web.Request, caller: Caller) -> Transfer:
        if not caller.may("write"):
            raise _Refused(403, PermissionDenied(
                "volume transfers need the admin role", reason="role"))
        transfer = self._transfers.get(request.match_info["transfer_id"])
        if transfer is None:
            raise _gone()
        return transfer

    @staticmethod
    def _put_range(request: web.Request, transfer: Transfer) -> tuple[int, int]:
        length = request.content_length
        if "Content-Range" in request.headers:
            try:
                start, end = content_range(request.headers["Content-Range"], transfer.size)
            except RangeError as exc:
                raise _Refused(exc.status, InvalidArgument(
                    str(exc), reason="bad_range" if exc.status == 400
                    else "range_not_satisfiable"),
                    {"Content-Range": f"bytes */{transfer.size}"}) from None
        else:
            start, end = 0, transfer.size
        if length is not None and length != end - start:
            raise _Refused(400, InvalidArgument(
                f"Content-Length is {length}, but the range holds {end - start} bytes "
                f"(the whole upload is {transfer.size})", reason="bad_length"))
        return start, end


#: Bodies at least this long are spliced from the socket into the file (plain listeners).
SPLICE_MIN = 16 * 1024 * 1024


def _spliceable(request: web.Request, length: int) -> socket.socket | None:
    """The socket to splice the body of ``request`` from, if it can be: a plain (not
    TLS) stream socket, a body of ``Content-Length`` bytes and at least
    :data:`SPLICE_MIN` of them."""
    transport = request.transport
    if (length < SPLICE_MIN or transport is None or request.content_length != length
            or "Transfer-Encoding" in request.headers
            or transport.get_extra_info("sslcontext") is not None):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    return sock  # type: ignore[no-any-return]


def _gone() -> _Refused:
    return _Refused(404, NotFound("no such transfer: it never existed, or it has ended",
                                  reason="no_transfer", object="transfer"))


def _wrong_method(message: str, allow: str) -> _Refused:
    return _Refused(405, FailedPrecondition(message, reason="wrong_direction",
                                            object="transfer"), {"Allow": allow})

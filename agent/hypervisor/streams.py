"""libvirt streams and sockets to a domain's consoles, for the console service.

- :func:`open_console` (a pool thread) opens a domain's serial console on a non-blocking
  stream; :class:`ConsoleStream` then drives it on the event loop: libvirtaio calls it
  when bytes arrive or can leave, ``recv`` and ``send`` never wait, and nothing of it
  runs in the pool but closing.
- :func:`open_graphics` (a pool thread) asks libvirt for a socket connected to the
  domain's VNC server (``virDomainOpenGraphics``): no TCP port of QEMU's is used.
- :func:`screenshot` (a pool thread) reads the screen through a blocking stream.

libvirt's console lock: a domain's console has one holder at a time. The agent opens it
without ``FORCE``, so it never takes the console from someone else (``virsh console``),
and such a holder makes the open fail with :class:`~virtnode.errors.FailedPrecondition`
``console_busy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import libvirt

from virtnode.errors import ApiError, FailedPrecondition, ResourceExhausted
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection, Domain, Stream

log = logging.getLogger(__name__)

#: Largest screenshot read, bytes (a 16384x16384 PPM is 768 MiB: no display is that big).
MAX_SCREENSHOT = 256 * 1024 * 1024
#: Bytes asked of a stream per read; reads per wake-up, so one chatty guest cannot hog
#: the loop.
CHUNK = 64 * 1024
READS_PER_WAKEUP = 16
#: Send buffer of QEMU's end of a VNC socket (the kernel doubles it): a whole 1080p
#: update in raw 32-bit pixels is 7.9 MiB; most are far smaller.
GRAPHICS_SNDBUF = 4 * 1024 * 1024
#: ``SO_SNDBUFFORCE`` (Linux), which Python's socket module does not name.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

_READABLE = libvirt.VIR_STREAM_EVENT_READABLE
_WRITABLE = libvirt.VIR_STREAM_EVENT_WRITABLE
_GONE = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP


def open_console(conn: Connection, dom: Domain) -> Stream:
    """Open ``dom``'s first console on a new non-blocking stream. Blocking.

    Raises FailedPrecondition ``console_busy`` when another client holds it.
    """
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    try:
        dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_SAFE)
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and \
                "console session exists" in str(exc):
            raise FailedPrecondition(
                "another client (virsh console?) holds the VM's serial console",
                reason="console_busy", object="vm", id=dom.UUIDString()) from None
        raise
    return stream


def open_graphics(dom: Domain, index: int) -> socket.socket:
    """A socket connected to the ``index``-th graphics device's server, with
    authentication skipped (the agent authorised the caller with its token). Blocking.

    The agent makes the socket pair itself (``virDomainOpenGraphics``) rather than taking
    libvirt's (``virDomainOpenGraphicsFD``), so that it can size the end QEMU writes to:
    a unix stream socket buffers only its writer's send buffer, and with the default
    (``net.core.wmem_default``, about 208 KiB) QEMU writes one screen update of a few
    MiB in many bursts, with a turn of its main loop between each.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _grow_send_buffer(theirs, GRAPHICS_SNDBUF)
        dom.openGraphics(index, theirs.fileno(), libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # QEMU has its own copy now
    ours.setblocking(False)
    return ours


def _grow_send_buffer(sock: socket.socket, size: int) -> None:
    """Set ``sock``'s send buffer to ``size`` bytes: beyond ``net.core.wmem_max`` where the
    agent may (``CAP_NET_ADMIN``), else as far as the limit allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def screenshot(conn: Connection, dom: Domain) -> tuple[str, bytes]:
    """The first screen of ``dom``: its MIME type and bytes. Blocking."""
    stream = conn.newStream(0)
    try:
        mime = dom.screenshot(stream, 0, 0)
        data = bytearray()
        while chunk := stream.recv(1 << 20):
            if not isinstance(chunk, bytes):  # a blocking stream never says "later"
                continue
            data += chunk
            if len(data) > MAX_SCREENSHOT:
                raise ResourceExhausted("the screenshot is too big", reason="too_big")
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return mime, bytes(data)


class ConsoleStream:
    """An open console stream, driven by the event loop.

    ``on_data`` gets every chunk the guest writes; ``on_end`` is called once, with a
    reason, when the stream ends (libvirt hung up, the VM stopped, an error). Both run on
    the loop. :meth:`close` is idempotent.
    """

    def __init__(self, hypervisor: Hypervisor, stream: Stream,
                 on_data: Callable[[bytes], None], on_end: Callable[[str], None]) -> None:
        self._hv = hypervisor
        self._stream = stream
        self._on_data = on_data
        self._on_end = on_end
        self._pending = bytearray()
        self._watching = 0
        self._ended = False
        self._closed = False
        self._drained = asyncio.Event()
        self._drained.set()

    def start(self) -> None:
        """Start reading (on the loop)."""
        self._watch(_READABLE | _GONE)

    @property
    def pending(self) -> int:
        """Bytes written to the console that libvirt has not taken yet."""
        return len(self._pending)

    async def drained(self) -> None:
        """Return once libvirt has taken every byte written (or the stream ended)."""
        await self._drained.wait()

    def write(self, data: bytes) -> None:
        """Send ``data`` to the guest's console; what libvirt cannot take now waits."""
        if self._ended:
            return
        self._pending += data
        self._drained.clear()
        self._flush()

    async def close(self) -> None:
        """Stop the stream and let libvirt release the console."""
        if self._closed:
            return
        self._closed = True
        self._end("closed by the agent")
        stream = self._stream

        def abort(_conn: Connection) -> None:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()

        with contextlib.suppress(ApiError):
            await self._hv.call(abort, what="closing a console stream")

    def _watch(self, events: int) -> None:
        if events == self._watching or self._ended:
            return
        try:
            if self._watching:
                self._stream.eventUpdateCallback(events)
            else:
                self._stream.eventAddCallback(events, self._on_event, None)
        except libvirt.libvirtError as exc:
            self._end(f"cannot watch the console stream: {exc}")
            return
        self._watching = events

    def _on_event(self, _stream: Stream, events: int, _opaque: object) -> None:
        try:
            if events & _READABLE:
                self._read()
            if events & _WRITABLE:
                self._flush()
            if events & _GONE and not self._ended:
                self._end("the console stream hung up")
        except Exception:
            log.exception("console stream callback failed")
            self._end("internal error")

    def _read(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if self._ended:
                return
            try:
                data = self._stream.recv(CHUNK)
            except libvirt.libvirtError as exc:
                self._end(f"console read failed: {exc}")
                return
            if isinstance(data, int):  # -2: nothing more for now
                return
            if not data:
                self._end("the console closed")
                return
            self._on_data(data)

    def _flush(self) -> None:
        while self._pending and not self._ended:
            try:
                sent = self._stream.send(bytes(self._pending[:CHUNK]))
            except libvirt.libvirtError as exc:
                self._end(f"console write failed: {exc}")
                return
            if sent < 0:  # -2: libvirt takes more once writable
                self._watch(_READABLE | _WRITABLE | _GONE)
                return
            del self._pending[:sent]
        self._watch(_READABLE | _GONE)
        self._drained.set()

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._pending.clear()
        self._drained.set()
        if self._watching:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.eventRemoveCallback()
            self._watching = 0
        try:
            self._on_end(reason)
        except Exception:
            log.exception("console stream end callback failed")

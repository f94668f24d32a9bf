"""The connections API calls arrive on: one POST request, or one WebSocket.

A :class:`WsSession` answers requests concurrently and pushes notifications. What it has
not sent yet is bounded: past ``soft`` unsent bytes the server stops reading from the
socket (the client's own sends then block: backpressure), and past ``hard`` the session is
closed with 1008 and its buffers dropped, since a client that does not read must not make
the agent hold its answers without end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import ClientWebSocketResponse, WSCloseCode, web

from virtnode import jsonrpc
from virtnode.rpc.identity import Caller
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

#: A server-side WebSocketResponse, or a client-side ClientWebSocketResponse (uplinks).
WebSocketLike = web.WebSocketResponse | ClientWebSocketResponse

#: Notifications waiting for a slow WebSocket peer before new ones are dropped. Event
#: subscriptions give up on a slow peer long before (config events.subscriber_queue); this
#: only bounds memory if something else pushes without looking at the backlog.
OUTBOX_LIMIT = 1_000_000
#: Bytes of notifications framed into one transport write at most.
WRITE_BATCH = 256 * 1024
#: Pushing pauses while the transport holds more than this many unsent bytes...
WRITE_HIGH_WATER = 256 * 1024
#: ...checking again this often, seconds.
WRITE_POLL = 0.005
#: Seconds a session closed for not reading gets to say goodbye before it is cut.
OVERFLOW_CLOSE_WAIT = 1.0


#: Answers longer than this are checked against the hard limit however the transport is.
BIG_ANSWER = 64 * 1024


class FlowState(Protocol):
    """What the connection's protocol knows of its transport (``connguard``'s guard)."""

    writing_paused: bool
    lost: bool


@dataclass(frozen=True, slots=True)
class SendLimits:
    """Unsent bytes of one WebSocket: above ``soft`` reading pauses, above ``hard`` it closes."""

    soft: int
    hard: int


#: For WebSockets the agent dials itself (uplinks): the peer is the agent's own engine.
UNBOUNDED = SendLimits(1 << 62, 1 << 62)


class _BaseSession:
    def __init__(self, caller: Caller, max_inflight: int) -> None:
        self.caller = caller
        self.inflight = 0
        self._max_inflight = max_inflight
        self._close_callbacks: list[Callable[[], None]] = []

    @property
    def max_inflight(self) -> int:
        return self._max_inflight

    def on_close(self, callback: Callable[[], None]) -> None:
        self._close_callbacks.append(callback)

    def close_session(self) -> None:
        """Run the close callbacks (once)."""
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("session close callback failed")


class HttpSession(_BaseSession):
    """One POST request: no pushing."""

    can_push = False
    backlog = 0
    closed = False

    def push(self, message: JsonObject) -> bool:
        return False

    def push_text(self, text: str) -> bool:
        return False

    async def wait_backlog(self, size: int) -> None:
        return None


class Cork:
    """Coalesces what one loop iteration writes to a TCP socket into full segments.

    Each WebSocket response is its own write; under load many are ready in the same
    iteration. Corking the socket on the first write and uncorking it on the next
    iteration sends them together instead of one packet per response.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._corked = False

    def __call__(self) -> None:
        if not self._corked and self._set(1):
            self._corked = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        self._corked = False
        self._set(0)

    def _set(self, value: int) -> bool:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, value)
        except OSError:
            return False
        return True


def cork_for(request: web.Request) -> Cork | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return Cork(sock)


class WsSession(_BaseSession):
    """One WebSocket connection: concurrent requests and pushed notifications."""

    can_push = True

    def __init__(self, ws: WebSocketLike, caller: Caller, max_inflight: int, *,
                 cork: Cork | None = None,
                 transport: asyncio.BaseTransport | None = None,
                 limits: SendLimits = UNBOUNDED,
                 flow: FlowState | None = None) -> None:
        super().__init__(caller, max_inflight)
        self.ws = ws
        self._cork = cork
        self._limits = limits
        self._flow = flow
        #: Unanswered messages past which the server stops reading this session.
        self._read_limit = 2 * max_inflight
        #: The server side's transport: pushed notifications are framed here, many per
        #: write (a subscriber gets events in batches; one write each, not one per event).
        self._transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        #: The local IP address of a TCP connection (what the client dialled).
        self._local_ip: str | None = (
            str(sockname[0]).split("%")[0] if isinstance(sockname, tuple) else None)
        #: Messages received on this connection whose answer has not been sent yet.
        self.unanswered = 0
        self._outbox: collections.deque[str] = collections.deque()
        self._outbox_chars = 0
        #: Set while the outbox has something for the writer.
        self._ready = asyncio.Event()
        self._dropped = 0
        #: (backlog, future) of callers waiting for the backlog to fall to that size.
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closer: asyncio.Task[None] | None = None

    async def wait_backlog(self, size: int) -> None:
        """Return once at most ``size`` notifications wait to be written (or on close)."""
        if len(self._outbox) <= size or self.ws.closed:
            return
        future = asyncio.get_running_loop().create_future()
        self._drain_waiters.append((size, future))
        try:
            await future
        finally:
            self._drain_waiters = [w for w in self._drain_waiters if w[1] is not future]

    def local_address(self) -> str | None:
        """The local IP address a TCP client reached the agent on; None otherwise."""
        return self._local_ip

    def _wake_drain_waiters(self, closing: bool = False) -> None:
        backlog = len(self._outbox)
        for size, future in self._drain_waiters:
            if (closing or backlog <= size) and not future.done():
                future.set_result(None)

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    @property
    def closed(self) -> bool:
        transport = self._transport
        return (self.ws.closed or self._closer is not None
                or (transport is not None and transport.is_closing()))

    def unsent_bytes(self) -> int:
        """Bytes written for the peer and not yet taken by the kernel, queued or buffered."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + self._outbox_chars

    def backed_up(self) -> bool:
        """Whether the server should stop reading requests for now: the peer does not read
        its answers, has sent twice the in-flight limit that are not answered yet (the
        ones past the limit are refused at once, but each still costs the loop a turn),
        or is gone (see :attr:`closed`)."""
        # It runs for every message received: plain attributes on the common path.
        if self.unanswered >= self._read_limit or self._closer is not None:
            return True
        flow = self._flow
        if flow is not None:
            if flow.lost:
                return True
            if not flow.writing_paused:
                # The transport holds less than its high-water mark (64 KiB), far below
                # any soft limit worth setting.
                return self._outbox_chars > self._limits.soft
        return self.unsent_bytes() > self._limits.soft

    async def wait_unblocked(self) -> None:
        """Return once the session is no longer backed up, or closes."""
        while self.backed_up() and not self.closed:  # noqa: ASYNC110
            await asyncio.sleep(WRITE_POLL)

    def _fits(self, size: int) -> bool:
        """False, and the session closing, when ``size`` more bytes pass the hard limit."""
        if self._closer is not None:
            return False
        unsent = size + self.unsent_bytes()
        if unsent <= self._limits.hard:
            return True
        log.warning("closing the WebSocket of %s: it does not read (%d bytes unsent, limit %d)",
                    self.caller.identity, unsent, self._limits.hard)
        self._outbox.clear()
        self._outbox_chars = 0
        self._closer = asyncio.create_task(self._close_overflowed(), name="ws-overflow-close")
        return False

    async def _close_overflowed(self) -> None:
        try:
            async with asyncio.timeout(OVERFLOW_CLOSE_WAIT):
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                    message=b"too much unsent: the client does not read")
        except Exception:  # the connection is being cut anyway
            log.debug("closing an overflowed WebSocket failed", exc_info=True)
        finally:
            if self._transport is not None:
                self._transport.abort()
            self._wake_drain_waiters(closing=True)

    def push(self, message: JsonObject) -> bool:
        return self.push_text(jsonrpc.encode(message))

    def push_text(self, text: str) -> bool:
        if self.closed:
            return False
        outbox = self._outbox
        if len(outbox) >= OUTBOX_LIMIT:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("%s is not reading; dropping notifications", self.caller.identity)
            return True
        if not self._fits(len(text)):
            return False
        outbox.append(text)
        self._outbox_chars += len(text)
        if len(outbox) == 1:
            self._ready.set()
        return True

    async def send(self, text: str) -> None:
        # A closed WebSocket's send_str raises ConnectionResetError, handled below. The
        # hard limit can be passed only while the transport is backed up, or by a big
        # answer: only then is it worth asking how much is unsent.
        if self._closer is not None:
            return
        flow = self._flow
        if ((flow is None or flow.writing_paused or len(text) > BIG_ANSWER)
                and not self._fits(len(text))):
            return
        if self._cork is not None and self.unanswered > 1:
            # Other messages are waiting for answers that may follow in this iteration.
            self._cork()
        try:  # noqa: SIM105 - contextlib.suppress costs an object per response here
            await self.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass  # the peer went away; its calls' answers have nowhere to go

    def _pop(self) -> str:
        text = self._outbox.popleft()
        self._outbox_chars -= len(text)
        return text

    async def write_pushed(self) -> None:
        outbox, ready = self._outbox, self._ready
        try:
            while True:
                await ready.wait()
                while outbox:
                    if self._transport is not None:
                        await self._write_frames(self._transport)
                    else:
                        await self.send(self._pop())
                    if self._drain_waiters:
                        self._wake_drain_waiters()
                ready.clear()
        finally:
            self._wake_drain_waiters(closing=True)

    async def _write_frames(self, transport: asyncio.WriteTransport) -> None:
        """Write what the outbox holds (up to a bound) as text frames in one write.

        Server frames are unmasked and this agent never compresses, so a frame is a
        header and the UTF-8 text (RFC 6455, 5.2). Each write is whole, so frames from
        here and responses from aiohttp's writer never interleave inside a frame.
        """
        outbox = self._outbox
        if self.ws.closed or transport.is_closing():
            outbox.clear()
            self._outbox_chars = 0
            return
        parts: list[bytes] = []
        size = 0
        while outbox and size < WRITE_BATCH:
            data = self._pop().encode()
            parts.append(_text_frame_header(len(data)))
            parts.append(data)
            size += len(data)
        transport.write(b"".join(parts))
        # The peer reads slower than we write: hold further notifications in the outbox,
        # where the subscriptions see the backlog, not in the transport's buffer.
        while (transport.get_write_buffer_size() > WRITE_HIGH_WATER  # noqa: ASYNC110
               and not transport.is_closing()):
            await asyncio.sleep(WRITE_POLL)


def _text_frame_header(length: int) -> bytes:
    if length < 126:
        return bytes((0x81, length))
    if length < 1 << 16:
        return bytes((0x81, 126)) + length.to_bytes(2, "big")
    return bytes((0x81, 127)) + length.to_bytes(8, "big")

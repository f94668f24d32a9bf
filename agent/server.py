"""The HTTP side of the API: listeners, WebSocket and POST transports, health.

``GET /rpc`` upgraded to WebSocket carries requests, batches and pushed notifications;
requests on one socket run concurrently and each response goes out when it is ready.
``POST /rpc`` answers one message per request. ``GET /healthz`` reports readiness and
``GET /metrics`` serves Prometheus text to callers with the reader role or above.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType, web

from virtnode import jsonrpc
from virtnode.config import AccessConfig, Listener, ServerConfig
from virtnode.errors import InvalidRequest
from virtnode.identity import Caller, peer_uid, tcp_caller, tls_caller, unix_caller
from virtnode.rpc import Dispatcher

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
HealthFn = Callable[[], JsonObject]
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
MetricsFn = Callable[[], bytes]

#: Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


class _Cork:
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


def _cork_for(request: web.Request) -> _Cork | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return _Cork(sock)


class WsSession(_BaseSession):
    """One WebSocket connection: concurrent requests and pushed notifications."""

    can_push = True

    def __init__(self, ws: WebSocketLike, caller: Caller, max_inflight: int,
                 cork: _Cork | None = None,
                 transport: asyncio.BaseTransport | None = None) -> None:
        super().__init__(caller, max_inflight)
        self.ws = ws
        self._cork = cork
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
        #: Set while the outbox has something for the writer.
        self._ready = asyncio.Event()
        self._dropped = 0
        #: (backlog, future) of callers waiting for the backlog to fall to that size.
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []

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
        return self.ws.closed

    def push(self, message: JsonObject) -> bool:
        return self.push_text(jsonrpc.encode(message))

    def push_text(self, text: str) -> bool:
        if self.ws.closed:
            return False
        outbox = self._outbox
        if len(outbox) >= OUTBOX_LIMIT:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("%s is not reading; dropping notifications", self.caller.identity)
            return True
        outbox.append(text)
        if len(outbox) == 1:
            self._ready.set()
        return True

    async def send(self, text: str) -> None:
        if self.ws.closed:
            return
        if self._cork is not None and self.unanswered > 1:
            # Other messages are waiting for answers that may follow in this iteration.
            self._cork()
        try:  # noqa: SIM105 - contextlib.suppress costs an object per response here
            await self.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass  # the peer went away; its calls' answers have nowhere to go

    async def write_pushed(self) -> None:
        outbox, ready = self._outbox, self._ready
        try:
            while True:
                await ready.wait()
                while outbox:
                    if self._transport is not None:
                        await self._write_frames(self._transport)
                    else:
                        await self.send(outbox.popleft())
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
            return
        parts: list[bytes] = []
        size = 0
        while outbox and size < WRITE_BATCH:
            data = outbox.popleft().encode()
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


class ApiServer:
    """Serves the dispatcher on every configured listener."""

    def __init__(self, config: ServerConfig, access: AccessConfig, dispatcher: Dispatcher,
                 health: HealthFn, metrics: MetricsFn | None = None,
                 *, tls: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._tls = tls
        self._metrics = metrics
        self._access = access
        self._dispatcher = dispatcher
        self._health = health
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        self._sockets: list[Path] = []
        self._sessions: set[WsSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every listener; raises ``OSError`` if one cannot be bound.

        tls:// listeners serve with the context given to the constructor.
        """
        app = web.Application(client_max_size=self._config.max_message_size)
        app.router.add_get("/rpc", self._get_rpc)
        app.router.add_post("/rpc", self._post_rpc)
        app.router.add_get("/healthz", self._healthz)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._get_metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for listener in self._config.listeners:
            self._sites.append(await self._bind(listener))

    async def _bind(self, listener: Listener) -> web.BaseSite:
        assert self._runner is not None
        site: web.BaseSite
        if listener.kind == "unix":
            path = Path(listener.path)
            await asyncio.to_thread(_prepare_unix_path, path)
            site = web.UnixSite(self._runner, str(path))
            await site.start()
            os.chmod(path, self._config.unix_socket_mode)
            self._sockets.append(path)
        else:
            if listener.kind == "tls" and self._tls is None:
                raise ValueError(f"{listener}: no TLS context to serve it with")
            site = web.TCPSite(self._runner, listener.host, listener.port, reuse_address=True,
                               ssl_context=self._tls if listener.kind == "tls" else None)
            await site.start()
        log.info("listening on %s", listener)
        return site

    async def stop_accepting(self) -> None:
        """Stop accepting new connections; existing ones keep going."""
        for site in self._sites:
            await site.stop()
        self._sites.clear()

    async def close_sessions(self) -> None:
        """Cancel calls still running and close every WebSocket (1001, going away)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in list(self._sessions):
            await session.ws.close(code=1001, message=b"agent stopping")

    async def close(self) -> None:
        """Release the listeners and remove our unix sockets. Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for path in self._sockets:
            path.unlink(missing_ok=True)
        self._sockets.clear()

    def local_addresses(self) -> list[str]:
        """The addresses (not loopback) that connected clients reached this agent on."""
        found = set()
        for session in self._sessions:
            sockname = session.local_address()
            if sockname is not None and not ipaddress.ip_address(sockname).is_loopback:
                found.add(sockname)
        return sorted(found)

    def _caller(self, request: web.Request) -> Caller:
        transport = request.transport
        tls = transport.get_extra_info("ssl_object") if transport else None
        if transport is not None and isinstance(tls, ssl.SSLObject):
            # Only verified certificates get this far: CERT_REQUIRED fails the handshake.
            return tls_caller(tls.getpeercert(), transport.get_extra_info("peername"),
                              self._access)
        sockname = transport.get_extra_info("sockname") if transport else None
        if isinstance(sockname, str | bytes):
            sock = transport.get_extra_info("socket") if transport else None
            return unix_caller(peer_uid(sock), self._access)
        peer = transport.get_extra_info("peername") if transport else None
        return tcp_caller(peer, self._access)

    async def _healthz(self, _request: web.Request) -> web.Response:
        health = self._health()
        status = 200 if health["status"] == "ok" else 503
        return web.json_response(health, status=status)

    async def _get_metrics(self, request: web.Request) -> web.Response:
        assert self._metrics is not None
        if not self._caller(request).may("read"):
            return web.Response(status=403, text="metrics need the reader role\n")
        return web.Response(body=self._metrics(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _post_rpc(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            error = InvalidRequest(
                f"message larger than {self._config.max_message_size} bytes",
                reason="message_too_large",
            )
            return _json(jsonrpc.error(None, error), status=413)
        session = HttpSession(self._caller(request), self._config.max_inflight_per_connection)
        try:
            answer = await self._dispatcher.handle(body, session)
        finally:
            session.close_session()
        if answer is None:
            return web.Response(status=204)
        return web.Response(text=answer, content_type="application/json")

    async def _get_rpc(self, request: web.Request) -> web.StreamResponse:
        # aiohttp refuses a WebSocket message of exactly max_msg_size bytes (POST bodies of
        # that size pass): one more makes max_message_size the largest accepted on both.
        ws = web.WebSocketResponse(
            max_msg_size=self._config.max_message_size + 1, heartbeat=30.0, compress=False
        )
        if not ws.can_prepare(request).ok:
            error = InvalidRequest("GET /rpc needs a WebSocket upgrade; or POST /rpc",
                                   reason="websocket_required")
            return _json(jsonrpc.error(None, error), status=400)
        await ws.prepare(request)
        session = WsSession(ws, self._caller(request), self._config.max_inflight_per_connection,
                            _cork_for(request), request.transport)
        await self.serve_session(session)
        return ws

    def new_session(self, ws: WebSocketLike, caller: Caller) -> WsSession:
        """A session for a WebSocket this agent opened itself (an uplink)."""
        return WsSession(ws, caller, self._config.max_inflight_per_connection)

    async def serve_session(self, session: WsSession) -> None:
        """Answer the requests that arrive on ``session`` until its WebSocket closes."""
        ws = session.ws
        self._sessions.add(session)
        writer = asyncio.create_task(session.write_pushed(), name="ws-push-writer")
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self._spawn(session, msg.data)
                elif msg.type is WSMsgType.ERROR:
                    log.info("websocket of %s closed: %s", session.caller.identity,
                             ws.exception())
        finally:
            self._sessions.discard(session)
            session.close_session()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    def _spawn(self, session: WsSession, data: str | bytes) -> None:
        session.unanswered += 1
        task = asyncio.create_task(self._answer(session, data), name="rpc-call")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, session: WsSession, data: str | bytes) -> None:
        try:
            answer = await self._dispatcher.handle(data, session)
            if answer is not None:
                await session.send(answer)
        finally:
            session.unanswered -= 1


def _json(obj: JsonObject, status: int) -> web.Response:
    return web.Response(text=jsonrpc.encode(obj), status=status, content_type="application/json")


def _prepare_unix_path(path: Path) -> None:
    """Create the socket's directory and remove a stale socket left by a crash.

    Raises ``OSError`` (EADDRINUSE) if another process is serving on the path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(98, f"another process is serving on {path}")

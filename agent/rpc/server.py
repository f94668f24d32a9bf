"""The HTTP side of the API: listeners, WebSocket and POST transports, health.

``GET /rpc`` upgraded to WebSocket carries requests, batches and pushed notifications;
requests on one socket run concurrently and each response goes out when it is ready.
``POST /rpc`` answers one message per request. ``GET /healthz`` reports readiness and
``GET /metrics`` serves Prometheus text to callers with the reader role or above. Services
add endpoints of their own (:class:`Route`, e.g. volume transfers) beside these.

Every connection passes the listener's guard first (:mod:`virtnode.rpc.connguard`: connection
caps and timeouts), then every request the browser checks (:mod:`virtnode.rpc.origins`: Host
and Origin); a WebSocket's unsent bytes are bounded by :mod:`virtnode.rpc.sessions`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import WSMsgType, web

from virtnode import jsonrpc
from virtnode.config import AccessConfig, Listener, ServerConfig
from virtnode.errors import ApiError, InvalidRequest, PermissionDenied
from virtnode.rpc.connguard import Gate, GuardedProtocol, Limits, Registry, connection_budget
from virtnode.rpc.dispatch import Dispatcher
from virtnode.rpc.identity import Caller, peer_uid, tcp_caller, tls_caller, unix_caller
from virtnode.rpc.origins import Site, host_refusal, origin_refusal
from virtnode.rpc.sessions import HttpSession, SendLimits, WebSocketLike, WsSession, cork_for
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

HealthFn = Callable[[], JsonObject]
MetricsFn = Callable[[], bytes]
#: Who made a request: the caller of the connection it came on (identity and role).
CallerOf = Callable[[web.Request], Caller]


#: Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: What POST /rpc takes: a browser can send a cross-site POST without asking only as
#: text/plain, form data or multipart, so anything but JSON is refused.
JSON_TYPES = frozenset({"application/json"})


class Routes(Protocol):
    """HTTP paths a service serves beside /rpc on every listener (consoles, transfers).

    Its requests pass the same guard and Host/Origin checks as /rpc. ``close`` ends what
    they hold open (WebSockets, uploads) when the agent stops, with the API's sessions.
    """

    def add_routes(self, router: web.UrlDispatcher, caller: CallerOf) -> None:
        """Add the paths; ``caller`` tells a handler who made a request."""

    async def close(self) -> None: ...


class _GuardedSite(web.BaseSite):
    """A listener whose connections pass a :class:`Gate` before aiohttp sees them."""

    def __init__(self, runner: web.AppRunner, listener: Listener, gate: Gate,
                 registry: Registry, *, ssl_context: ssl.SSLContext | None,
                 backlog: int) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._listener = listener
        self._gate = gate
        self._registry = registry

    @property
    def name(self) -> str:
        return str(self._listener)

    def _protocol(self) -> GuardedProtocol:
        server = self._runner.server
        assert server is not None
        return GuardedProtocol(server, self._gate, self._registry)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        listener = self._listener
        if listener.kind == "unix":
            self._server = await loop.create_unix_server(
                self._protocol, listener.path, backlog=self._backlog)
        else:
            # A TLS connection meets the guard only once its handshake is done: until then
            # the handshake timeout is what bounds a client that never finishes it.
            handshake = self._gate.limits.header_timeout if self._ssl_context else None
            self._server = await loop.create_server(
                self._protocol, listener.host, listener.port, ssl=self._ssl_context,
                backlog=self._backlog, reuse_address=True, ssl_handshake_timeout=handshake)


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
        self._guards: Registry = {}
        self._send_limits = SendLimits(config.send_buffer_soft, config.send_buffer_hard)
        self._routes: list[Routes] = []

    def add_routes(self, routes: Routes) -> None:
        """Serve ``routes`` too, on every listener; call before :meth:`start`."""
        self._routes.append(routes)

    async def start(self) -> None:
        """Bind every listener; raises ``OSError`` if one cannot be bound.

        tls:// listeners serve with the context given to the constructor.
        """
        app = web.Application(client_max_size=self._config.max_message_size,
                              middlewares=[self._guard_requests])
        app.router.add_get("/rpc", self._get_rpc)
        app.router.add_post("/rpc", self._post_rpc)
        app.router.add_get("/healthz", self._healthz)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._get_metrics)
        for routes in self._routes:
            routes.add_routes(app.router, self._caller)
        # aiohttp's own keep-alive timer closes idle connections too (the guard's does it
        # with or without it).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self._config.idle_timeout)
        await self._runner.setup()
        listeners = self._config.listeners
        budget = connection_budget(self._config.max_connections, len(listeners))
        if budget < self._config.max_connections:
            log.warning("serving at most %d connections per listener: the descriptor limit "
                        "(RLIMIT_NOFILE) leaves no room for server.max_connections = %d",
                        budget, self._config.max_connections)
        for listener in listeners:
            self._sites.append(await self._bind(listener, budget))

    async def _bind(self, listener: Listener, max_connections: int) -> web.BaseSite:
        assert self._runner is not None
        config = self._config
        limits = Limits(max_connections, min(config.max_connections_per_caller, max_connections),
                        config.header_timeout, config.idle_timeout)
        gate = Gate(str(listener), limits, Site.of(listener, config.allowed_hosts))
        if listener.kind == "tls" and self._tls is None:
            raise ValueError(f"{listener}: no TLS context to serve it with")
        if listener.kind == "unix":
            await asyncio.to_thread(_prepare_unix_path, Path(listener.path))
        site = _GuardedSite(self._runner, listener, gate, self._guards, backlog=config.backlog,
                            ssl_context=self._tls if listener.kind == "tls" else None)
        await site.start()
        if listener.kind == "unix":
            os.chmod(listener.path, config.unix_socket_mode)
            self._sockets.append(Path(listener.path))
        log.info("listening on %s", listener)
        return site

    @web.middleware
    async def _guard_requests(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                              ) -> web.StreamResponse:
        """Refuse what a browser must not do, and keep the connection's timers away."""
        guard = self._guards.get(request.transport) if request.transport else None
        if guard is None:  # pragma: no cover - every connection comes through a guard
            return await handler(request)
        site = guard.gate.site
        refusal, reason = host_refusal(site, request.headers.get("Host")), "bad_host"
        if refusal is None:
            refusal, reason = origin_refusal(site, request.headers.get("Origin")), "bad_origin"
        if refusal is not None:
            return _refuse(PermissionDenied(refusal, reason=reason), 403)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_finished()

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
        for routes in self._routes:
            await routes.close()

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

    def unsent_bytes(self) -> int:
        """Bytes the open WebSockets hold for peers that have not read them yet."""
        return sum(session.unsent_bytes() for session in self._sessions)

    async def _post_rpc(self, request: web.Request) -> web.StreamResponse:
        if request.content_type not in JSON_TYPES:
            error = InvalidRequest("POST /rpc takes Content-Type: application/json",
                                   reason="content_type")
            return _json(jsonrpc.error(None, error), status=415)
        try:
            async with asyncio.timeout(self._config.body_timeout):
                body = await request.read()
        except TimeoutError:
            error = InvalidRequest(
                f"the request body did not arrive within {self._config.body_timeout} s",
                reason="body_timeout")
            return _json(jsonrpc.error(None, error), status=408)
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
                            cork=cork_for(request), transport=request.transport,
                            limits=self._send_limits,
                            flow=self._guards.get(request.transport) if request.transport
                            else None)
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
                if session.backed_up():
                    if session.closed:
                        # The peer is gone: what it sent before leaving has nobody to read
                        # the answers.
                        break
                    # Read no more until the peer reads: its own sends then block.
                    await session.wait_unblocked()
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
                # An answer waiting to be sent still counts against the in-flight limit.
                session.inflight += 1
                try:
                    await session.send(answer)
                finally:
                    session.inflight -= 1
        except Exception:
            # The dispatcher answers every failure of a call; this is one of the transport.
            # Its id is unknown here, so the peer learns of it when the connection ends.
            log.exception("cannot answer a message from %s; closing its connection",
                          session.caller.identity)
            await session.ws.close(code=1011, message=b"internal error")
        finally:
            session.unanswered -= 1


def _refuse(error: ApiError, status: int) -> web.Response:
    return _json(jsonrpc.error(None, error), status=status)


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

"""``GET /console/{token}``: console sessions over WebSocket, and the console pages.

``VM.openConsole`` hands out the token; this is where it is used, on any listener:

- upgraded to a WebSocket, the token is taken (once) and the socket bridged: to the VM's
  serial console (binary frames both ways, the console's recent output first; text frames
  from the agent are JSON notices) or to its VNC server (RFB in binary frames; what the
  client sends passes :class:`~virtnode.vm.rfb.ClientFilter`);
- without the upgrade (a browser opening the URL) the token is only looked at, and the
  console page of its kind is served; the page opens the WebSocket on its own URL.

``/console/static/...`` serves the pages' scripts: the agent's own (``web/console``),
noVNC and xterm.js (``web/node_modules``, pinned by ``web/package-lock.json``).

A refused token is an HTTP 403 before any upgrade. The sessions end with WebSocket close
codes: 1000 (client left), 1001 (agent stopping), 1002 (the VNC client broke RFB), 1008
(a client that does not read its output), 1011 (the console went away), 4001 (taken
over), 4009 (takeover fail: another writer is attached), 4010 (the VM stopped).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import json
import logging
import os
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from virtnode import jsonrpc
from virtnode.config import ConsoleConfig
from virtnode.errors import ApiError
from virtnode.rpc.server import CallerOf
from virtnode.vm.console import CLOSE_IN_USE, ConsoleService
from virtnode.vm.consoletokens import ConsoleGrant
from virtnode.vm.rfb import ClientFilter, RfbError

log = logging.getLogger(__name__)

#: Largest WebSocket message a console client may send (keystrokes, RFB messages).
MAX_CLIENT_MESSAGE = 1 << 20
#: Bytes per frame to a client at most.
FRAME = 256 * 1024
#: Seconds the agent's stop waits for the console sessions to close.
CLOSE_GRACE = 5.0
#: Where the pages' scripts come from, under ``console.web_dir``.
STATIC_ROOTS = {"app": "console", "novnc": "node_modules/@novnc/novnc",
                "xterm": "node_modules/@xterm/xterm"}
STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}
_STATUS = {"NotFound": 404, "FailedPrecondition": 409, "PermissionDenied": 403,
           "ResourceExhausted": 429, "Unavailable": 503, "DeadlineExceeded": 504}
#: The pages load only what the agent serves, connect only to the agent, and are framed
#: only by pages of the agent's own origin (the web UI).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"),
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "max-age=3600",
}


#: Where a system install puts the pages and their npm packages.
SYSTEM_WEB_DIR = Path("/usr/share/virtnode/web")


def default_web_dir() -> Path:
    """``web/`` of the source tree this module was loaded from when there is one (a
    checkout, or its development install), else :data:`SYSTEM_WEB_DIR`."""
    source = Path(os.path.realpath(__file__)).parents[2] / "web"
    return source if (source / "console").is_dir() else SYSTEM_WEB_DIR


def missing_pages(web_dir: Path) -> list[str]:
    """What of the console pages is not under ``web_dir``: the page scripts, noVNC or
    xterm.js (``make setup`` installs the npm packages of a checkout)."""
    return [name for name, root in STATIC_ROOTS.items() if not (web_dir / root).is_dir()]


def _close_reason(text: str) -> bytes:
    """A close frame's reason: at most 123 bytes of UTF-8."""
    return text.encode()[:123].decode(errors="ignore").encode()


class _Client:
    """A console session's socket as the console service sees it: output is queued (up to
    ``limit`` bytes, past which the client is closed 1008) and sent by :meth:`pump`."""

    def __init__(self, ws: web.WebSocketResponse, grant: ConsoleGrant, limit: int) -> None:
        self.identity = grant.by
        self.writer = grant.writer
        self._ws = ws
        self._limit = limit
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self.closing: tuple[int, str] | None = None

    def feed(self, data: bytes) -> None:
        if self.closing is not None or not data:
            return
        if self._queued + len(data) > self._limit:
            self.end(1008, "console output left unread: client too slow")
            return
        self._queue.append(data)
        self._queued += len(data)
        self._wake.set()

    def end(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            self._queue.clear()
            self._queued = 0
            self._wake.set()

    async def pump(self) -> None:
        """Send what is queued until the client is ended (the socket is closed by the
        session, see :func:`_run_session`)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.closing is not None:
                return
            chunk = bytearray()
            while self._queue and len(chunk) < FRAME:
                data = self._queue.popleft()
                self._queued -= len(data)
                chunk += data
            if self._queue:
                self._wake.set()
            if chunk:
                await self._ws.send_bytes(bytes(chunk))


async def _run_session(ws: web.WebSocketResponse, client: _Client,
                       *parts: Coroutine[Any, Any, None], name: str) -> None:
    """Run the session's ``parts`` (the client's input loop first) and ``client.pump()``
    until one ends, then close the socket with the client's close code.

    The close is made here, after the input loop is stopped, never while another task
    waits in ``ws.receive()``: aiohttp's close then drops the connection right after the
    close frame, without waiting for the client's answer, and a client whose answer
    finds the connection gone reports 1006 instead of the agent's code.
    """
    tasks = [asyncio.create_task(part, name=f"{name} {index}")
             for index, part in enumerate((*parts, client.pump()))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not ws.closed:
        code, reason = client.closing or (1000, "")
        await ws.close(code=code, message=_close_reason(reason))
    failed = None if tasks[0].cancelled() else tasks[0].exception()
    if failed is not None:
        raise failed


class ConsoleRoutes:
    """``/console/...`` on every listener (see :class:`virtnode.rpc.server.Routes`)."""

    def __init__(self, consoles: ConsoleService, config: ConsoleConfig) -> None:
        self._consoles = consoles
        self._config = config
        self._web = Path(config.web_dir) if config.web_dir else default_web_dir()
        if missing := missing_pages(self._web):
            # The consoles work without their pages (a client speaks the WebSocket).
            log.warning("console pages: %s missing under %s (console.web_dir); browsers "
                        "get no console page", ", ".join(missing), self._web)
        #: Open sockets, and the session's client once it has one.
        self._sockets: dict[web.WebSocketResponse, _Client | None] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def add_routes(self, router: web.UrlDispatcher, caller: CallerOf) -> None:
        del caller  # the token says who may do what
        router.add_get("/console/static/{path:.+}", self._static)
        router.add_get("/console/{token}", self._console)

    async def close(self) -> None:
        """Close every session 1001: each session closes its own socket once its input
        loop has stopped (see :func:`_run_session`), so that clients get the code."""
        for ws, client in list(self._sockets.items()):
            if client is not None:
                client.end(1001, "agent stopping")
            else:
                await ws.close(code=1001, message=b"agent stopping")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await self._idle.wait()

    async def _console(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        expect = {key: value for key in ("vm_id", "kind")
                  if (value := request.query.get(key)) is not None and len(value) <= 64}
        ws = web.WebSocketResponse(max_msg_size=MAX_CLIENT_MESSAGE, heartbeat=30.0,
                                   compress=False, protocols=("binary",))
        if not ws.can_prepare(request).ok:
            try:
                grant = self._consoles.tokens.peek(token, **expect)
            except ApiError as exc:
                return web.Response(status=403, text=f"{exc.message}\n", headers=PAGE_HEADERS)
            return web.Response(text=_page(grant), content_type="text/html",
                                headers=PAGE_HEADERS)
        sock: socket.socket | None = None
        try:
            grant = self._consoles.tokens.take(token, **expect)
            if grant.kind == "vnc":
                sock = await self._consoles.open_graphics(grant)
        except ApiError as exc:
            return web.Response(text=jsonrpc.encode(jsonrpc.error(None, exc)),
                                status=_STATUS.get(exc.name, 500),
                                content_type="application/json")
        self._sockets[ws] = None
        self._idle.clear()
        try:
            await ws.prepare(request)
            if sock is not None:
                await self._vnc(ws, grant, sock)
            else:
                await self._serial(ws, grant)
        finally:
            del self._sockets[ws]
            if not self._sockets:
                self._idle.set()
            if sock is not None:
                sock.close()
        return ws

    def _session(self, ws: web.WebSocketResponse, client: _Client) -> None:
        """``client`` is the session of ``ws`` from now on."""
        self._sockets[ws] = client

    async def _serial(self, ws: web.WebSocketResponse, grant: ConsoleGrant) -> None:
        state, reason = self._consoles.serial_state(grant.vm_id)
        await ws.send_str(json.dumps({"type": "hello", "kind": "serial", "vm_id": grant.vm_id,
                                      "mode": grant.mode, "state": state, "reason": reason}))
        client = _Client(ws, grant, self._config.client_buffer)
        self._session(ws, client)
        try:
            async with self._consoles.session(grant, client, backlog=True):
                await _run_session(ws, client, self._serial_input(ws, grant, client),
                                   name=f"console {grant.vm_id}")
        except ApiError as exc:
            await ws.close(code=CLOSE_IN_USE, message=_close_reason(exc.message))

    async def _serial_input(self, ws: web.WebSocketResponse, grant: ConsoleGrant,
                            client: _Client) -> None:
        warned = False
        async for msg in ws:
            if client.closing is not None:
                break
            if msg.type is not WSMsgType.BINARY:
                continue  # text frames are for control messages; none is defined yet
            if not grant.writer:
                notice = "read-only session: input ignored"
            elif await self._consoles.type_into(grant.vm_id, msg.data):
                continue
            else:
                notice = "the agent does not hold the console now: input dropped"
            if not warned:
                warned = True
                await ws.send_str(json.dumps({"type": "notice", "message": notice}))

    async def _vnc(self, ws: web.WebSocketResponse, grant: ConsoleGrant,
                   sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock, limit=FRAME)
        client = _Client(ws, grant, 0)
        self._session(ws, client)
        flt = ClientFilter(view_only=not grant.writer)

        async def downstream() -> None:
            while data := await reader.read(FRAME):
                await ws.send_bytes(data)
            client.end(1011, "the VM's display closed")

        async def upstream() -> None:
            async for msg in ws:
                if client.closing is not None:
                    return
                if msg.type is not WSMsgType.BINARY:
                    continue
                try:
                    out = flt.feed(msg.data)
                except RfbError as exc:
                    log.info("VNC client of %s broke the protocol: %s", grant.vm_id, exc)
                    client.end(1002, str(exc))
                    return
                if out:
                    writer.write(out)
                    await writer.drain()

        try:
            async with self._consoles.session(grant, client):
                await _run_session(ws, client, upstream(), downstream(),
                                   name=f"vnc {grant.vm_id}")
        except ApiError as exc:
            await ws.close(code=CLOSE_IN_USE, message=_close_reason(exc.message))
        finally:
            writer.close()

    async def _static(self, request: web.Request) -> web.StreamResponse:
        top, _, rest = request.match_info["path"].partition("/")
        root = STATIC_ROOTS.get(top)
        content_type = STATIC_TYPES.get(Path(rest).suffix)
        if root is None or content_type is None:
            raise web.HTTPNotFound()
        base = self._web / root
        found = await asyncio.to_thread(_inside, base, rest)
        if found is None:
            raise web.HTTPNotFound()
        return web.FileResponse(found, headers={**STATIC_HEADERS, "Content-Type": content_type})


def _inside(base: Path, relative: str) -> Path | None:
    """``base/relative`` if it is a file inside ``base`` (links resolved); None if not."""
    real_base = base.resolve()
    target = (real_base / relative).resolve()
    if not target.is_relative_to(real_base) or not target.is_file():
        return None
    return target


def _page(grant: ConsoleGrant) -> str:
    kind = grant.kind
    extra = ('<link rel="stylesheet" href="/console/static/xterm/css/xterm.css">'
             if kind == "serial" else "")
    area = "terminal" if kind == "serial" else "screen"
    vm = html.escape(grant.vm_id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{kind} console of VM {vm}</title>
<link rel="stylesheet" href="/console/static/app/console.css">{extra}
<script type="module" src="/console/static/app/{kind}.js"></script>
</head><body data-kind="{kind}" data-mode="{grant.mode}">
<div id="bar"><span>{kind} console of VM {vm} ({grant.mode})</span>
<span id="status" data-state="connecting">connecting</span></div>
<div id="{area}"></div>
</body></html>
"""

"""Uplinks: the agent dials out to upstream WebSocket servers and streams its events.

A host behind NAT can be managed without inbound ports. For each configured URL the agent
connects, introduces itself with an ``Uplink.hello`` request, replays the journal events
the upstream has not seen, then streams live events as ``event`` notifications, exactly
as a subscription would on an inbound connection. Requests the upstream sends over the
same socket are served like any other connection's, with the role configured for uplinks.
When the connection fails or closes, the agent dials again with jittered exponential
backoff.

The exchange, agent to upstream::

    -> {"jsonrpc": "2.0", "id": "hello", "method": "Uplink.hello",
        "params": {"host_id", "hostname", "agent_version", "api_version", "epoch",
                   "last_seq", "first_seq"}}
    <- {"jsonrpc": "2.0", "id": "hello", "result": {"epoch": "...", "since": 123}}

``since`` is the last seq the upstream holds for that epoch (``null``: only new events).
Events after it follow. If the journal no longer holds them, or the upstream's epoch is
not the agent's, the agent sends ``events.resync_required`` (params: epoch, first_seq,
last_seq) and streams live events from then on: the upstream re-lists state. The
upstream sends nothing else until it has answered the hello.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from virtnode import __version__, jsonrpc
from virtnode.config import UplinkConfig
from virtnode.errors import FailedPrecondition
from virtnode.events.bus import EventBus
from virtnode.events.subscriptions import EventsService
from virtnode.rpc.identity import Caller
from virtnode.rpc.server import ApiServer
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)


HELLO_ID = "hello"
#: A connection that lasted this long resets the backoff to its minimum (seconds).
STABLE_AFTER = 30.0


class UplinkError(Exception):
    """The upstream answered the hello wrongly, or not at all."""


class Uplink:
    """One upstream URL: connect, hello, replay, stream, serve; again after a failure."""

    def __init__(self, url: str, config: UplinkConfig, *, server: ApiServer,
                 events: EventsService, bus: EventBus, host_id: str,
                 max_message_size: int, api_version: str) -> None:
        self.url = url
        self._config = config
        self._server = server
        self._events = events
        self._bus = bus
        self._host_id = host_id
        self._max_message_size = max_message_size
        self._api_version = api_version
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        parts = urlsplit(url)  # logged without credentials or query (tokens)
        port = f":{parts.port}" if parts.port else ""
        self.where = f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
        #: Connected and past the hello.
        self.up = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"uplink {self.where}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self._ws is not None:
            await self._ws.close(code=1001, message=b"agent stopping")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = self._config.reconnect_min
        while True:
            began = time.monotonic()
            try:
                await self._connect_once()
                reason = "closed by the upstream"
            except (aiohttp.ClientError, OSError, UplinkError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                self.up = False
                self._ws = None
            if time.monotonic() - began > STABLE_AFTER:
                delay = self._config.reconnect_min
            wait = delay * random.uniform(0.8, 1.2)
            log.warning("uplink %s: %s; dialing again in %.1fs", self.where, reason, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._config.reconnect_max)

    async def _connect_once(self) -> None:
        timeout = aiohttp.ClientWSTimeout(ws_close=5.0)
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(self.url, heartbeat=30.0, max_msg_size=self._max_message_size + 1,
                            compress=0, timeout=timeout, autoping=True) as ws,
        ):
            self._ws = ws
            hello = await self._hello(ws)
            caller = Caller(f"uplink:{self.where}", self._config.role, "uplink")
            session = self._server.new_session(ws, caller)
            self._subscribe(session, hello)
            self.up = True
            log.info("uplink %s: connected, streaming events", self.where)
            await self._server.serve_session(session)

    async def _hello(self, ws: aiohttp.ClientWebSocketResponse) -> JsonObject:
        bus = self._bus
        journal = bus.journal
        params = {
            "host_id": self._host_id,
            "hostname": socket.gethostname(),
            "agent_version": __version__,
            "api_version": self._api_version,
            "epoch": bus.epoch,
            "last_seq": bus.delivered_seq,
            "first_seq": journal.first_seq if journal is not None else bus.delivered_seq + 1,
        }
        await ws.send_str(jsonrpc.encode({"jsonrpc": "2.0", "id": HELLO_ID,
                                          "method": "Uplink.hello", "params": params}))
        async with asyncio.timeout(self._config.hello_timeout):
            msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise UplinkError(f"no answer to the hello ({msg.type.name})")
        return parse_hello_answer(msg.data)

    def _subscribe(self, session: Any, hello: JsonObject) -> None:
        topics = self._config.topics
        since, epoch = hello.get("since"), hello.get("epoch")
        if since is None:
            self._events.open(session, topics)
            return
        try:
            self._events.open(session, topics, since, epoch)
        except FailedPrecondition as exc:
            log.warning("uplink %s: cannot replay after seq %s of epoch %s: %s",
                        self.where, since, epoch, exc)
            sub = self._events.open(session, topics)
            journal = self._bus.journal
            session.push(jsonrpc.notification("events.resync_required", {
                "epoch": self._bus.epoch,
                "first_seq": journal.first_seq if journal is not None else sub["last_seq"] + 1,
                "last_seq": sub["last_seq"],
            }))


def parse_hello_answer(text: str) -> JsonObject:
    """The result of the upstream's answer to the hello; UplinkError when it is wrong."""
    try:
        answer = json.loads(text)
    except ValueError:
        raise UplinkError("the answer to the hello is not JSON") from None
    if not isinstance(answer, dict) or answer.get("id") != HELLO_ID:
        raise UplinkError("the upstream sent something other than the answer to the hello")
    if "error" in answer:
        raise UplinkError(f"the upstream refused the hello: {answer['error']!r:.200}")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise UplinkError("the answer to the hello has no result object")
    since = result.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                              or since < 0):
        raise UplinkError(f"since must be a seq (an integer >= 0) or null, not {since!r:.50}")
    epoch = result.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 64):
        raise UplinkError("epoch must be a string")
    if since is not None and epoch is None:
        raise UplinkError("since needs the epoch it belongs to")
    return {"since": since, "epoch": epoch}


class Uplinks:
    """Every configured uplink."""

    def __init__(self, links: list[Uplink]) -> None:
        self.links = links

    def start(self) -> None:
        for link in self.links:
            link.start()

    async def stop(self) -> None:
        await asyncio.gather(*(link.stop() for link in self.links))

    def status(self) -> list[JsonObject]:
        return [{"url": link.url, "connected": link.up} for link in self.links]

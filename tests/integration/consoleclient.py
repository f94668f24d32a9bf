"""Console sessions for tests: ``GET /console/{token}`` as a WebSocket, over each listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.agentproc import AgentProcess


@contextlib.asynccontextmanager
async def http_session(agent: AgentProcess, via: str, tls: ssl.SSLContext | None = None
                       ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A client session that reaches the agent ``via`` unix, tcp or tls, and its base URL."""
    if via == "unix":
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(agent.unix_path))
        base = "http://localhost"
    elif via == "tls":
        connector = aiohttp.TCPConnector(ssl=tls)
        base = agent.https_url
    else:
        connector = aiohttp.TCPConnector()
        base = agent.http_url
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session, base


class ConsoleSocket:
    """One console session: what arrived so far, and waits on it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.output = bytearray()
        self.notices: list[dict[str, Any]] = []
        self.close_reason = ""

    async def read_until(self, marker: bytes, timeout: float = 30.0) -> bytes:
        """Read until ``marker`` is in the output; returns the output so far."""
        async with asyncio.timeout(timeout):
            while marker not in self.output:
                await self.receive()
        return bytes(self.output)

    async def receive(self) -> aiohttp.WSMessage:
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            self.output += msg.data
        elif msg.type is aiohttp.WSMsgType.TEXT:
            self.notices.append(json.loads(msg.data))
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            self.close_reason = str(msg.extra or "")
        return msg

    async def wait_closed(self, timeout: float = 15.0) -> int:
        """Read until the agent closes the session; its close code."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING):
                    return int(self.ws.close_code or 0)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)


@contextlib.asynccontextmanager
async def console(agent: AgentProcess, url: str, *, via: str = "tcp",
                  tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
                  ) -> AsyncIterator[ConsoleSocket]:
    """A WebSocket on the console ``url`` (``/console/TOKEN...``) of ``agent``."""
    async with (http_session(agent, via, tls) as (session, base),
                session.ws_connect(base + url, headers=headers or {}, max_msg_size=0) as ws):
        yield ConsoleSocket(ws)

"""Uplinks: the agent dials out to a test upstream, replays, streams and serves requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.agentproc import AgentProcess, free_port, start_agent
from tests.conftest import ClientFactory
from tests.integration.test_events_journal import position, vm_cycle
from virtnode.util.jsontypes import JsonObject

pytestmark = pytest.mark.integration



class Upstream:
    """A minimal engine: answers the hello with what it has, keeps events by seq."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.hellos: list[JsonObject] = []
        self.events: list[JsonObject] = []
        self.others: list[JsonObject] = []
        self.epoch: str | None = None
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ws: web.WebSocketResponse | None = None
        self._answers: dict[int, asyncio.Future[JsonObject]] = {}
        self._next_id = 100

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/uplink"

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/uplink", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    async def stop(self) -> None:
        """Go away: stop listening, then close the agent's connection."""
        if self._site is not None:
            await self._site.stop()
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.connected.clear()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = json.loads((await ws.receive()).data)
        self.hellos.append(hello)
        params = hello["params"]
        if self.epoch is None:
            self.epoch = params["epoch"]
        # Everything from the start the first time, then what we do not have yet.
        await ws.send_json({"jsonrpc": "2.0", "id": hello["id"],
                            "result": {"epoch": self.epoch, "since": self.last_seq}})
        self._ws = ws
        self.connected.set()
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            note = json.loads(msg.data)
            self._changed.set()
            if note.get("method") == "event":
                self.events.append(note["params"])
            elif "id" in note and note["id"] in self._answers:
                self._answers.pop(note["id"]).set_result(note)
            else:
                self.others.append(note)
        return ws

    async def call(self, method: str, params: JsonObject | None = None) -> JsonObject:
        """Send a request to the agent over the uplink; the whole response."""
        assert self._ws is not None
        self._next_id += 1
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._answers[self._next_id] = future
        await self._ws.send_json({"jsonrpc": "2.0", "id": self._next_id, "method": method,
                                  "params": params or {}})
        return await asyncio.wait_for(future, 10)

    async def wait_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_seq(self, seq: int, timeout: float = 20.0) -> None:
        await self.wait_until(lambda: self.last_seq >= seq, timeout)


async def uplinked_agent(tmp_path: Path, upstream: Upstream,
                         sections: dict[str, dict[str, Any]] | None = None) -> AgentProcess:
    """An agent that dials ``upstream``; ``sections`` add to its configuration."""
    return await start_agent(tmp_path, sections={"uplink": {
        "urls": [upstream.url], "reconnect_min": 0.2, "reconnect_max": 1.0,
    }, **(sections or {})})


async def test_upstream_gets_every_event_once_across_its_absence(
        tmp_path: Path, checked_client: ClientFactory) -> None:
    upstream = Upstream(free_port())
    await upstream.start()
    agent = await uplinked_agent(tmp_path, upstream)
    try:
        await asyncio.wait_for(upstream.connected.wait(), 10)
        hello = upstream.hellos[0]
        assert hello["method"] == "Uplink.hello"
        assert set(hello["params"]) >= {"host_id", "hostname", "agent_version", "epoch",
                                        "last_seq", "first_seq"}
        client = await checked_client(agent.unix_url)
        for _ in range(3):
            await vm_cycle(client)
        await upstream.wait_for_seq((await position(client))["last_seq"])

        await upstream.stop()  # the upstream goes away; the agent keeps working
        for _ in range(3):
            await vm_cycle(client)
        missed_upto = (await position(client))["last_seq"]
        assert upstream.last_seq < missed_upto
        await upstream.start()  # and comes back: the agent dials again by itself
        await asyncio.wait_for(upstream.connected.wait(), 15)
        assert len(upstream.hellos) == 2
        assert upstream.hellos[-1]["params"]["epoch"] == upstream.epoch
        assert upstream.hellos[-1]["params"]["last_seq"] >= missed_upto
        for _ in range(2):
            await vm_cycle(client)
        last = (await position(client))["last_seq"]
        await upstream.wait_for_seq(last)
        # Every event exactly once, in order, replayed and live alike.
        assert [e["seq"] for e in upstream.events] == list(range(1, last + 1))
        assert {e["epoch"] for e in upstream.events} == {upstream.epoch}
        assert upstream.others == []
    finally:
        assert await agent.stop() == 0
        await upstream.stop()


async def test_upstream_requests_are_served_with_the_uplink_role(tmp_path: Path) -> None:
    upstream = Upstream(free_port())
    await upstream.start()
    agent = await uplinked_agent(tmp_path, upstream)  # role: reader, the default
    try:
        await asyncio.wait_for(upstream.connected.wait(), 10)
        pong = await upstream.call("Host.ping")
        assert "time" in pong["result"]
        listed = await upstream.call("VM.list")
        assert isinstance(listed["result"]["vms"], list)
        refused = await upstream.call("VM.create", {"spec": {"name": "up", "memory_mib": 64}})
        assert refused["error"]["data"]["name"] == "PermissionDenied"
    finally:
        assert await agent.stop() == 0
        await upstream.stop()


async def test_an_upstream_too_far_behind_is_told_to_resync(tmp_path: Path,
                                                            checked_client: ClientFactory) -> None:
    upstream = Upstream(free_port())
    agent = await uplinked_agent(tmp_path, upstream,
                                 sections={"events": {"journal_max_events": 16}})
    try:
        client = await checked_client(agent.unix_url)
        for _ in range(12):
            await vm_cycle(client)
        pos = await position(client)
        upstream.epoch = pos["epoch"]
        upstream.events = [{"seq": 1}]  # it has seen only the first event
        await upstream.start()
        await asyncio.wait_for(upstream.connected.wait(), 10)
        await upstream.wait_until(lambda: bool(upstream.others), 10)
        notice = upstream.others[0]
        assert notice["method"] == "events.resync_required"
        assert notice["params"]["epoch"] == pos["epoch"]
        assert notice["params"]["first_seq"] > 2
        # Live events follow the notice.
        await vm_cycle(client)
        await upstream.wait_for_seq((await position(client))["last_seq"])
    finally:
        assert await agent.stop() == 0
        await upstream.stop()

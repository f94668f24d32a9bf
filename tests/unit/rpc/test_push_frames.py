"""Pushed notifications are framed by the agent itself: a real client must read them whole."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from virtnode.config import build_config
from virtnode.daemon import Agent


async def test_small_medium_and_large_notifications_arrive_intact(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = Agent(build_config({
        "server": {"listen": [f"unix:{sock}"]},
        "state": {"dir": str(tmp_path / "state")},
        "devices": {"source": "off"},
    }))
    await agent.start()
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (aiohttp.ClientSession(connector=connector) as session,
                    session.ws_connect("http://localhost/rpc", max_msg_size=0) as ws):
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "Events.subscribe",
                                "params": {"topics": ["test.*"]}})
            assert "result" in await ws.receive_json()
            # Frame lengths on each side of the 7-bit and 16-bit length encodings.
            sizes = [0, 10, 60, 125, 126, 65_535, 65_536, 300_000]
            for n in sizes:
                agent.bus.publish("test.size", {"pad": "é" * n})
            # A request answered through aiohttp's own writer, in between.
            await ws.send_json({"jsonrpc": "2.0", "id": 2, "method": "Host.ping"})
            got: list[int] = []
            answered = False
            while len(got) < len(sizes) or not answered:
                msg = json.loads((await ws.receive()).data)
                if msg.get("id") == 2:
                    answered = True
                else:
                    assert msg["method"] == "event"
                    got.append(len(msg["params"]["data"]["pad"]))
            assert got == sizes
    finally:
        await agent.stop()

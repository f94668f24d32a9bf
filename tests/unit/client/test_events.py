"""Following events: output lines, and recovery when the agent says a subscription lagged.

The lag is played by a small in-process WebSocket server speaking the agent's protocol
(Events.subscribe with ``since``, ``events.lagged`` notifications), since the agent only
sends them once its journal exists.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from virtnode.client import Client, ConnectionLost, RemoteError
from virtnode.client.events import EventWatch, json_line, pretty_line

EPOCH = "0d6a8c1e-0000-4000-8000-000000000001"
OLD_ID = "5c1a7e1e-0000-4000-8000-000000000001"
NEW_ID = "5c1a7e1e-0000-4000-8000-000000000002"


def event(seq: int, topic: str = "vm.lifecycle", **data: Any) -> dict[str, Any]:
    return {"epoch": EPOCH, "seq": seq, "topic": topic, "time": 1700000000.25,
            "data": data or {"n": seq}}


def notification(method: str, params: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params})


@dataclass
class LaggingAgent:
    """Sends 11 and 12, says the subscription lagged at 12, then serves a resubscription.

    ``replay`` False answers a ``since`` with FailedPrecondition (resync_required).
    """

    replay: bool = True
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            call = json.loads(msg.data)
            params = call.get("params", {})
            self.calls.append((call["method"], params))
            answers = self._answer(call["method"], params)
            for answer in answers:
                await ws.send_str(answer if isinstance(answer, str) else json.dumps(
                    {"jsonrpc": "2.0", "id": call["id"], **answer}))
            if self._resubscribed(answers):
                await ws.close()  # the stream ends: the watch must say so
        return ws

    def _resubscribed(self, answers: list[Any]) -> bool:
        first = answers[0]
        return isinstance(first, dict) and first.get("result", {}).get(
            "subscription_id") == NEW_ID

    def _answer(self, method: str, params: dict[str, Any]) -> list[Any]:
        if method == "Events.unsubscribe":
            return [{"error": {"code": 5, "message": "no such subscription",
                               "data": {"name": "NotFound", "reason": "not_found"}}}]
        if "since" in params and not self.replay:
            return [{"error": {"code": 9, "message": "journal no longer holds it",
                               "data": {"name": "FailedPrecondition",
                                        "reason": "resync_required"}}}]
        first = not any(m == "Events.subscribe" for m, _ in self.calls[:-1])
        result = {"result": {"subscription_id": OLD_ID if first else NEW_ID,
                             "epoch": EPOCH, "last_seq": 10 if first else 15}}
        if first:
            return [result, notification("event", event(11)), notification("event", event(12)),
                    notification("events.lagged",
                                 {"subscription_id": OLD_ID, "epoch": EPOCH, "last_seq": 12})]
        if "since" in params:  # a replay that repeats the last event delivered
            return [result, *(notification("event", event(s)) for s in (12, 13, 14, 15))]
        return [result, notification("event", event(16))]


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(fake: LaggingAgent) -> str:
        app = web.Application()
        app.router.add_get("/rpc", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"tcp://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def watch(url: str) -> tuple[list[int], list[str]]:
    written: list[int] = []
    warnings: list[str] = []
    async with await Client.connect(url) as client:
        follower = EventWatch(client, ["*"], None, write=lambda p: written.append(p["seq"]),
                              warn=warnings.append)
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(10):
                await follower.run()
    return written, warnings


async def test_lag_resubscribes_from_the_last_seq_without_duplicates(serve: Any) -> None:
    fake = LaggingAgent()
    written, warnings = await watch(await serve(fake))
    assert written == [11, 12, 13, 14, 15]
    assert [m for m, _ in fake.calls] == ["Events.subscribe", "Events.unsubscribe",
                                          "Events.subscribe"]
    assert fake.calls[0][1] == {"topics": ["*"]}  # no since unless asked for
    assert fake.calls[1][1] == {"subscription_id": OLD_ID}
    assert fake.calls[2][1] == {"topics": ["*"], "since": 12}
    assert len(warnings) == 1
    assert "lagged" in warnings[0]
    assert "12" in warnings[0]


async def test_lag_without_replay_goes_on_with_live_events(serve: Any) -> None:
    fake = LaggingAgent(replay=False)
    written, warnings = await watch(await serve(fake))
    assert written == [11, 12, 16]
    assert [m for m, _ in fake.calls] == ["Events.subscribe", "Events.unsubscribe",
                                          "Events.subscribe", "Events.subscribe"]
    assert fake.calls[3][1] == {"topics": ["*"]}
    assert len(warnings) == 2
    assert "lost" in warnings[1]


async def test_since_is_sent_when_given(serve: Any) -> None:
    fake = LaggingAgent(replay=False)
    async with await Client.connect(await serve(fake)) as client:
        follower = EventWatch(client, ["vm.*"], 7, write=lambda p: None, warn=lambda t: None)
        with pytest.raises(RemoteError, match="FailedPrecondition"):
            await follower.run()
    assert fake.calls == [("Events.subscribe", {"topics": ["vm.*"], "since": 7})]


async def test_the_command_warns_on_stderr_and_keeps_printing(serve: Any) -> None:
    url = await serve(LaggingAgent())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtnode", "events", "--url", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 3  # the fake closes the connection at the end
    assert [json.loads(line)["seq"] for line in out.decode().splitlines()] == [
        11, 12, 13, 14, 15]
    assert "virtnode: warning: the subscription lagged" in err.decode()


def test_json_line_is_the_notification_params() -> None:
    params = event(3, name="demo vm", state="running")
    line = json_line(params)
    assert "\n" not in line
    assert json.loads(line) == params


def test_pretty_line() -> None:
    params = event(42, "host.device", action="add", name="vn-t-a", devtype=None, ifindex=7,
                   label="two words")
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(params["time"]))
    assert pretty_line(params) == (
        f'{clock}.250  #42  host.device  action=add name=vn-t-a devtype=null ifindex=7 '
        'label="two words"'
    )

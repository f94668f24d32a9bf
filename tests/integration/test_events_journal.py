"""Events that survive reconnects: replay with since, resync, slow subscribers, polling.

A real agent subprocess on test:///default; events come from real VM operations.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from virtnode.client import Client, RemoteError
from virtnode.util.jsontypes import JsonObject

pytestmark = pytest.mark.integration



async def vm_cycle(client: Client) -> None:
    """Create, start, destroy and undefine one VM: four vm.lifecycle events."""
    spec = {"name": f"ev-{uuid.uuid4().hex[:8]}", "memory_mib": 64}
    vm = await client.call("VM.create", {"spec": spec})
    await client.call("VM.destroy", {"vm_id": vm["vm_id"]})
    await client.call("VM.undefine", {"vm_id": vm["vm_id"]})


async def collect(client: Client, until_seq: int, timeout: float = 15.0) -> list[JsonObject]:
    """Event params from ``client`` until one with seq >= ``until_seq``."""
    got: list[JsonObject] = []
    async with asyncio.timeout(timeout):
        async for note in client.notifications():
            if note["method"] != "event":
                continue
            got.append(note["params"])
            if note["params"]["seq"] >= until_seq:
                return got
    raise AssertionError(f"connection closed after {got[-1:] or 'no events'}")


async def collect_or_explain(client: Client, until_seq: int,
                             agent: AgentProcess) -> list[JsonObject]:
    """:func:`collect`, failing with the subscriptions the agent dropped as lagging."""
    try:
        return await collect(client, until_seq)
    except TimeoutError:
        drops = [line for line in agent.log_lines if "does not keep up" in line]
        raise AssertionError(f"no event up to seq {until_seq}; drops: {drops}") from None


def seqs(events: list[JsonObject]) -> list[int]:
    return [e["seq"] for e in events]


async def position(client: Client) -> JsonObject:
    """The journal's newest position, read without subscribing."""
    where: JsonObject = await client.call("Events.get", {})
    assert where["events"] == [] and where["next_since"] == where["last_seq"]
    return where


async def journal_seqs(client: Client, topics: list[str], after: int) -> list[int]:
    """The seqs of the journal's events after ``after`` on ``topics``, to the newest."""
    found: list[int] = []
    while True:
        page = await client.call("Events.get", {"since": after, "topics": topics,
                                                "limit": 10_000})
        found += seqs(page["events"])
        after = page["next_since"]
        if not page["more"]:
            return found


async def test_resume_with_since_across_a_sigkill(tmp_path: Path,
                                                  checked_client: ClientFactory) -> None:
    agent = await start_agent(tmp_path)
    try:
        watcher = await checked_client(agent.unix_url)
        sub = await watcher.call("Events.subscribe", {"topics": ["*"]})
        epoch = sub["epoch"]
        worker = await checked_client(agent.unix_url)
        for _ in range(3):
            await vm_cycle(worker)
        last = (await position(worker))["last_seq"]
        seen = await collect(watcher, last)
        assert seqs(seen) == list(range(sub["last_seq"] + 1, last + 1))
        # The watcher goes away having seen up to `resume`; more happens, then a SIGKILL.
        resume = seen[len(seen) // 2]["seq"]
        await watcher.close()
        for _ in range(2):
            await vm_cycle(worker)
        missed = await worker.call("Events.get", {"since": resume, "limit": 10_000})
        before_kill = missed["last_seq"]
        await worker.close()
    finally:
        assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL

    agent = await start_agent(tmp_path)
    try:
        worker = await checked_client(agent.unix_url)
        busy = asyncio.create_task(_cycles(worker, 5))  # live events race the replay
        client = await checked_client(agent.unix_url)
        sub = await client.call("Events.subscribe",
                                {"topics": ["*"], "since": resume, "epoch": epoch})
        assert sub["epoch"] == epoch
        await busy
        last = (await position(worker))["last_seq"]
        got = await collect(client, last)
        # No gap, no duplicate, one epoch: from the client's last seq to the newest.
        assert seqs(got) == list(range(resume + 1, last + 1))
        assert {e["epoch"] for e in got} == {epoch}
        # What was replayed is what was published before the kill.
        replayed = [e for e in got if e["seq"] <= before_kill]
        assert [(e["seq"], e["topic"], e["data"]) for e in replayed] == [
            (e["seq"], e["topic"], e["data"]) for e in missed["events"]]
        assert sub["last_seq"] >= before_kill
    finally:
        assert await agent.stop() == 0


async def _cycles(client: Client, count: int) -> None:
    for _ in range(count):
        await vm_cycle(client)


async def test_since_outside_the_journal_requires_a_resync(
        tmp_path: Path, checked_client: ClientFactory) -> None:
    agent = await start_agent(tmp_path, sections={"events": {"journal_max_events": 16}})
    try:
        client = await checked_client(agent.unix_url)
        for _ in range(12):  # 48 events or more: the oldest are trimmed
            await vm_cycle(client)
        pos = await position(client)
        assert pos["first_seq"] > 2  # trimmed to the limit
        assert pos["last_seq"] - pos["first_seq"] + 1 <= 16 + 16 // 16
        for params in ({"topics": ["*"], "since": 1},
                       {"topics": ["*"], "since": pos["last_seq"] + 5},
                       {"topics": ["*"], "since": pos["last_seq"], "epoch": "another"}):
            with pytest.raises(RemoteError) as err:
                await client.call("Events.subscribe", params)
            assert err.value.name == "FailedPrecondition"
            assert err.value.data["reason"] == "resync_required"
            assert err.value.data["epoch"] == pos["epoch"]
        with pytest.raises(RemoteError) as err:
            await client.call("Events.get", {"since": 1})
        assert err.value.data["reason"] == "resync_required"
        # A since the journal still holds works, for both.
        recent = pos["last_seq"] - 3
        sub = await client.call("Events.subscribe",
                                {"topics": ["*"], "since": recent, "epoch": pos["epoch"]})
        got = await collect(client, sub["last_seq"])
        assert seqs(got) == list(range(recent + 1, sub["last_seq"] + 1))
    finally:
        assert await agent.stop() == 0


async def test_a_stalled_subscriber_is_dropped_and_others_keep_up(
        tmp_path: Path, checked_client: ClientFactory) -> None:
    agent = await start_agent(tmp_path, sections={"events": {"subscriber_queue": 50}})
    try:
        fast = await checked_client(agent.unix_url)
        fast_sub = await fast.call("Events.subscribe", {"topics": ["vm.*"]})
        connector = aiohttp.UnixConnector(path=str(agent.unix_path))
        async with (aiohttp.ClientSession(connector=connector) as session,
                    session.ws_connect("http://localhost/rpc") as stalled):
            await stalled.send_str(json.dumps({"jsonrpc": "2.0", "id": 1,
                                               "method": "Events.subscribe",
                                               "params": {"topics": ["vm.*"]}}))
            stalled_sub = json.loads((await stalled.receive()).data)["result"]
            # From here on the stalled client reads nothing: its socket buffers fill up,
            # then the agent's queue for it.
            worker = await checked_client(agent.unix_url)
            ping_worst = 0.0
            deadline = time.monotonic() + 60
            while "does not keep up with subscription" not in agent.log:
                assert time.monotonic() < deadline, "the stalled subscriber was never dropped"
                await asyncio.gather(*(vm_cycle(worker) for _ in range(10)))
                started = time.perf_counter()
                await worker.call("Host.ping")
                ping_worst = max(ping_worst, time.perf_counter() - started)
            # Other topics (statistics) interleave: compare with the journal's vm.* events.
            published = await journal_seqs(worker, ["vm.*"], fast_sub["last_seq"])
            last = published[-1]
            fast_events = await collect_or_explain(fast, last, agent)
            # The reading subscriber got every event, in order, and the agent kept answering.
            assert seqs(fast_events) == published
            assert ping_worst < 1.0

            # The stalled client now reads: its events up to the drop, then one notice.
            stalled_events: list[int] = []
            lagged: JsonObject | None = None
            async with asyncio.timeout(30):
                while lagged is None:
                    note = json.loads((await stalled.receive()).data)
                    if note["method"] == "event":
                        stalled_events.append(note["params"]["seq"])
                    else:
                        assert note["method"] == "events.lagged"
                        lagged = note["params"]
            assert lagged["subscription_id"] == stalled_sub["subscription_id"]
            assert lagged["epoch"] == stalled_sub["epoch"]
            assert stalled_events == [n for n in published if n <= lagged["last_seq"]]
            assert lagged["last_seq"] < last
            # It resumes from where it was dropped and misses nothing.
            await stalled.send_str(json.dumps({
                "jsonrpc": "2.0", "id": 2, "method": "Events.subscribe",
                "params": {"topics": ["vm.*"], "since": lagged["last_seq"],
                           "epoch": lagged["epoch"]}}))
            resumed: list[int] = []
            async with asyncio.timeout(30):
                while not resumed or resumed[-1] < last:
                    note = json.loads((await stalled.receive()).data)
                    if note.get("method") == "event":
                        resumed.append(note["params"]["seq"])
            assert resumed == [n for n in published if n > lagged["last_seq"]]
    finally:
        assert await agent.stop() == 0


async def test_polling_over_http(agent: AgentProcess, checked_client: ClientFactory) -> None:
    client = await checked_client(agent.unix_url)
    start = await position(client)
    for _ in range(3):
        await vm_cycle(client)

    async def post(params: JsonObject) -> JsonObject:
        body = {"jsonrpc": "2.0", "id": 1, "method": "Events.get", "params": params}
        async with (aiohttp.ClientSession() as session,
                    session.post(f"{agent.http_url}/rpc", json=body) as resp):
            assert resp.status == 200
            answer: JsonObject = await resp.json()
        return dict(answer.get("result", answer))

    page = await post({"since": start["last_seq"], "topics": ["vm.lifecycle"], "limit": 5})
    assert len(page["events"]) == 5 and page["more"]
    assert page["next_since"] == page["events"][-1]["seq"]
    rest = await post({"since": page["next_since"], "topics": ["vm.lifecycle"]})
    assert not rest["more"]
    events = page["events"] + rest["events"]
    assert len(events) == 12
    assert all(e["topic"] == "vm.lifecycle" for e in events)
    assert seqs(events) == sorted(set(seqs(events)))
    # Nothing new: a long poll waits until an event comes, then answers at once.
    waiting = asyncio.create_task(post({"since": rest["next_since"], "wait": 20}))
    await asyncio.sleep(0.5)  # deliberate: time must pass to show the poll holds its answer
    assert not waiting.done()
    began = time.monotonic()
    await vm_cycle(client)
    woke = await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - began < 5
    assert woke["events"] and woke["events"][0]["seq"] == rest["next_since"] + 1

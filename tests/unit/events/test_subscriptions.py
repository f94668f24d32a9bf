"""Event subscriptions against a session whose peer reads when the test says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from virtnode.config import EventsConfig, Role
from virtnode.events.bus import EventBus
from virtnode.events.subscriptions import EventsService
from virtnode.rpc.identity import Caller


class PeerSession:
    """A WebSocket session in miniature: pushes queue up until the peer reads them."""

    can_push = True
    closed = False
    inflight = 0
    max_inflight = 64

    def __init__(self) -> None:
        self.caller = Caller("uid:0", Role.ADMIN, "unix")
        self.queued: list[Any] = []
        self.read: list[Any] = []

    @property
    def backlog(self) -> int:
        return len(self.queued)

    def push(self, message: dict[str, Any]) -> bool:
        return self.push_text(json.dumps(message))

    def push_text(self, text: str) -> bool:
        self.queued.append(json.loads(text))
        return True

    async def wait_backlog(self, size: int) -> None:
        return None

    def on_close(self, callback: Callable[[], None]) -> None:
        pass

    def reads(self) -> None:
        self.read += self.queued
        self.queued = []


def lagged(session: PeerSession) -> bool:
    return any(m.get("method") == "events.lagged" for m in session.read + session.queued)


async def test_a_burst_larger_than_the_queue_does_not_drop_a_reading_subscriber() -> None:
    bus = EventBus()
    service = EventsService(bus, EventsConfig(subscriber_queue=10))
    session = PeerSession()
    service.open(session, ["vm.*"])
    # Thirty events in one turn of the loop (as a journal write hands them over): the
    # peer has had no chance to read any of them yet, and it reads them all afterwards.
    for i in range(30):
        bus.publish("vm.lifecycle", {"n": i})
    await asyncio.sleep(0)  # one loop turn: the turn that handed them over ends
    session.reads()
    bus.publish("vm.lifecycle", {"n": 30})
    await asyncio.sleep(0)  # one loop turn, as above
    session.reads()
    assert not lagged(session)
    assert [m["params"]["data"]["n"] for m in session.read] == list(range(31))


async def test_a_subscriber_that_does_not_read_is_dropped_once_behind_by_the_queue() -> None:
    bus = EventBus()
    service = EventsService(bus, EventsConfig(subscriber_queue=10))
    session = PeerSession()
    service.open(session, ["vm.*"])
    for i in range(30):
        bus.publish("vm.lifecycle", {"n": i})
        await asyncio.sleep(0)  # one event a turn: it had every chance to read
    assert lagged(session)
    assert service.subscriber_count == 0

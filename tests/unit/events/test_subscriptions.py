"""Event subscriptions against a session whose peer reads when the test says."""

from __future__ import annotations

import asyncio

from tests.fakes.session import FakeSession as PeerSession
from virtnode.config import EventsConfig
from virtnode.events.bus import EventBus
from virtnode.events.subscriptions import EventsService


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

"""The in-process event bus.

Services publish typed events by topic; subscribers register a callback for topic globs
and get an unsubscribe function back. Publishing never waits: it numbers the event and
returns. With a journal (:mod:`virtnode.events.journal`), events are written to it in batches on
the store's thread and handed to subscribers only once written, in seq order, so anything
a client has seen can be replayed after a restart. Without one (unit tests), subscribers
get each event at once. A callback must only hand the event on (to a queue); one that
raises is logged and kept away from the publisher.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from virtnode import jsonrpc
from virtnode.events.event import Event, notification_text
from virtnode.events.journal import Journal
from virtnode.store import StoreFull
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

#: Events held back while the state store is full, at most (newer ones displace older).
HOLD_WHILE_FULL = 10_000
#: Seconds between tries to journal them while the store is full.
FULL_RETRY = 1.0



Listener = Callable[[Event], None]


class _Subscription:
    __slots__ = ("_matches", "listener", "patterns")

    def __init__(self, patterns: tuple[str, ...], listener: Listener) -> None:
        self.patterns = patterns
        self.listener = listener
        #: Topic -> whether a pattern matches it (topics are few; matching is not free).
        self._matches: dict[str, bool] = {}

    def wants(self, topic: str) -> bool:
        hit = self._matches.get(topic)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(topic, p) for p in self.patterns)
            if len(self._matches) < 1024:
                self._matches[topic] = hit
        return hit


class EventBus:
    """Numbers events within an epoch and hands them to matching subscribers."""

    def __init__(self, epoch: str | None = None) -> None:
        self.epoch = epoch or str(uuid.uuid4())
        #: Called with (topic, payload) before publishing; raises ValueError on a bad one.
        self.check: Callable[[str, JsonObject], None] | None = None
        self._subscriptions: set[_Subscription] = set()
        #: The seq of the newest event published.
        self.last_seq = 0
        #: The seq of the newest event handed to subscribers (written to the journal first).
        self.delivered_seq = 0
        self._journal: Journal | None = None
        self._pending: list[Event] = []
        self._writer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def attach_journal(self, journal: Journal) -> None:
        """Continue the journal's epoch and numbering; events are journaled from now on.

        Called before anything publishes.
        """
        position = await journal.open()
        self.epoch = position.epoch
        self.last_seq = self.delivered_seq = position.last_seq
        self._journal = journal

    @property
    def journal(self) -> Journal | None:
        return self._journal

    def publish(self, topic: str, data: JsonObject) -> Event:
        """Publish an event now; returns it with its sequence number.

        Raises ``ValueError`` when a :attr:`check` is set and rejects the payload, or when
        the payload cannot be sent as JSON (NaN, a string with a lone surrogate); such an
        event takes no number.
        """
        if self.check is not None:
            self.check(topic, data)
        data_json = jsonrpc.encode(data)  # before numbering: a refused event leaves no gap
        self.last_seq += 1
        seq, now = self.last_seq, time.time()
        event = Event(self.epoch, seq, topic, now, data, data_json,
                      notification_text(self.epoch, seq, topic, now, data_json))
        if self._journal is None:
            self._deliver(event)
            return event
        self._pending.append(event)
        if self._writer is None:
            self._idle.clear()
            self._writer = asyncio.get_running_loop().create_task(
                self._write_pending(), name="event-journal-writer")
        return event

    async def _write_pending(self) -> None:
        journal = self._journal
        assert journal is not None
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await journal.write(batch)
                except StoreFull:
                    # Journaled before delivered: hold them until there is room again, as
                    # many as HOLD_WHILE_FULL; older ones are given up as lost (a seq gap;
                    # a replay over it answers resync_required).
                    self._pending = batch + self._pending
                    if len(self._pending) > HOLD_WHILE_FULL:
                        journal.lost(self._pending[-HOLD_WHILE_FULL - 1].seq)
                        self._pending = self._pending[-HOLD_WHILE_FULL:]
                    await asyncio.sleep(FULL_RETRY)
                    continue
                except Exception:
                    # Subscribers still get the events; a replay from before them cannot.
                    log.exception("event journal: cannot write seq %d-%d; replays from before "
                                  "%d will require a resync", batch[0].seq, batch[-1].seq,
                                  batch[-1].seq + 1)
                    journal.lost(batch[-1].seq)
                for event in batch:
                    self._deliver(event)
        finally:
            self._writer = None
            self._idle.set()

    def _deliver(self, event: Event) -> None:
        self.delivered_seq = event.seq
        for sub in list(self._subscriptions):
            if sub.wants(event.topic):
                try:
                    sub.listener(event)
                except Exception:
                    log.exception("event listener failed on %s", event.topic)

    async def flush(self) -> None:
        """Wait until every event published so far is journaled and delivered."""
        await self._idle.wait()

    def subscribe(self, patterns: Iterable[str], listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every event whose topic matches one of the globs.

        Events delivered after this call are those with ``seq > delivered_seq`` at the
        time of the call: a reader of the journal up to that seq misses none and sees
        none twice. Returns a function that ends the subscription (twice is harmless).
        """
        sub = _Subscription(tuple(patterns), listener)
        self._subscriptions.add(sub)
        return lambda: self._subscriptions.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

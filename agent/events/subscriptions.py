"""``Events.*`` methods: subscriptions that replay the journal, then stream; polling reads.

A subscription with ``since`` is registered on the bus first and replays the journal up to
the bus's delivered position at that moment; live events that arrive meanwhile wait in
the subscription's buffer and follow the replay. So a client sees every event after
``since`` exactly once, in seq order, across reconnects and agent restarts.

A subscriber that does not read (its connection's queue of unsent notifications passes
``events.subscriber_queue``) gets one ``events.lagged`` notification and no more events on
that subscription; it resumes with ``since`` set to the ``last_seq`` it was told. Nobody
else waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from virtnode import jsonrpc
from virtnode.api_schema.params import (
    EventsGetParams,
    EventsSubscribeParams,
    EventsUnsubscribeParams,
)
from virtnode.config import EventsConfig
from virtnode.errors import FailedPrecondition, NotFound
from virtnode.events.bus import EventBus
from virtnode.events.event import Event
from virtnode.events.journal import Journal
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)



class Named(Protocol):
    @property
    def identity(self) -> str: ...


class Peer(Protocol):
    """What a subscription needs of the connection it pushes events to."""

    can_push: bool

    @property
    def caller(self) -> Named:
        """Who is on the other end, for the log."""
        ...

    def push(self, message: JsonObject) -> bool:
        """Queue a notification to the peer; False if this session cannot push."""
        ...

    def push_text(self, text: str) -> bool:
        """Queue an encoded notification; False if this session cannot push."""
        ...

    @property
    def backlog(self) -> int:
        """Notifications queued and not yet written to the peer."""
        ...

    @property
    def closed(self) -> bool: ...

    async def wait_backlog(self, size: int) -> None:
        """Return once at most ``size`` notifications wait to be written, or on close."""
        ...

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the session ends."""
        ...

#: Events read from the journal at a time while replaying.
REPLAY_PAGE = 500
#: Longest ``Events.get`` may wait for an event (``wait``), seconds.
MAX_GET_WAIT = 60.0


class _Subscriber:
    """One subscription: replaying, then live, until it ends or lags."""

    def __init__(self, service: EventsService, subscription_id: str, session: Peer,
                 patterns: Sequence[str], limit: int) -> None:
        self.id = subscription_id
        self.session = session
        self.patterns = tuple(patterns)
        self._service = service
        self._limit = limit
        #: Live events held back while the journal is replayed.
        self._held: list[Event] | None = None
        #: The seq of the last event queued to the session (what ``since`` resumes from).
        self.last_seq = 0
        #: Events up to this seq are not sent (the client has them).
        self.floor = 0
        self.ended = False
        self.unsubscribe: Callable[[], None] = lambda: None
        self.replay_task: asyncio.Task[None] | None = None
        #: Events queued in this turn of the loop: the peer has had no chance to read
        #: them, so they do not count against it (a journal write hands events over in
        #: batches, which may be longer than the queue).
        self._fresh = 0

    def on_event(self, event: Event) -> None:
        if self.ended or event.seq <= self.floor:
            return
        if self._held is not None:
            self._held.append(event)
            if len(self._held) > self._limit:
                self.lag()
            return
        self._send(event)

    def _send(self, event: Event) -> None:
        if self.session.backlog - self._fresh >= self._limit:
            self.lag()
            return
        if self.session.push_text(event.notification_text()):
            self.last_seq = event.seq
            self._fresh += 1
            if self._fresh == 1:
                asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        self._fresh = 0

    def lag(self) -> None:
        """Stop delivering; tell the peer where to resume."""
        if self.ended:
            return
        log.warning("%s does not keep up with subscription %s; dropped after seq %d",
                    self.session.caller.identity, self.id, self.last_seq)
        self.session.push(jsonrpc.notification("events.lagged", {
            "subscription_id": self.id,
            "epoch": self._service.bus.epoch,
            "last_seq": self.last_seq,
        }))
        self._service.end(self.id)

    def hold(self) -> None:
        """Keep live events back until :meth:`replay` has sent what came before them."""
        self._held = []

    async def replay(self, journal: Journal, since: int, upto: int) -> None:
        """Send journal events ``since < seq <= upto``, then what arrived meanwhile."""
        self.last_seq = since
        try:
            cursor = since
            while cursor < upto and not self.ended:
                events = await journal.read(cursor, upto, self.patterns, REPLAY_PAGE)
                for event in events:
                    self.session.push_text(event.notification_text())
                if self.ended:
                    return
                if events:
                    self.last_seq = events[-1].seq
                if len(events) < REPLAY_PAGE:
                    break
                cursor = events[-1].seq
                # Let the reader take what was sent before reading more.
                await self.session.wait_backlog(self._limit // 2)
            self.last_seq = max(self.last_seq, upto)
            held, self._held = self._held or [], None
            for event in held:
                if not self.ended:
                    self._send(event)
        except Exception:
            log.exception("replay for subscription %s failed", self.id)
            self._held = None
            self.lag()


class EventsService:
    """Binds bus subscriptions to sessions; a closing session ends its subscriptions."""

    def __init__(self, bus: EventBus, config: EventsConfig) -> None:
        self.bus = bus
        self._config = config
        self._subscribers: dict[str, _Subscriber] = {}

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _check_since(self, since: int | None, epoch: str | None) -> None:
        """Raise FailedPrecondition/resync_required unless the journal holds what follows."""
        bus = self.bus
        journal = bus.journal
        if epoch is not None and epoch != bus.epoch:
            raise FailedPrecondition(
                f"the journal's epoch is {bus.epoch}, not {epoch}: re-list state, then "
                f"subscribe without since", reason="resync_required",
                epoch=bus.epoch, last_seq=bus.delivered_seq)
        if since is None:
            return
        first = journal.first_seq if journal is not None else bus.delivered_seq + 1
        if since + 1 < first or since > bus.last_seq:
            raise FailedPrecondition(
                f"the journal holds events {first}-{bus.delivered_seq}; events after "
                f"{since} are not all there: re-list state, then subscribe without since",
                reason="resync_required", epoch=bus.epoch, first_seq=first,
                last_seq=bus.delivered_seq)

    async def subscribe(self, session: Peer, params: EventsSubscribeParams) -> JsonObject:
        if not session.can_push:
            raise FailedPrecondition(
                "events are pushed over WebSocket connections only; poll with Events.get",
                reason="push_unsupported",
            )
        return self.open(session, params["topics"], params.get("since"), params.get("epoch"))

    def open(self, session: Peer, topics: Sequence[str], since: int | None = None,
             epoch: str | None = None) -> JsonObject:
        """Subscribe ``session`` to ``topics``, replaying after ``since``; the result.

        Raises FailedPrecondition (resync_required) when the journal cannot replay.
        """
        self._check_since(since, epoch)
        subscriber = _Subscriber(self, str(uuid.uuid4()), session, topics,
                                 self._config.subscriber_queue)
        upto = self.bus.delivered_seq
        subscriber.last_seq = upto
        subscriber.floor = max(upto, since or 0)
        journal = self.bus.journal
        replaying = since is not None and since < upto and journal is not None
        if replaying:
            subscriber.hold()
        subscriber.unsubscribe = self.bus.subscribe(subscriber.patterns, subscriber.on_event)
        self._subscribers[subscriber.id] = subscriber
        session.on_close(lambda: self.end(subscriber.id))
        if replaying:
            assert journal is not None and since is not None
            subscriber.replay_task = asyncio.create_task(
                subscriber.replay(journal, since, upto), name=f"replay-{subscriber.id}")
        return {
            "subscription_id": subscriber.id,
            "epoch": self.bus.epoch,
            "last_seq": upto,
        }

    async def unsubscribe(self, session: Peer, params: EventsUnsubscribeParams) -> JsonObject:
        subscription_id = params["subscription_id"]
        subscriber = self._subscribers.get(subscription_id)
        if subscriber is None or subscriber.session is not session:
            raise NotFound(f"no subscription {subscription_id} on this connection",
                           reason="not_found", object="subscription", id=subscription_id)
        self.end(subscription_id)
        return {}

    async def get(self, params: EventsGetParams) -> JsonObject:
        self._check_since(params.get("since"), params.get("epoch"))
        journal = self.bus.journal
        since: int = params.get("since", self.bus.delivered_seq)
        topics: list[str] = params["topics"]
        limit: int = params["limit"]
        wait = min(float(params["wait"]), MAX_GET_WAIT)
        if "since" in params and wait > 0 and self.bus.delivered_seq <= since:
            await self._wait_for(topics, wait)
        upto = self.bus.delivered_seq
        events: list[Event] = []
        if journal is not None and since < upto:
            events = await journal.read(since, upto, topics, limit)
        more = len(events) == limit and events[-1].seq < upto
        # The client continues from the last event it got, or from the position scanned.
        next_since = events[-1].seq if more else upto
        return {
            "epoch": self.bus.epoch,
            "events": [e.to_params() for e in events],
            "first_seq": journal.first_seq if journal is not None else upto + 1,
            "last_seq": upto,
            "next_since": next_since,
            "more": more,
        }

    async def _wait_for(self, topics: Sequence[str], timeout: float) -> None:
        arrived = asyncio.Event()
        stop = self.bus.subscribe(topics, lambda _event: arrived.set())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await arrived.wait()
        finally:
            stop()

    def end(self, subscription_id: str) -> None:
        subscriber = self._subscribers.pop(subscription_id, None)
        if subscriber is None:
            return
        subscriber.ended = True
        subscriber.unsubscribe()
        task = subscriber.replay_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def close(self) -> None:
        for subscription_id in list(self._subscribers):
            self.end(subscription_id)

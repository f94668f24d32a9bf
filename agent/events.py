"""The in-process event bus.

Services publish typed events by topic; subscribers register a callback for topic globs
and get an unsubscribe function back. Publishing never waits: a callback must only hand
the event on (to a queue), and a callback that raises is logged and kept away from the
publisher.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    epoch: str
    seq: int
    topic: str
    time: float
    data: JsonObject

    def to_params(self) -> JsonObject:
        """The ``params`` of the ``event`` notification that carries this event."""
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "topic": self.topic,
            "time": self.time,
            "data": self.data,
        }


Listener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class _Subscription:
    patterns: tuple[str, ...]
    listener: Listener

    def wants(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, p) for p in self.patterns)


class EventBus:
    """Numbers events within an epoch and hands them to matching subscribers."""

    def __init__(self, epoch: str | None = None) -> None:
        self.epoch = epoch or str(uuid.uuid4())
        #: Called with (topic, payload) before publishing; raises ValueError on a bad one.
        self.check: Callable[[str, JsonObject], None] | None = None
        self._seq = itertools.count(1)
        self._subscriptions: set[_Subscription] = set()
        self.last_seq = 0

    def publish(self, topic: str, data: JsonObject) -> Event:
        """Publish an event now; returns it with its sequence number.

        Raises ``ValueError`` when a :attr:`check` is set and rejects the payload.
        """
        if self.check is not None:
            self.check(topic, data)
        event = Event(self.epoch, next(self._seq), topic, time.time(), data)
        self.last_seq = event.seq
        for sub in list(self._subscriptions):
            if sub.wants(topic):
                try:
                    sub.listener(event)
                except Exception:
                    log.exception("event listener failed on %s", topic)
        return event

    def subscribe(self, patterns: Iterable[str], listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every event whose topic matches one of the globs.

        Returns a function that ends the subscription (calling it twice is harmless).
        """
        sub = _Subscription(tuple(patterns), listener)
        self._subscriptions.add(sub)
        return lambda: self._subscriptions.discard(sub)

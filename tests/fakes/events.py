"""A subscriber of the in-process event bus that keeps every event it is handed.

:class:`EventLog` subscribes to topic patterns on a real :class:`~virtnode.events.bus.EventBus`
and records what the bus delivers, in order (with a journal attached, only once the
journal took it, as a client would see it). Tests wait on it for a condition over the
events so far, woken by each new event, never for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from virtnode.events.bus import EventBus
from virtnode.events.event import Event
from virtnode.util.jsontypes import JsonObject

#: Seconds a wait gives the agent before the test fails.
WAIT = 5.0


class EventLog:
    """Every event of ``patterns`` the bus delivers, in order."""

    def __init__(self, bus: EventBus, patterns: Sequence[str] = ("*",)) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        bus.subscribe(list(patterns), self._on_event)

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, topic: str) -> list[JsonObject]:
        """The data of the events on ``topic`` so far."""
        return [e.data for e in self.events if e.topic == topic]

    async def until(self, condition: Callable[[], bool], what: str,
                    timeout: float = WAIT) -> None:
        """Return once ``condition()`` holds, checked on every event; AssertionError
        naming ``what`` and listing the events if ``timeout`` passes first."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout} s; events: "
                                 f"{[(e.topic, e.data) for e in self.events]}") from None

"""Following the agent's events from a client: what ``virtnode events`` runs.

:class:`EventWatch` subscribes, hands every event to a writer and keeps the stream
going when the agent says the subscription lagged (``events.lagged``): it resubscribes
from the last event it delivered, and drops events it has already delivered, so a
lag costs neither gaps (while the journal holds them) nor duplicates.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from virtnode.client.connection import Client, ConnectionLost, RemoteError
from virtnode.util.jsontypes import JsonObject

SUBSCRIBE_TIMEOUT = 30.0


def json_line(params: JsonObject) -> str:
    """An event's notification params as one line of JSON."""
    return json.dumps(params, separators=(",", ":"))


def _value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return json.dumps(value, separators=(",", ":"))


def pretty_line(params: JsonObject) -> str:
    """An event as ``time  #seq  topic  key=value ...`` for people reading a terminal."""
    stamp = params.get("time", 0.0)
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    millis = int(stamp * 1000) % 1000
    data = params.get("data") or {}
    fields = " ".join(f"{key}={_value(value)}" for key, value in data.items())
    return f"{clock}.{millis:03d}  #{params.get('seq')}  {params.get('topic')}  {fields}".rstrip()


class EventWatch:
    """One subscription followed until the connection ends."""

    def __init__(self, client: Client, topics: Sequence[str], since: int | None, *,
                 write: Callable[[JsonObject], None], warn: Callable[[str], None],
                 notice: Callable[[str], None] = lambda _text: None) -> None:
        self._client = client
        self._topics = list(topics)
        self._since = since
        self._write = write
        self._warn = warn
        self._notice = notice
        self._subscription: str | None = None
        self._epoch: str | None = None
        self._last_seq = 0

    async def run(self) -> None:
        """Subscribe and deliver events until the connection closes.

        Raises :class:`RemoteError` when the first subscription is refused and
        :class:`ConnectionLost` when the connection ends.
        """
        await self._subscribe(self._since)
        async for note in self._client.notifications():
            params = note["params"]
            if note["method"] == "event":
                self._deliver(params)
            elif note["method"] == "events.lagged":
                await self._recover(params)
        raise ConnectionLost("the agent closed the connection")

    def _deliver(self, params: JsonObject) -> None:
        epoch, seq = params.get("epoch"), params.get("seq")
        if not isinstance(seq, int):
            return
        if epoch == self._epoch and seq <= self._last_seq:
            return  # delivered before a resubscription
        self._epoch, self._last_seq = epoch, seq
        self._write(params)

    async def _subscribe(self, since: int | None) -> None:
        params: JsonObject = {"topics": self._topics}
        if since is not None:
            params["since"] = since
        result = await self._client.call("Events.subscribe", params, timeout=SUBSCRIBE_TIMEOUT)
        self._subscription = result["subscription_id"]
        if result["epoch"] != self._epoch:
            self._epoch = result["epoch"]
            self._last_seq = since if since is not None else result["last_seq"]
        self._notice(f"subscribed to {', '.join(self._topics)} (epoch {result['epoch']}, "
                     f"last seq {result['last_seq']})")

    async def _recover(self, lagged: JsonObject) -> None:
        last_seq = lagged.get("last_seq")
        self._warn(f"the subscription lagged behind the agent's events after seq {last_seq}; "
                   "resubscribing from there")
        if self._subscription is not None:
            with contextlib.suppress(RemoteError):  # the agent may have ended it already
                await self._client.call("Events.unsubscribe",
                                        {"subscription_id": self._subscription},
                                        timeout=SUBSCRIBE_TIMEOUT)
        if isinstance(last_seq, int):
            try:
                await self._subscribe(last_seq)
                return
            except RemoteError as exc:
                self._warn(f"cannot replay from seq {last_seq} ({exc}); events since then "
                           "are lost, going on with new ones")
        await self._subscribe(None)

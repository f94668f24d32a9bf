"""A client's session, as the dispatcher and the event subscriptions see it, with no socket.

:class:`FakeSession` has what :class:`virtnode.rpc.dispatch.Session` asks of a connection
(and so what :class:`virtnode.events.subscriptions.Peer` asks): who calls, how many of its
requests are in flight and how many may be, and notifications pushed to the peer. A pushed
message is encoded to JSON and decoded again, so what could not go over the wire fails
here too; it then waits in :attr:`FakeSession.queued` until the test calls
:meth:`FakeSession.reads`, which stands for the peer reading everything sent so far.
``can_push=False`` is a session that cannot push (a plain HTTP POST): pushes are refused,
as they are once the session is closed. :meth:`FakeSession.close` runs the ``on_close``
callbacks.

How faithfully: the bookkeeping only. There is no transport and no flow control: the
backlog is what the peer has not read, but :meth:`FakeSession.wait_backlog` returns at
once however long it is, no push is ever dropped or refused for size (a real WebSocket
session drops notifications past its outbox limit and closes past its hard limit), and
``inflight`` is whatever the dispatcher (or the test) makes of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtnode.config import Role
from virtnode.rpc.identity import Caller
from virtnode.util.jsontypes import JsonObject


@dataclass
class FakeSession:
    """A session of ``caller`` (uid 0 on the unix socket unless told) in miniature: pushes
    queue up until the peer reads them."""

    caller: Caller = field(default_factory=lambda: Caller("uid:0", Role.ADMIN, "unix"))
    limit: int = 64
    inflight: int = 0
    can_push: bool = True
    closed: bool = False
    queued: list[Any] = field(default_factory=list)
    read: list[Any] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def max_inflight(self) -> int:
        return self.limit

    @property
    def backlog(self) -> int:
        return len(self.queued)

    def push(self, message: JsonObject) -> bool:
        return self.push_text(json.dumps(message))

    def push_text(self, text: str) -> bool:
        if self.closed or not self.can_push:
            return False
        self.queued.append(json.loads(text))
        return True

    async def wait_backlog(self, size: int) -> None:
        return None

    def on_close(self, callback: Callable[[], None]) -> None:
        self.closers.append(callback)

    def reads(self) -> None:
        """The peer reads everything pushed so far."""
        self.read += self.queued
        self.queued = []

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for callback in self.closers:
                callback()

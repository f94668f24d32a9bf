"""A guest as graceful shutdown sees it (:class:`virtnode.vm.shutdown.Guest`), simulated.

:class:`FakeGuest` is a small state machine: it takes shutdown requests by method name
(``agent``, ``acpi``...), counts them, and stops on the n-th request of a method, at once or
some seconds later (a timer on the running loop). It can refuse a method as QEMU does
without a guest agent (Unavailable), answer NotFound once it is gone, be transient (no
longer defined once stopped), or finish shutting down just as the next request arrives.

How faithfully: only the outcomes shutdown acts on. States are the agent's state names and
change only through requests, the delays and destroy: every state but ``shutoff`` and
``removed`` takes requests, ``paused`` and ``crashed`` included. Requests answer at once and
never fail for any other reason; there is no libvirt, no guest, and no ACPI or agent
protocol. It records each request with the seconds since the guest was created, for tests
to check the pacing; :meth:`FakeGuest.close` cancels a delayed stop still pending.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from virtnode.errors import NotFound, Unavailable
from virtnode.util.aio import wait_event


class FakeGuest:
    """A guest that stops on the n-th request of a method, or some seconds after it.

    ``honours`` maps a method to the press that makes the guest stop (1 = the first);
    ``delay`` to the seconds the guest then takes to power off. Methods in
    ``unavailable`` are refused (no guest agent). A ``transient`` guest no longer exists
    once stopped. ``vanish_on_next_request``: the guest finishes shutting down just as
    the next request arrives, which then fails because the VM is gone.
    """

    def __init__(self, state: str = "running", *, honours: dict[str, int] | None = None,
                 delay: dict[str, float] | None = None, unavailable: tuple[str, ...] = (),
                 transient: bool = False) -> None:
        self.current = state
        self.honours = honours or {}
        self.delay = delay or {}
        self.unavailable = set(unavailable)
        self.transient = transient
        self.vanish_on_next_request = False
        self.presses: Counter[str] = Counter()
        self.requests: list[tuple[str, float]] = []  # (method, seconds since creation)
        self.refused: list[str] = []
        self.destroyed = False
        self._born = time.monotonic()
        self._stopped = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []

    def running(self) -> bool:
        return self.current not in ("shutoff", "removed")

    def _stop(self) -> None:
        if self.running():
            self.current = "removed" if self.transient else "shutoff"
            self._stopped.set()

    def at(self, method: str, press: int = 1) -> float:
        """When the guest got the ``press``-th request of ``method``."""
        return [t for m, t in self.requests if m == method][press - 1]

    async def state(self) -> str:
        return self.current

    async def request(self, method: str) -> None:
        if self.vanish_on_next_request:
            self._stop()
        if not self.running():
            raise NotFound("no domain with matching uuid", reason="not_found", object="vm")
        if method in self.unavailable:
            self.refused.append(method)
            raise Unavailable("QEMU guest agent is not connected", reason="agent_unavailable")
        self.requests.append((method, time.monotonic() - self._born))
        self.presses[method] += 1
        if self.presses[method] == self.honours.get(method):
            seconds = self.delay.get(method, 0.0)
            if seconds:
                self._timers.append(asyncio.get_running_loop().call_later(seconds, self._stop))
            else:
                self._stop()

    async def destroy(self) -> None:
        if not self.running():
            raise NotFound("no domain with matching uuid", reason="not_found", object="vm")
        self.destroyed = True
        self._stop()

    async def wait_stopped(self, timeout: float) -> bool:
        return await wait_event(self._stopped, timeout)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

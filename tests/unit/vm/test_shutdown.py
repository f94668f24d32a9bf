"""Graceful shutdown over a fake guest that behaves like a small state machine."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.fakes.guest import FakeGuest
from virtnode.errors import DeadlineExceeded, FailedPrecondition
from virtnode.util.aio import wait_event
from virtnode.vm.shutdown import Guest, Outcome, shutdown

INTERVAL = 0.05  # seconds between ACPI presses in these tests


async def run(guest: FakeGuest, *, methods: tuple[str, ...] = ("agent", "acpi"),
              timeout: float = 0.3, fallback: str = "none") -> Outcome:
    target: Guest = guest
    try:
        return await shutdown(target, methods=methods, timeout=timeout, fallback=fallback,
                              acpi_interval=INTERVAL)
    finally:
        guest.close()


@pytest.mark.parametrize("state", ["shutoff", "defined", "crashed", "removed"])
async def test_a_stopped_vm_is_refused(state: str) -> None:
    guest = FakeGuest(state, honours={"acpi": 1})
    with pytest.raises(FailedPrecondition) as caught:
        await run(guest, fallback="destroy")
    assert caught.value.reason == "vm_not_running"
    assert guest.requests == []
    assert not guest.destroyed


async def test_agent_stops_the_guest() -> None:
    guest = FakeGuest(honours={"agent": 1, "acpi": 1})
    outcome = await run(guest, timeout=5)
    assert outcome.stopped_by == "agent"
    assert outcome.tried == ("agent",)
    assert outcome.seconds < 0.1
    assert [m for m, _ in guest.requests] == ["agent"]
    assert guest.current == "shutoff"


async def test_no_guest_agent_goes_to_acpi_at_once() -> None:
    guest = FakeGuest(honours={"acpi": 1}, unavailable=("agent",))
    outcome = await run(guest, timeout=5)
    assert outcome.stopped_by == "acpi"
    assert outcome.tried == ("acpi",)
    assert guest.refused == ["agent"]
    assert guest.at("acpi") < 0.1  # not after half the timeout
    assert outcome.seconds < 0.1
    assert not guest.destroyed


async def test_acpi_honoured_on_the_first_press() -> None:
    guest = FakeGuest(honours={"acpi": 1})
    outcome = await run(guest, methods=("acpi",), timeout=5)
    assert (outcome.stopped_by, outcome.tried) == ("acpi", ("acpi",))
    assert outcome.seconds < INTERVAL
    assert guest.presses["acpi"] == 1


async def test_booting_guest_gets_acpi_pressed_again() -> None:
    guest = FakeGuest(honours={"acpi": 2})
    outcome = await run(guest, methods=("acpi",), timeout=0.4)
    assert (outcome.stopped_by, outcome.tried) == ("acpi", ("acpi",))
    assert guest.presses["acpi"] == 2
    assert guest.at("acpi", 2) - guest.at("acpi", 1) >= INTERVAL * 0.9
    assert INTERVAL * 0.9 <= outcome.seconds < 0.3
    assert not guest.destroyed


async def test_slow_guest_is_given_time() -> None:
    guest = FakeGuest(honours={"acpi": 1}, delay={"acpi": 0.12})
    outcome = await run(guest, methods=("acpi",), timeout=0.4)
    assert outcome.stopped_by == "acpi"
    assert 0.1 <= outcome.seconds < 0.3


async def test_stubborn_guest_is_destroyed_after_the_timeout() -> None:
    guest = FakeGuest()
    outcome = await run(guest, methods=("acpi",), timeout=0.2, fallback="destroy")
    assert outcome.stopped_by == "destroy"
    assert outcome.tried == ("acpi", "destroy")
    assert guest.destroyed
    assert guest.current == "shutoff"
    assert 0.19 <= outcome.seconds < 0.35
    assert guest.presses["acpi"] >= 3  # pressed every INTERVAL while waiting


async def test_stubborn_guest_without_fallback_times_out() -> None:
    guest = FakeGuest()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        await run(guest, timeout=0.2, fallback="none")
    assert 0.19 <= time.monotonic() - started < 0.35
    data = caught.value.to_error()["data"]
    assert data["reason"] == "shutdown_timeout"
    assert data["tried"] == ["agent", "acpi"]
    assert guest.current == "running"
    assert not guest.destroyed


async def test_paused_guest_is_destroyed_without_waiting() -> None:
    guest = FakeGuest("paused", honours={"agent": 1, "acpi": 1})
    outcome = await run(guest, timeout=30, fallback="destroy")
    assert (outcome.stopped_by, outcome.tried) == ("destroy", ("destroy",))
    assert outcome.seconds < 0.1
    assert guest.destroyed
    assert guest.requests == []


async def test_paused_guest_without_fallback_is_refused() -> None:
    guest = FakeGuest("paused", honours={"agent": 1, "acpi": 1})
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as caught:
        await run(guest, timeout=30, fallback="none")
    assert time.monotonic() - started < 0.1
    assert caught.value.reason == "vm_paused"
    assert guest.current == "paused"
    assert guest.requests == []
    assert not guest.destroyed


async def test_two_methods_split_the_time() -> None:
    # The agent takes the request but the guest does nothing; ACPI then works.
    guest = FakeGuest(honours={"acpi": 1})
    outcome = await run(guest, timeout=0.3)
    assert outcome.stopped_by == "acpi"
    assert outcome.tried == ("agent", "acpi")
    assert [m for m, _ in guest.requests] == ["agent", "acpi"]
    assert guest.at("agent") < 0.05
    assert 0.13 <= guest.at("acpi") <= 0.2  # about half of 0.3 s
    assert outcome.seconds < 0.25


async def test_second_method_gets_the_rest_of_the_time() -> None:
    guest = FakeGuest()
    outcome = await run(guest, timeout=0.3, fallback="destroy")
    assert outcome.stopped_by == "destroy"
    assert outcome.tried == ("agent", "acpi", "destroy")
    assert 0.13 <= guest.at("acpi") <= 0.2
    assert 0.29 <= outcome.seconds < 0.45


async def test_transient_guest_that_disappears_counts_as_stopped() -> None:
    guest = FakeGuest(honours={"acpi": 2}, transient=True)
    outcome = await run(guest, methods=("acpi",), timeout=0.4, fallback="destroy")
    assert outcome.stopped_by == "acpi"
    assert guest.current == "removed"
    assert not guest.destroyed


async def test_guest_gone_before_the_next_method_is_stopped_by_the_first() -> None:
    # The agent's shutdown completes just as its share of the time runs out: the ACPI
    # request then finds no VM. That is a success, not a timeout.
    guest = FakeGuest(transient=True)
    task = asyncio.create_task(run(guest, timeout=0.2, fallback="none"))
    await asyncio.sleep(0)  # one loop turn: the agent request goes out (all in-loop)
    assert [m for m, _ in guest.requests] == ["agent"]
    guest.vanish_on_next_request = True
    outcome = await task
    assert outcome.stopped_by == "agent"
    assert outcome.tried == ("agent",)
    assert guest.current == "removed"
    assert not guest.destroyed


async def test_guest_gone_before_any_request_is_not_running() -> None:
    guest = FakeGuest(transient=True)
    guest.vanish_on_next_request = True
    with pytest.raises(FailedPrecondition) as caught:
        await run(guest, timeout=5, fallback="destroy")
    assert caught.value.reason == "vm_not_running"
    assert not guest.destroyed


async def test_wait_event_returns_whether_the_event_was_set() -> None:
    stopped = asyncio.Event()
    assert await wait_event(stopped, 0.01) is False
    asyncio.get_running_loop().call_soon(stopped.set)
    assert await wait_event(stopped, 5) is True

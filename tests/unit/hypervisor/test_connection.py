"""The hypervisor owner on libvirt's test driver: deadlines, pool bounds, errors, events."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import pytest

from virtnode.config import HypervisorConfig
from virtnode.errors import DeadlineExceeded, NotFound, Unavailable
from virtnode.events.bus import EventBus
from virtnode.events.event import Event
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import (
    ConnectionState,
    DomainEvent,
    Hypervisor,
    _LoopThreadEvents,
)


def recorder(bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(["hypervisor.*"], seen.append)
    return seen


@pytest.fixture
async def bus() -> EventBus:
    return EventBus()


@pytest.fixture
async def hv(bus: EventBus) -> AsyncIterator[Hypervisor]:
    hypervisor = Hypervisor(HypervisorConfig(uri="test:///default", pool_size=2), bus)
    await hypervisor.start()
    yield hypervisor
    await hypervisor.close()


async def test_connects_and_reports_it(bus: EventBus) -> None:
    seen = recorder(bus)
    hypervisor = Hypervisor(HypervisorConfig(uri="test:///default"), bus)
    await hypervisor.start()
    try:
        assert hypervisor.state is ConnectionState.CONNECTED
        assert await hypervisor.call(lambda conn: conn.getType()) == "TEST"
    finally:
        await hypervisor.close()
    states = [e.data["state"] for e in seen]
    assert states == ["connected", "disconnected"]
    assert all(e.data["uri"] == "test:///default" for e in seen)


async def test_stuck_call_hits_its_deadline_and_others_go_on(hv: Hypervisor) -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        await hv.call(lambda conn: release.wait(10), timeout=0.2, what="stuck call")
    assert time.monotonic() - started < 1.0
    assert caught.value.reason == "hypervisor_call_timeout"
    assert "stuck call" in caught.value.message
    # The stuck thread still holds one slot of two; the other serves calls.
    assert await hv.call(lambda conn: conn.getHostname(), timeout=1.0)
    release.set()


async def test_full_pool_gives_deadline_not_a_hang(hv: Hypervisor) -> None:
    release = threading.Event()
    stuck = [
        asyncio.create_task(hv.call(lambda conn: release.wait(10), timeout=5.0))
        for _ in range(2)
    ]
    await asyncio.sleep(0)  # one loop turn: both take their slots (an in-loop semaphore)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await hv.call(lambda conn: conn.getType(), timeout=0.2)
    assert time.monotonic() - started < 1.0
    release.set()
    assert await asyncio.gather(*stuck) == [True, True]
    assert await hv.call(lambda conn: conn.getType(), timeout=1.0) == "TEST"


async def test_libvirt_errors_are_translated(hv: Hypervisor) -> None:
    with pytest.raises(NotFound) as caught:
        await hv.call(lambda conn: conn.lookupByName("no-such-vm"))
    assert caught.value.object == "vm"
    assert hv.connected, "a NotFound must not be taken for a lost connection"


async def test_an_event_a_pooled_call_causes_reaches_the_listeners(hv: Hypervisor) -> None:
    # The test driver queues a domain event, and arms the timer that delivers it, on the
    # thread that makes the call: a pool thread, not the loop's.
    seen: list[DomainEvent] = []
    arrived = asyncio.Event()

    def listen(event: DomainEvent) -> None:
        seen.append(event)
        arrived.set()

    hv.add_domain_listener(listen)
    await hv.call(lambda conn: conn.lookupByName("test").suspend())
    try:
        async with asyncio.timeout(5):
            await arrived.wait()
        assert (seen[0].kind, seen[0].name, seen[0].event) == (
            "lifecycle", "test", vc.DOMAIN_EVENT_SUSPENDED)
    finally:
        await hv.call(lambda conn: conn.lookupByName("test").resume())


async def test_a_closed_connection_hears_no_more_events(bus: EventBus) -> None:
    # Connections to test:///default in one process share one host: a connection that is
    # not really closed (its event callbacks hold it) goes on hearing the other's events.
    first, second = (Hypervisor(HypervisorConfig(uri="test:///default"), bus)
                     for _ in range(2))
    heard: dict[str, list[DomainEvent]] = {"first": [], "second": []}
    arrived = asyncio.Event()
    first.add_domain_listener(heard["first"].append)
    second.add_domain_listener(lambda event: (heard["second"].append(event), arrived.set()))
    await first.start()
    await first.close()
    await second.start()
    try:
        for change in ("suspend", "resume"):
            arrived.clear()
            await second.call(lambda conn, change=change: getattr(
                conn.lookupByName("test"), change)())
            async with asyncio.timeout(5):
                await arrived.wait()
    finally:
        await second.close()
    assert [e.event for e in heard["second"]] == [vc.DOMAIN_EVENT_SUSPENDED,
                                                  vc.DOMAIN_EVENT_RESUMED]
    assert heard["first"] == []


async def test_closed_hypervisor_is_unavailable(bus: EventBus) -> None:
    hypervisor = Hypervisor(HypervisorConfig(uri="test:///default"), bus)
    await hypervisor.start()
    await hypervisor.close()
    await hypervisor.close()  # idempotent
    with pytest.raises(Unavailable):
        await hypervisor.call(lambda conn: conn.getType())


async def test_unreachable_hypervisor_does_not_fail_start(bus: EventBus, tmp_path: object) -> None:
    seen = recorder(bus)
    config = HypervisorConfig(
        uri=f"qemu+unix:///system?socket={tmp_path}/missing.sock",
        call_timeout=2.0, reconnect_min=0.05, reconnect_max=0.1,
    )
    hypervisor = Hypervisor(config, bus)
    await hypervisor.start()
    try:
        assert hypervisor.state is ConnectionState.DISCONNECTED
        with pytest.raises(Unavailable) as caught:
            await hypervisor.call(lambda conn: conn.getType())
        assert caught.value.reason == "hypervisor_disconnected"
        assert "missing.sock" in hypervisor.reason
    finally:
        await hypervisor.close()
    assert [e.data["state"] for e in seen] == [], "never connected: no state change to report"


async def test_failed_connect_hook_is_retried_not_fatal(bus: EventBus) -> None:
    config = HypervisorConfig(uri="test:///default", reconnect_min=0.01, reconnect_max=0.02)
    hypervisor = Hypervisor(config, bus)
    attempts: list[int] = []
    connected = asyncio.Event()
    bus.subscribe(["hypervisor.connection"],
                  lambda event: connected.set() if event.data["state"] == "connected" else None)

    async def flaky_hook(conn: object) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("callback registration failed")

    hypervisor.add_connect_hook(flaky_hook)
    await hypervisor.start()
    try:
        async with asyncio.timeout(5):
            await connected.wait()
        assert len(attempts) == 3
        assert await hypervisor.call(lambda conn: conn.getType()) == "TEST"
    finally:
        await hypervisor.close()


@pytest.mark.parametrize(
    ("code", "domain", "expected"),
    [
        ("VIR_ERR_NO_DOMAIN", "VIR_FROM_QEMU", "NotFound"),
        ("VIR_ERR_DOM_EXIST", "VIR_FROM_DOMAIN", "AlreadyExists"),
        ("VIR_ERR_XML_ERROR", "VIR_FROM_DOMAIN", "InvalidArgument"),
        ("VIR_ERR_OPERATION_INVALID", "VIR_FROM_QEMU", "FailedPrecondition"),
        ("VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_FROM_QEMU", "Unimplemented"),
        ("VIR_ERR_OPERATION_TIMEOUT", "VIR_FROM_QEMU", "DeadlineExceeded"),
        # A missing disk image is a system error from the driver, not a lost connection.
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_QEMU", "Internal"),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_RPC", "Unavailable"),
        ("VIR_ERR_NO_CONNECT", "VIR_FROM_NONE", "Unavailable"),
    ],
)
def test_libvirt_error_translation(code: str, domain: str, expected: str) -> None:
    import libvirt

    from virtnode.hypervisor.connection import translate_error

    error = translate_error(getattr(libvirt, code), getattr(libvirt, domain), "message")
    assert error.name == expected
    assert error.message == "message"


def test_no_pci_slot_left_is_resource_exhausted() -> None:
    import libvirt

    from virtnode.hypervisor.connection import translate_error

    # What libvirt 9 says when a hotplug finds no free PCI(e) slot.
    error = translate_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_DOMAIN,
                            "internal error: No more available PCI slots")
    assert (error.name, error.reason) == ("ResourceExhausted", "no_free_slot")
    other = translate_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_DOMAIN,
                            "internal error: something else")
    assert other.name == "Internal"


def test_hooks_after_the_loop_closed_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # libvirt closes its last handles and timers as the process exits, after the agent's
    # loop has closed: the hooks must neither touch that loop nor log a traceback.
    loop = asyncio.new_event_loop()
    events = _LoopThreadEvents(loop)
    loop.close()
    with caplog.at_level(logging.DEBUG, logger="virtnode.hypervisor.connection"):
        watch = events._add_handle(0, 1, lambda *_: None, None)
        events._update_handle(watch, 0)
        events._remove_handle(watch)
        timer = events._add_timeout(1000, lambda *_: None, None)
        events._remove_timeout(timer)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_long_call_takes_no_slot_and_translates_errors(hv: Hypervisor) -> None:
    # A migration runs on its own thread: every thread of the pool stays free for the
    # calls that watch it. Each pooled call waits for all the others, so they only all
    # return if each had a thread at once.
    release = threading.Event()
    long = asyncio.ensure_future(hv.call_long(lambda conn: release.wait(10) and
                                              conn.getType(), what="waiting"))
    together = threading.Barrier(hv._config.pool_size, timeout=5)
    try:
        answers = await asyncio.gather(*(
            hv.call(lambda conn: together.wait() >= 0 and conn.getType(), timeout=8)
            for _ in range(hv._config.pool_size)))
        assert answers == ["TEST"] * hv._config.pool_size
        assert not long.done()
    finally:
        release.set()
    assert await long == "TEST"
    with pytest.raises(NotFound):
        await hv.call_long(lambda conn: conn.lookupByName("no-such-vm"), what="lookup")

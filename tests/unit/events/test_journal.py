"""The state store and the event journal on a real SQLite database."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtnode.events.bus import EventBus
from virtnode.events.event import Event
from virtnode.events.journal import Journal
from virtnode.store import Store, StoreError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path)
    await s.open()
    yield s
    await s.close()


async def journaled_bus(store: Store, max_events: int = 1000,
                        max_age: float = 3600.0) -> EventBus:
    bus = EventBus()
    await bus.attach_journal(Journal(store, max_events, max_age))
    return bus


async def reopen(tmp_path: Path, **kwargs: float) -> tuple[Store, EventBus]:
    store = Store(tmp_path)
    await store.open()
    return store, await journaled_bus(store, **kwargs)  # type: ignore[arg-type]


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_events_are_delivered_after_they_are_written(store: Store) -> None:
    bus = await journaled_bus(store)
    seen: list[tuple[int, int]] = []

    def on_event(event: Event) -> None:
        # What a subscriber gets is already in the database.
        with sqlite3.connect(store.path) as conn:
            count = conn.execute("SELECT COUNT(*) FROM journal WHERE seq = ?",
                                 (event.seq,)).fetchone()[0]
        seen.append((event.seq, count))

    bus.subscribe(["*"], on_event)
    events = [bus.publish("test.one", {"n": n}) for n in range(5)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert seen == []  # publishing never waits for the disk or a subscriber
    await bus.flush()
    assert seen == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert bus.delivered_seq == 5


async def test_epoch_and_numbering_survive_a_restart(tmp_path: Path) -> None:
    store, bus = await reopen(tmp_path)
    epoch = bus.epoch
    for n in range(3):
        bus.publish("test.one", {"n": n})
    await bus.flush()
    await store.close()

    store, bus = await reopen(tmp_path)
    try:
        assert bus.epoch == epoch
        assert bus.publish("test.one", {"n": 3}).seq == 4
        await bus.flush()
        journal = bus.journal
        assert journal is not None
        replay = await journal.read(0, 4, ["*"], 100)
        assert [(e.seq, e.data["n"], e.epoch) for e in replay] == [
            (1, 0, epoch), (2, 1, epoch), (3, 2, epoch), (4, 3, epoch)]
    finally:
        await store.close()


async def test_a_lost_database_starts_a_new_epoch(tmp_path: Path) -> None:
    store, bus = await reopen(tmp_path)
    old_epoch = bus.epoch
    bus.publish("test.one", {})
    await bus.flush()
    await store.close()
    await asyncio.to_thread(remove_database, store.path)

    store, bus = await reopen(tmp_path)
    try:
        assert bus.epoch != old_epoch
        assert bus.publish("test.one", {}).seq == 1
    finally:
        await store.close()


async def test_an_unreadable_database_is_kept_aside_and_replaced(tmp_path: Path) -> None:
    await asyncio.to_thread((tmp_path / "state.db").write_bytes,
                            b"this is not a database" * 100)
    store, bus = await reopen(tmp_path)
    try:
        assert store.fresh
        aside = await asyncio.to_thread(lambda: list(tmp_path.glob("state.db.unreadable-*")))
        assert len(aside) == 1
        assert aside[0].read_bytes().startswith(b"this is not a database")
        assert bus.publish("test.one", {}).seq == 1
    finally:
        await store.close()


async def test_tables_from_a_newer_version_are_refused(store: Store) -> None:
    await store.ensure_schema("journal", 1, "CREATE TABLE IF NOT EXISTS x (a)")
    await store.run(lambda conn: conn.execute(
        "UPDATE schema SET version = 99 WHERE component = 'journal'"))
    with pytest.raises(StoreError, match="newer virtnode"):
        await journaled_bus(store)


async def test_count_limit_trims_oldest_and_keeps_numbering(tmp_path: Path) -> None:
    store, bus = await reopen(tmp_path, max_events=10)
    for n in range(30):
        bus.publish("test.one", {"n": n})
        await bus.flush()  # one batch each, so trimming runs as it would over time
    await store.close()

    store, bus = await reopen(tmp_path, max_events=10)
    try:
        journal = bus.journal
        assert journal is not None
        assert journal.first_seq == 21
        held = await journal.read(0, 30, ["*"], 100)
        assert [e.seq for e in held] == list(range(21, 31))
        assert bus.publish("test.one", {}).seq == 31
    finally:
        await store.close()


async def test_age_limit_keeps_the_newest_event(tmp_path: Path) -> None:
    store, bus = await reopen(tmp_path)
    for n in range(3):
        bus.publish("test.one", {"n": n})
    await bus.flush()
    old = time.time() - 7200
    await store.run(lambda conn: conn.execute("UPDATE journal SET time = ?", (old,)))
    await store.close()

    store, bus = await reopen(tmp_path, max_age=3600.0)
    try:
        journal = bus.journal
        assert journal is not None
        assert [e.seq for e in await journal.read(0, 10, ["*"], 10)] == [3]
        assert journal.first_seq == 3
        assert bus.publish("test.one", {}).seq == 4
    finally:
        await store.close()


async def test_read_filters_by_topic_glob_in_order(store: Store) -> None:
    bus = await journaled_bus(store)
    for topic in ("vm.lifecycle", "host.device", "vm.device", "job.state", "vm.lifecycle"):
        bus.publish(topic, {})
    await bus.flush()
    journal = bus.journal
    assert journal is not None
    vm = await journal.read(0, 5, ["vm.*"], 100)
    assert [(e.seq, e.topic) for e in vm] == [
        (1, "vm.lifecycle"), (3, "vm.device"), (5, "vm.lifecycle")]
    some = await journal.read(1, 4, ["job.state", "host.*"], 100)
    assert [e.seq for e in some] == [2, 4]
    assert [e.seq for e in await journal.read(0, 5, ["*"], 2)] == [1, 2]


async def test_a_failed_write_still_delivers_and_marks_the_gap(store: Store) -> None:
    bus = await journaled_bus(store)
    bus.publish("test.one", {})
    await bus.flush()
    # Another writer holds the database: the journal's write fails after the busy timeout.
    blocker = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    await store.run(lambda conn: conn.execute("PRAGMA busy_timeout = 50"))
    try:
        seen: list[int] = []
        bus.subscribe(["*"], lambda e: seen.append(e.seq))
        bus.publish("test.one", {})
        await asyncio.wait_for(bus.flush(), 5)
        assert seen == [2]
        journal = bus.journal
        assert journal is not None
        assert journal.first_seq == 3  # a replay from before seq 3 cannot be complete
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.mark.parametrize("data", [{"description": "x\udfff"}, {"ratio": float("nan")}],
                         ids=["lone-surrogate", "nan"])
async def test_a_payload_that_cannot_be_sent_is_refused_without_a_gap(
        store: Store, data: dict[str, object]) -> None:
    bus = await journaled_bus(store)
    seen: list[int] = []
    bus.subscribe(["*"], lambda event: seen.append(event.seq))
    bus.publish("test.one", {"n": 1})
    with pytest.raises(ValueError):
        bus.publish("test.one", data)
    assert bus.publish("test.one", {"n": 2}).seq == 2  # seq rises by one per event
    await bus.flush()
    assert seen == [1, 2]
    journal = bus.journal
    assert journal is not None
    assert [e.seq for e in await journal.read(0, 10, ["*"], 10)] == [1, 2]

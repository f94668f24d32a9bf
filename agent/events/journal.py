"""The event journal: every event, in order, in the state store.

Rows are ``(seq, topic, time, data)`` in one table; the epoch is kept beside them. The
journal is bounded by count and by age (config ``events.journal_max_events`` and
``events.journal_max_age``); trimming never removes the newest event, so the next start
continues the numbering. When the database was lost (created afresh, or moved aside as
unreadable) the journal starts a new epoch at seq 1: clients holding an old ``(epoch, seq)``
are told to resync instead of being given different events under numbers they have seen.

All database work runs on the store's thread (:class:`virtnode.store.Store`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from virtnode.events.event import Event, notification_text
from virtnode.store import Store, TableSchema, transaction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_time ON journal (time);
CREATE TABLE IF NOT EXISTS journal_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""
TABLES = TableSchema("journal", SCHEMA_VERSION, SCHEMA)

#: Trim at least this often (seconds) for the age limit; the count limit trims sooner.
TRIM_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class JournalPosition:
    epoch: str
    #: The newest seq the journal holds (0 when it never held an event).
    last_seq: int
    #: The oldest seq still held (``last_seq + 1`` when empty).
    first_seq: int


class Journal:
    """Writes batches of events and reads them back by seq and topic glob."""

    def __init__(self, store: Store, max_events: int, max_age: float) -> None:
        self._store = store
        self._max_events = max_events
        self._max_age = max_age
        #: Events written since the last trim, and when that was.
        self._untrimmed = 0
        self._trimmed_at = time.monotonic()
        self.epoch = ""
        #: The oldest seq a reader can still get; raised by trimming and by lost writes.
        self.first_seq = 1

    async def open(self) -> JournalPosition:
        """Create the tables if needed; returns the epoch and the position to continue from."""
        await self._store.ensure_schema(TABLES.component, TABLES.version, TABLES.sql)
        fresh = self._store.fresh
        position = await self._store.run(lambda conn: self._open(conn, fresh))
        self.epoch = position.epoch
        self.first_seq = position.first_seq
        return position

    def _open(self, conn: sqlite3.Connection, fresh: bool) -> JournalPosition:
        row = conn.execute("SELECT value FROM journal_meta WHERE key = 'epoch'").fetchone()
        if row is None or fresh:
            epoch = str(uuid.uuid4())
            with transaction(conn):
                conn.execute("DELETE FROM journal")
                conn.execute("INSERT OR REPLACE INTO journal_meta (key, value) "
                             "VALUES ('epoch', ?)", (epoch,))
            log.info("event journal: new epoch %s", epoch)
        else:
            epoch = str(row[0])
        self._trim(conn)
        first, last = conn.execute("SELECT MIN(seq), MAX(seq) FROM journal").fetchone()
        last = int(last or 0)
        return JournalPosition(epoch, last, int(first) if first is not None else last + 1)

    async def write(self, events: Sequence[Event]) -> None:
        """Append ``events`` (consecutive seqs) in one transaction."""
        rows = [(e.seq, e.topic, e.time, e.data_json) for e in events]
        # Trim when a sixteenth of the limit was added (the journal overshoots its limit by
        # at most that), or now and then for the age limit.
        self._untrimmed += len(rows)
        now = time.monotonic()
        trim = (self._untrimmed >= max(1, self._max_events // 16)
                or now - self._trimmed_at >= TRIM_INTERVAL)
        if trim:
            self._untrimmed = 0
            self._trimmed_at = now
        first = await self._store.run(lambda conn: self._write(conn, rows, trim))
        if first is not None:
            self.first_seq = max(self.first_seq, first)

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[int, str, float, str]],
               trim: bool) -> int | None:
        with transaction(conn):
            conn.executemany("INSERT INTO journal (seq, topic, time, data) VALUES (?, ?, ?, ?)",
                             rows)
        return self._trim(conn) if trim else None

    def _trim(self, conn: sqlite3.Connection) -> int | None:
        """Drop events past the count and age limits, keeping the newest; the new first seq."""
        last = conn.execute("SELECT MAX(seq) FROM journal").fetchone()[0]
        if last is None:
            return None
        cutoff = time.time() - self._max_age
        conn.execute("DELETE FROM journal WHERE seq < ? AND (seq <= ? OR time < ?)",
                     (last, last - self._max_events, cutoff))
        first = conn.execute("SELECT MIN(seq) FROM journal").fetchone()[0]
        return int(first)

    def lost(self, upto_seq: int) -> None:
        """Events up to ``upto_seq`` could not be written: readers must not rely on them."""
        self.first_seq = max(self.first_seq, upto_seq + 1)

    async def last_values(self, topic: str, key: str,
                          fields: Sequence[str]) -> dict[str, dict[str, object]]:
        """The newest ``fields`` of the journaled ``topic`` events, by their ``key`` field.

        Reads the whole topic as far as the journal reaches: used once at start, to tell
        what changed while nobody was journaling.
        """
        def scan(conn: sqlite3.Connection) -> dict[str, dict[str, object]]:
            found: dict[str, dict[str, object]] = {}
            rows = conn.execute("SELECT data FROM journal WHERE topic = ? ORDER BY seq",
                                (topic,))
            for (data,) in rows:
                value = json.loads(data)
                if isinstance(value, dict) and isinstance(value.get(key), str):
                    found[value[key]] = {name: value.get(name) for name in fields}
            return found

        return await self._store.run(scan)

    async def read(self, after_seq: int, upto_seq: int, patterns: Sequence[str],
                   limit: int) -> list[Event]:
        """Events with ``after_seq < seq <= upto_seq`` matching a topic glob, oldest first."""
        globs = " OR ".join("topic GLOB ?" for _ in patterns) or "1"
        sql = (f"SELECT seq, topic, time, data FROM journal WHERE seq > ? AND seq <= ? "
               f"AND ({globs}) ORDER BY seq LIMIT ?")
        args = (after_seq, upto_seq, *patterns, limit)
        rows = await self._store.run(lambda conn: conn.execute(sql, args).fetchall())
        epoch = self.epoch
        return [Event(epoch, seq, topic, when, json.loads(data), data,
                      notification_text(epoch, seq, topic, when, data))
                for seq, topic, when, data in rows]

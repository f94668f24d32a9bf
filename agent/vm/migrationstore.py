"""Migrations in the state store: what each agent must know again after a crash.

Both ends record a migration under its one id as soon as it is agreed (the source once
the destination has prepared, the destination when it answers): the source with the
destination's URL, to tell it the outcome; the destination with the volumes it made,
to remove them if the migration fails. A record goes when its end has settled. Every
function here runs on the store's thread and takes the open ``sqlite3.Connection``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from virtnode.store import TableSchema, transaction
from virtnode.util.jsontypes import JsonObject

COMPONENT = "migrations"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    migration_id TEXT PRIMARY KEY,
    vm_id        TEXT NOT NULL,
    role         TEXT NOT NULL,
    peer         TEXT NOT NULL,
    peer_url     TEXT NOT NULL,
    volumes      TEXT NOT NULL,
    offline      INTEGER NOT NULL,
    started      REAL NOT NULL
);
"""
TABLES = TableSchema(COMPONENT, VERSION, SCHEMA)


@dataclass
class MigrationRecord:
    """One end of a migration: ``role`` source (``peer_url`` the destination agent) or
    destination (``peer`` the source's host UUID; ``volumes`` made for copied disks)."""

    migration_id: str
    vm_id: str
    role: str
    peer: str
    peer_url: str = ""
    volumes: list[JsonObject] = field(default_factory=list)
    started: float = 0.0
    offline: bool = False


def save(conn: sqlite3.Connection, record: MigrationRecord) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO migrations (migration_id, vm_id, role, peer, peer_url, "
            "volumes, offline, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.migration_id, record.vm_id, record.role, record.peer, record.peer_url,
             json.dumps(record.volumes), int(record.offline), record.started))


def delete(conn: sqlite3.Connection, migration_id: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM migrations WHERE migration_id = ?", (migration_id,))


def load_all(conn: sqlite3.Connection) -> list[MigrationRecord]:
    records = []
    for row in conn.execute("SELECT migration_id, vm_id, role, peer, peer_url, volumes, "
                            "started, offline FROM migrations ORDER BY started"):
        try:
            volumes = json.loads(row[5])
        except ValueError:
            volumes = []
        records.append(MigrationRecord(row[0], row[1], row[2], row[3], row[4],
                                       volumes if isinstance(volumes, list) else [],
                                       float(row[6]), bool(row[7])))
    return records

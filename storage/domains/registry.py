"""The registry of attached storage domains: the ``storage_domains`` table.

What the agent needs to attach its domains again after a restart: where each one lives
(the directory holding ``<sd_id>/`` and, for posixfs, the mount spec). The domain's own
metadata stays on the domain; the name here is a copy for listing a domain that cannot be
reached. Every function runs on the store's thread (``await store.run(fn)``).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

COMPONENT = "storage"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS storage_domains (
    sd_id    TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    type     TEXT NOT NULL,
    root     TEXT NOT NULL,
    mount    TEXT,
    attached REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Registration:
    """One attached domain as recorded. ``root`` holds the domain's ``<sd_id>/`` directory
    (for posixfs, the mount point); ``mount`` is the posixfs mount spec as given."""

    sd_id: str
    name: str
    type: str
    root: str
    mount: dict[str, Any] | None
    attached: float


def load(conn: sqlite3.Connection) -> list[Registration]:
    rows = conn.execute("SELECT sd_id, name, type, root, mount, attached FROM storage_domains "
                        "ORDER BY attached").fetchall()
    return [Registration(r[0], r[1], r[2], r[3], None if r[4] is None else json.loads(r[4]),
                         r[5]) for r in rows]


def insert(conn: sqlite3.Connection, reg: Registration) -> None:
    conn.execute("INSERT OR REPLACE INTO storage_domains VALUES (?, ?, ?, ?, ?, ?)",
                 (reg.sd_id, reg.name, reg.type, reg.root,
                  None if reg.mount is None else json.dumps(reg.mount), reg.attached))


def delete(conn: sqlite3.Connection, sd_id: str) -> None:
    conn.execute("DELETE FROM storage_domains WHERE sd_id = ?", (sd_id,))

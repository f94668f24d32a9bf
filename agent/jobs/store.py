"""Job records in the state store: the ``jobs`` table and the statements on it.

Every function here runs on the store's thread (``await store.run(fn)``) and takes the
open ``sqlite3.Connection``. The request key of a job lives in the job's own row, so a key
is forgotten exactly when its job is purged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from virtnode.store import TableSchema, transaction
from virtnode.util.jsontypes import JsonObject

COMPONENT = "jobs"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    progress    INTEGER NOT NULL,
    description TEXT NOT NULL,
    target      TEXT,
    cancellable INTEGER NOT NULL,
    started     REAL NOT NULL,
    finished    REAL,
    error       TEXT,
    result      TEXT,
    params      TEXT NOT NULL,
    request_key TEXT UNIQUE,
    params_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
"""
TABLES = TableSchema(COMPONENT, VERSION, SCHEMA)


@dataclass
class JobRecord:
    """One job as stored and as reported (see :meth:`to_api`)."""

    job_id: str
    kind: str
    state: str
    progress: int
    description: str
    target: str | None
    cancellable: bool
    started: float
    finished: float | None = None
    error: JsonObject | None = None
    result: JsonObject | None = None
    params: JsonObject | None = None
    request_key: str | None = None
    params_hash: str | None = None

    def to_api(self) -> JsonObject:
        """The ``Job`` object of the API."""
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "progress": self.progress,
            "description": self.description,
            "target": self.target,
            "cancellable": self.cancellable,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "result": self.result,
            "request_key": self.request_key,
        }


_COLUMNS = ("job_id", "kind", "state", "progress", "description", "target", "cancellable",
            "started", "finished", "error", "result", "params", "request_key", "params_hash")


def _dump(value: JsonObject | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row(job: JobRecord) -> tuple[Any, ...]:
    return (job.job_id, job.kind, job.state, job.progress, job.description, job.target,
            int(job.cancellable), job.started, job.finished, _dump(job.error),
            _dump(job.result), _dump(job.params or {}), job.request_key, job.params_hash)


def _record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    for key in ("error", "result", "params"):
        if values[key] is not None:
            values[key] = json.loads(values[key])
    values["cancellable"] = bool(values["cancellable"])
    return JobRecord(**values)


def insert(conn: sqlite3.Connection, job: JobRecord) -> None:
    """Add a new job; raises ``sqlite3.IntegrityError`` if its request key is taken."""
    conn.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_COLUMNS))})", _row(job))


def save_state(conn: sqlite3.Connection, jobs: Iterable[JobRecord]) -> None:
    """Write the state, progress and outcome of ``jobs`` in one transaction."""
    with transaction(conn, "IMMEDIATE"):
        conn.executemany(
            "UPDATE jobs SET state = ?, progress = ?, finished = ?, error = ?, result = ? "
            "WHERE job_id = ?",
            [(j.state, j.progress, j.finished, _dump(j.error), _dump(j.result), j.job_id)
             for j in jobs],
        )


def save_progress(conn: sqlite3.Connection, job_id: str, progress: int) -> None:
    conn.execute("UPDATE jobs SET progress = ? WHERE job_id = ?", (progress, job_id))


def load_all(conn: sqlite3.Connection) -> list[JobRecord]:
    cursor = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY started, job_id")
    return [_record(row) for row in cursor.fetchall()]


def delete(conn: sqlite3.Connection, job_ids: Iterable[str]) -> None:
    """Remove jobs (and with them their request keys) in one transaction."""
    with transaction(conn, "IMMEDIATE"):
        conn.executemany("DELETE FROM jobs WHERE job_id = ?", [(i,) for i in job_ids])

"""The state store: one SQLite database under the state directory.

What must survive a restart lives here: the event journal, jobs, and later the storage
domain registry and network configuration. Every statement runs on the store's own thread
(:meth:`Store.run`), one at a time, so the event loop never waits on the disk and no two
writers race. The database is in WAL mode with ``synchronous=FULL``: a transaction that
returned is on disk, even across a power loss (about 0.3 ms per commit on these machines;
callers batch where that matters, as the journal does).

The state directory is made mode 0700 when the agent makes it, and the database and its
-wal and -shm files are always mode 0600: they hold the host's configuration and
history, which no other user has business reading.

A database that cannot be read (corrupt, not SQLite, or holding tables of another schema:
missing tables or columns the declared schemas expect, a version that is no version) is
moved aside, kept for inspection, and replaced by an empty one; :attr:`Store.fresh` tells
the services that what they kept is gone (the journal then starts a new epoch). A
database written by a newer virtnode (a component's schema version above what this one
knows) is refused, never rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from virtnode.errors import Unavailable
from virtnode.util.aio import DaemonThreadPool
from virtnode.util.burstlog import BurstLog

log = logging.getLogger(__name__)

#: A state directory the agent makes: its own, but passable (see :func:`prepare_state_dir`).
STATE_DIR_MODE = 0o711

T = TypeVar("T")

DB_NAME = "state.db"


class StoreError(Exception):
    """The state store cannot be used (unreadable directory, newer schema)."""


class StoreFull(Unavailable):
    """The state directory's filesystem is full: what needs the store waits for space.

    An API error (``Unavailable``, reason ``state_store_full``), so a call whose work needs
    the store answers it rather than an internal error.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"the state store {path} is full: free space on its filesystem",
                         reason="state_store_full")


#: Bytes the WAL is cut back to after a checkpoint.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: SQLite's SQLITE_FULL: "database or disk is full".
_SQLITE_FULL = 13


def prepare_state_dir(path: Path) -> None:
    """Make the state directory (mode 0711) unless it exists; check that it can be used.

    The directory holds what survives a restart, the host id, and in time secrets: only
    the agent needs to read it, so others may not list it (0711); they may pass through
    it, as QEMU does to reach the storage domains mounted under it by default
    (``storage.mount_root``). One the operator made keeps its mode. Blocking. Raises
    :class:`StoreError` starting with the path: it is not a directory, cannot be made,
    or cannot be written.
    """
    try:
        path.mkdir(mode=STATE_DIR_MODE, parents=True)  # parents made get the usual mode
    except FileExistsError:
        if not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot be created: {exc.strerror}") from None
    try:
        # A file with no name (O_TMPFILE), gone when closed: writing is what the agent
        # does here, and access(2) would answer for the real uid, not the effective one.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StoreError(f"{path}: cannot be written: {exc.strerror}") from None


def _make_private(path: Path) -> None:
    """Create the database file mode 0600 unless it exists, and make it and its -wal and
    -shm files 0600 if they exist (older agents made them 0644).

    SQLite creates the -wal and -shm files with the database file's mode. Raises
    :class:`StoreError` when that cannot be done.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{path} is not a regular file")
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "") -> Iterator[sqlite3.Connection]:
    """``BEGIN [mode]`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises.

    For connections in autocommit mode (``isolation_level=None``), as the store's is.
    """
    conn.execute(f"BEGIN {mode}".rstrip())
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@dataclass(frozen=True)
class TableSchema:
    """A component's tables: the version and the idempotent SQL that creates them."""

    component: str
    version: int
    sql: str


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))}


def _check_schema(conn: sqlite3.Connection, schema: TableSchema) -> None:
    """Check that the tables ``schema`` makes are absent or have the columns it gives them.

    Raises ``sqlite3.DatabaseError`` when the tables are of another schema. A version
    above ``schema.version`` (a newer virtnode's) is left to :meth:`Store.ensure_schema`
    to refuse.
    """
    row = conn.execute("SELECT version FROM schema WHERE component = ?",
                       (schema.component,)).fetchone()
    version = None if row is None else row[0]
    if version is not None and not (isinstance(version, int) and version >= 1):
        raise sqlite3.DatabaseError(f"{schema.component} tables have no version: {version!r}")
    if version is not None and version > schema.version:
        return
    expected = sqlite3.connect(":memory:")
    try:
        expected.executescript(schema.sql)
        tables = [name for (name,) in expected.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            have = _columns(conn, table)
            if not have and version == schema.version:
                raise sqlite3.DatabaseError(f"{schema.component} table {table} is missing")
            missing = _columns(expected, table) - have if have else set()
            if missing:
                raise sqlite3.DatabaseError(f"{schema.component} table {table} lacks "
                                            f"columns {', '.join(sorted(missing))}")
    finally:
        expected.close()


class Store:
    """The agent's SQLite database, used from one thread.

    ``schemas`` are the tables the services will ask for (:meth:`ensure_schema`): a
    database whose tables do not match them is unreadable, found so when it is opened.
    """

    def __init__(self, state_dir: Path, schemas: Sequence[TableSchema] = ()) -> None:
        self.path = state_dir / DB_NAME
        self._schemas = tuple(schemas)
        #: True when the database was created by this start (none before, or unreadable).
        self.fresh = False
        self._conn: sqlite3.Connection | None = None
        self._pool = DaemonThreadPool(1, "state-store")
        self._started = False
        self._full_log = BurstLog(log)

    async def open(self) -> None:
        """Open (or create) the database. Raises :class:`StoreError`."""
        if not self._started:
            self._pool.start()
            self._started = True
        await asyncio.wrap_future(self._pool.submit(self._open))

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the store's thread and return its result.

        Raises :class:`StoreFull` when the filesystem has no room for what ``fn`` writes
        (logged once a minute, not once a call).
        """
        conn = self._conn
        if conn is None:
            raise StoreError("the state store is not open")
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, conn))
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != _SQLITE_FULL:
                raise
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        self._full_log(logging.ERROR, "state store %s: the filesystem is full; calls that "
                       "need the store answer Unavailable until there is space", self.path)
        # A full WAL is what filled the disk: give back what a checkpoint can.
        with contextlib.suppress(sqlite3.Error):
            await asyncio.wrap_future(self._pool.submit(_checkpoint, conn))
        raise StoreFull(self.path)

    async def ensure_schema(self, component: str, version: int, sql: str) -> None:
        """Create ``component``'s tables with ``sql`` unless they exist at ``version``.

        ``sql`` must be idempotent (``CREATE ... IF NOT EXISTS``). Raises
        :class:`StoreError` when the database holds a newer version of the component.
        """

        def ensure(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT version FROM schema WHERE component = ?",
                               (component,)).fetchone()
            if row is not None and row[0] > version:
                raise StoreError(
                    f"{self.path}: {component} tables are version {row[0]}, written by a "
                    f"newer virtnode (this one knows version {version}); refusing to use them"
                )
            if row is not None and row[0] == version:
                return
            conn.executescript(sql)  # idempotent: a crash here is repaired by the next start
            conn.execute("INSERT OR REPLACE INTO schema (component, version) VALUES (?, ?)",
                         (component, version))

        await self.run(ensure)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.wrap_future(self._pool.submit(conn.close))
        if self._started:
            self._pool.shutdown(wait=False)
            self._started = False

    # --- on the store's thread -------------------------------------------------------------

    def _open(self) -> None:
        prepare_state_dir(self.path.parent)
        existed = self.path.exists()
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as exc:
            if not existed:
                raise StoreError(f"cannot create {self.path}: {exc}") from None
            aside = self.path.with_name(f"{DB_NAME}.unreadable-{int(time.time())}")
            log.error("state store %s is unreadable (%s); moved to %s, starting empty",
                      self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(Path(f"{aside}{suffix}"))
            existed = False
            try:
                conn = self._connect()
            except sqlite3.DatabaseError as exc2:
                raise StoreError(f"cannot create {self.path}: {exc2}") from None
        self.fresh = not existed
        self._conn = conn

    def _connect(self) -> sqlite3.Connection:
        try:
            _make_private(self.path)
        except OSError as exc:  # not a DatabaseError: the file is not to be moved aside
            raise StoreError(f"cannot make {self.path} private: {exc.strerror}") from None
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # After a checkpoint the WAL is cut back to this size, not left at its peak.
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {row}")
            conn.execute("CREATE TABLE IF NOT EXISTS schema "
                         "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            for schema in self._schemas:
                _check_schema(conn, schema)
        except BaseException:
            conn.close()
            raise
        return conn


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path``
    and fsyncs the directory. Raises ``OSError`` on failure, leaving ``path`` untouched.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_dir(path: Path, mode: int = 0o755, *, exist_ok: bool = False) -> None:
    """Make a directory with exactly ``mode``, whatever the umask (a directory of a storage
    domain must be searchable by the hypervisor's user). With ``exist_ok``, an existing
    directory keeps its mode. Raises ``OSError`` (``FileExistsError`` unless ``exist_ok``)."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if exist_ok and path.is_dir():
            return
        raise
    os.chmod(path, mode)


def fsync_file(path: Path) -> None:
    """Make a file's data durable; a symlink at ``path`` is refused (``OSError``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

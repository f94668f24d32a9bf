"""Where a localfs domain may be: not in the system's own directories, not on a kernel's
pseudo filesystem, and not so deep that the layout below it cannot be written.

A domain's root comes from a client, and the agent runs as root: ``StorageDomain.create``
with ``force`` in ``/etc`` would make directories and metadata there, and one on ``/proc``
or ``/sys`` fails half-way. The rules, checked before anything is made:

- the path as given: absolute, no ``..``, no NUL, every component at most ``NAME_MAX``
  (255) bytes and the whole, with room for the layout below it, within ``PATH_MAX``
  (reason ``path_too_long``);
- the path with its symlinks resolved: not ``/`` or a few top-level directories
  themselves (:data:`SYSTEM_DIRS`), nothing inside the system's trees
  (:data:`SYSTEM_TREES`: ``/etc``, ``/usr``, ``/lib*``, ``/boot``, ``/dev``, ``/proc``,
  ``/sys``, ``/run``...), nor inside the agent's own state directory or mount root
  (reason ``system_path``);
- the filesystem it is on, by the type ``/proc/self/mountinfo`` gives the mount that holds
  it: none of :data:`SPECIAL_FILESYSTEMS` (reason ``special_filesystem``). tmpfs is
  allowed (a domain for tests or scratch disks), except where the paths above refuse it
  (``/dev/shm``, ``/run``).

All of them are :class:`InvalidArgument` with ``field`` ``path``. The functions here are
plain code; the caller resolves the path and reads mountinfo in a storage thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from virtnode.errors import InvalidArgument
from virtnode.storage.domains.mounts import mount_table

PATH_MAX = 4096
NAME_MAX = 255
#: Bytes the layout adds below a root, with room to spare: the longest name it writes is
#: a volume's temporary metadata file,
#: ``/<sd_id>/images/<image_id>/.<volume_id>.meta.json.XXXXXXXX.tmp`` (about 140).
LAYOUT_DEPTH = 160

#: Directories that may not be a domain's root themselves (what lies below them may).
SYSTEM_DIRS = frozenset({"/", "/home", "/tmp", "/var", "/var/lib", "/var/tmp"})
#: Trees no domain may be in.
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/boot", "/dev", "/proc", "/sys", "/run", "/root", "/var/log", "/var/cache",
                "/var/spool", "/var/mail", "/var/backups", "/var/lib/dpkg", "/var/lib/apt",
                "/var/lib/systemd")
#: Filesystem types that hold kernel interfaces or other mounts, never disk images.
SPECIAL_FILESYSTEMS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "proc", "pstore",
    "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "sysfs", "tracefs",
})


def _invalid(message: str, reason: str, field: str = "path") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def check_text(text: str, field: str = "path") -> None:
    """Check a root path as the client gave it. Raises :class:`InvalidArgument` (reason
    ``invalid_path`` or ``path_too_long``)."""
    if not text.startswith("/") or "\0" in text or ".." in PurePosixPath(text).parts:
        raise _invalid(f"path {text[:200]!r} must be absolute, without '..'",
                       "invalid_path", field)
    check_length(text, field)


def check_length(text: str, field: str = "path") -> None:
    """Refuse a root whose components or whole length leave no room for a domain."""
    raw = os.fsencode(text)
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise _invalid(f"path {text[:80]!r}...: a component of {longest} bytes is longer "
                       f"than {NAME_MAX}", "path_too_long", field)
    if len(raw) + LAYOUT_DEPTH >= PATH_MAX:
        raise _invalid(f"path {text[:80]!r}... is {len(raw)} bytes: a domain below it "
                       f"needs {LAYOUT_DEPTH} more, within {PATH_MAX}", "path_too_long",
                       field)


def check_place(resolved: Path, own: Iterable[Path] = ()) -> None:
    """Refuse a root (symlinks resolved) in a system directory or in one of ``own`` (the
    agent's directories, resolved too). Raises :class:`InvalidArgument` (``system_path``)."""
    path = PurePosixPath(resolved)
    trees = [*SYSTEM_TREES, *(str(p) for p in own)]
    if str(path) in SYSTEM_DIRS or any(path.is_relative_to(tree) for tree in trees):
        raise _invalid(f"{resolved} is a system directory or inside one (/, /etc, /usr, "
                       "/dev, /proc, /sys, /run, the agent's state...); a storage domain "
                       "is never made there", "system_path")


def filesystem_type(path: Path, mountinfo: str) -> str:
    """The type of the filesystem holding ``path`` (resolved, absolute): that of the mount
    with the longest mount point above it, the last one mounted where several are."""
    best, fstype = -1, ""
    for mount_point, vfs_type in mount_table(mountinfo):
        point = PurePosixPath(mount_point)
        if PurePosixPath(path).is_relative_to(point) and len(point.parts) >= best:
            best, fstype = len(point.parts), vfs_type
    return fstype


def check_filesystem(path: Path, fstype: str) -> None:
    """Refuse a root on a special filesystem. Raises :class:`InvalidArgument`
    (``special_filesystem``)."""
    if fstype in SPECIAL_FILESYSTEMS:
        raise _invalid(f"{path} is on a {fstype} filesystem, which holds no disk images",
                       "special_filesystem")

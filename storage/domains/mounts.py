"""Mounting the filesystems of posixfs domains: ``mount``/``umount`` run with an argv list.

The agent owns these mounts: one per domain at ``<storage.mount_root>/<sd_id>``, made on
create or attach, unmounted on detach or delete, kept across an agent restart (VMs keep
using them). Every spec comes from a client, so it is checked before it reaches ``mount``:
the source, type and options have restricted characters, none starts with ``-``, and the
agent always adds ``nosuid,nodev,noexec`` last (later options win), because disk images
never need set-uid programs, device nodes or executables.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtnode.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from virtnode.util.jsontypes import JsonObject

MOUNT = "/bin/mount"
UMOUNT = "/bin/umount"
FORCED_OPTIONS = ("nosuid", "nodev", "noexec")

_VFS_TYPE = re.compile(r"[a-z0-9][a-z0-9._]{0,31}")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=:/@+-]{0,255}")
_SOURCE_MAX = 1024


@dataclass(frozen=True)
class MountSpec:
    """What to mount: a source (a block device, or host:/path for network filesystems),
    its filesystem type and mount options (comma-separated, may be empty)."""

    source: str
    vfs_type: str
    options: str = ""

    @classmethod
    def parse(cls, raw: Any) -> MountSpec:
        """Check a spec from a client or the registry; raises :class:`InvalidArgument`."""
        if not isinstance(raw, dict):
            raise InvalidArgument("mount must be an object", reason="invalid_mount",
                                  field="mount")
        source, vfs_type, options = raw.get("source"), raw.get("vfs_type"), raw.get("options", "")
        if (not isinstance(source, str) or not source or len(source) > _SOURCE_MAX
                or source.startswith("-") or any(ord(c) < 0x20 or c == "\x7f" for c in source)):
            raise InvalidArgument("mount.source must be 1 to 1024 printable characters, not "
                                  "starting with '-'", reason="invalid_mount",
                                  field="mount.source")
        if not isinstance(vfs_type, str) or not _VFS_TYPE.fullmatch(vfs_type):
            raise InvalidArgument(f"mount.vfs_type {str(vfs_type)[:40]!r} is not a filesystem "
                                  "type", reason="invalid_mount", field="mount.vfs_type")
        if not isinstance(options, str) or (
                options and not all(_OPTION.fullmatch(o) for o in options.split(","))):
            raise InvalidArgument("mount.options must be comma-separated words of letters, "
                                  "digits and _.=:/@+-", reason="invalid_mount",
                                  field="mount.options")
        return cls(source, vfs_type, options)

    def argv(self, target: Path) -> list[str]:
        """The ``mount`` command line; the agent's forced options come last and win."""
        options = ",".join([*filter(None, self.options.split(",")), *FORCED_OPTIONS])
        return [MOUNT, "-t", self.vfs_type, "-o", options,
                "--source", self.source, "--target", str(target)]

    def to_api(self) -> JsonObject:
        return {"source": self.source, "vfs_type": self.vfs_type, "options": self.options}


def _unescape(field: str) -> str:
    """Undo the octal escapes of /proc/self/mountinfo (``\\040`` for a space...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points(mountinfo: str) -> set[str]:
    """The mount points listed in the text of ``/proc/self/mountinfo``."""
    return {point for point, _ in mount_table(mountinfo)}


def mount_table(mountinfo: str) -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of each line of ``/proc/self/mountinfo``, in
    order (a later mount on the same point hides an earlier one). The type follows the
    ``-`` that ends the optional fields."""
    table = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if separator + 1 < len(fields):
            table.append((_unescape(fields[4]), _unescape(fields[separator + 1])))
    return table


def read_mountinfo() -> str:
    """The text of ``/proc/self/mountinfo`` (procfs: never blocks on a hung filesystem)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def is_mounted(target: Path) -> bool:
    """Whether something is mounted on ``target``. Reads procfs only (never blocks on a
    hung filesystem)."""
    return str(target) in mount_points(read_mountinfo())


async def _run(argv: list[str], timeout: float, what: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"{what} did not finish within {timeout:g}s",
                               reason="mount_timeout") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace").strip()[:500]


async def mount(spec: MountSpec, target: Path, timeout: float) -> None:
    """Mount ``spec`` on the existing directory ``target``.

    Raises :class:`FailedPrecondition` (reason ``mount_failed``, with ``mount``'s message)
    and :class:`DeadlineExceeded` (reason ``mount_timeout``).
    """
    status, err = await _run(spec.argv(target), timeout, f"mounting {spec.source}")
    if status != 0:
        raise FailedPrecondition(f"cannot mount {spec.source} ({spec.vfs_type}): {err}",
                                 reason="mount_failed")


async def unmount(target: Path, timeout: float) -> None:
    """Unmount ``target``. Raises :class:`FailedPrecondition` (reason ``unmount_failed``,
    e.g. still busy) and :class:`DeadlineExceeded` (reason ``mount_timeout``)."""
    status, err = await _run([UMOUNT, str(target)], timeout, f"unmounting {target}")
    if status != 0:
        raise FailedPrecondition(f"cannot unmount {target}: {err}", reason="unmount_failed")

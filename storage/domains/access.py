"""Whether the hypervisor's user can reach a storage domain's files.

QEMU does not run as the agent: on ``qemu:///system`` libvirt starts it as the ``user`` and
``group`` of its ``qemu.conf`` (``libvirt-qemu`` unless set). A domain on a directory that
user cannot traverse accepts volumes, and fails only when a VM starts on one. So a domain is
checked when it is created or attached: every directory from ``/`` down to it must be
searchable by that user, judged from the mode bits and owners (``os.access`` would judge
the agent, which is root). POSIX ACLs are not read: a directory that only an ACL opens is
refused.

:func:`hypervisor_user` and :func:`check_reachable` do blocking I/O (passwd, group and
``qemu.conf`` reads, ``stat``); run them off the event loop.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from virtnode.errors import FailedPrecondition

#: libvirt's configuration of the QEMU driver (system instance).
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: The users QEMU runs as when ``qemu.conf`` names none: Debian's build of libvirt, then
#: Fedora's; the first that exists.
DEFAULT_QEMU_USERS = ("libvirt-qemu", "qemu")

_SETTING = re.compile(r'^\s*(user|group)\s*=\s*"([^"]*)"\s*(#.*)?$')


@dataclass(frozen=True)
class Accessor:
    """A user as the kernel judges its access: uid and every group it holds."""

    name: str
    uid: int
    gids: frozenset[int]

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


def qemu_conf_identity(text: str) -> tuple[str | None, str | None]:
    """The ``user`` and ``group`` settings of a ``qemu.conf`` text (None where unset)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _SETTING.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found.get("user"), found.get("group")


def may_search(st: os.stat_result, who: Accessor) -> bool:
    """Whether ``who`` may search (traverse) a directory with this stat, by its mode bits:
    the owner's bits for its owner, else the group's for a member, else the others'."""
    if who.uid == 0:
        return bool(st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in who.gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def blocking_dir(path: Path, who: Accessor) -> Path | None:
    """The first directory from ``/`` down to ``path`` (absolute, resolved, included) that
    ``who`` cannot search, or None. Raises ``OSError`` when a directory cannot be read."""
    for directory in (*reversed(path.parents), path):
        if not may_search(os.stat(directory), who):
            return directory
    return None


def check_reachable(path: Path, who: Accessor | None) -> None:
    """Raise FailedPrecondition (reason ``not_accessible``, data ``path`` and ``user``)
    unless ``who`` can traverse every directory down to ``path``; None checks nothing."""
    if who is None:
        return
    blocked = blocking_dir(path, who)
    if blocked is not None:
        raise FailedPrecondition(
            f"the hypervisor's user {who} cannot reach {path}: {blocked} (mode "
            f"{stat.S_IMODE(os.stat(blocked).st_mode):04o}) does not let it through",
            reason="not_accessible", path=str(blocked), user=who.name)


def hypervisor_user(uri: str, qemu_conf: Path = QEMU_CONF) -> Accessor | None:
    """The user QEMU runs as under libvirt ``uri``, or None when there is none to check:
    a hypervisor other than QEMU's system instance (``test:///default``, a session
    instance, which runs QEMU as the agent itself) or QEMU running as root. Raises
    ``KeyError`` when the user or group ``qemu.conf`` names does not exist, or when it
    names none and no default user exists."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("qemu") or parts.path.rstrip("/") != "/system":
        return None
    try:
        user, group = qemu_conf_identity(qemu_conf.read_text(errors="replace"))
    except FileNotFoundError:
        user, group = None, None
    account = _passwd(user) if user is not None else _default_account()
    if account.pw_uid == 0:
        return None
    # libvirt runs QEMU with the configured group (else the user's own) and the user's
    # supplementary groups, as getgrouplist gives them.
    gid = account.pw_gid if group is None else _group_id(group)
    return Accessor(account.pw_name, account.pw_uid,
                    frozenset(os.getgrouplist(account.pw_name, gid)) | {gid})


def _passwd(user: str) -> pwd.struct_passwd:
    """A ``qemu.conf`` user: a name, or ``+uid`` for a number."""
    if user.startswith("+"):
        return pwd.getpwuid(int(user[1:]))
    return pwd.getpwnam(user)


def _group_id(group: str) -> int:
    """A ``qemu.conf`` group: a name, or ``+gid`` for a number."""
    if group.startswith("+"):
        return int(group[1:])
    return grp.getgrnam(group).gr_gid


def _default_account() -> pwd.struct_passwd:
    for name in DEFAULT_QEMU_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise KeyError(f"none of the users {', '.join(DEFAULT_QEMU_USERS)} exists")

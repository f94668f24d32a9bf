"""Whose access a storage domain is checked for, and how mode bits are judged."""

from __future__ import annotations

import os
from pathlib import Path

from virtnode.storage.domains import access
from virtnode.storage.domains.access import Accessor

QEMU = Accessor("libvirt-qemu", 64055, frozenset({108, 64055}))


def stat_of(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((0o040000 | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


def test_qemu_conf_settings_are_read_and_comments_ignored() -> None:
    text = '#user = "nobody"\nuser = "qemu"  # ours\n group="+107"\n'
    assert access.qemu_conf_identity(text) == ("qemu", "+107")
    assert access.qemu_conf_identity('#user = "libvirt-qemu"\n') == (None, None)


def test_mode_bits_are_judged_as_the_kernel_does() -> None:
    assert not access.may_search(stat_of(0o700), QEMU)
    assert access.may_search(stat_of(0o701), QEMU)
    assert access.may_search(stat_of(0o710, gid=108), QEMU)
    assert not access.may_search(stat_of(0o071, uid=64055), QEMU)  # owner bits only
    assert access.may_search(stat_of(0o700, uid=64055), QEMU)


def test_only_qemu_system_instances_are_checked() -> None:
    assert access.hypervisor_user("test:///default") is None
    assert access.hypervisor_user("qemu:///session") is None


def test_blocking_dir_names_the_first_closed_ancestor(tmp_path: Path) -> None:
    closed = tmp_path / "a"
    (closed / "b").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(closed, 0o700)
    nobody = Accessor("nobody", 65534, frozenset({65534}))
    expected = next((p for p in reversed(tmp_path.parents) if not p.stat().st_mode & 0o001),
                    closed)
    assert access.blocking_dir(closed / "b", nobody) == expected

"""Where a localfs domain may be: the pure checks of paths and filesystem types."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtnode.errors import InvalidArgument
from virtnode.storage.domains import location
from virtnode.storage.domains.mounts import mount_table

# /proc/self/mountinfo as a Debian 12 host writes it, with a few mounts of our own.
MOUNTINFO = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 28 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
24 28 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4008104k
28 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
29 24 0:26 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
30 22 0:27 / /sys/kernel/security rw,nosuid,nodev,noexec shared:8 - securityfs securityfs rw
40 28 0:40 / /srv/scratch rw,relatime shared:20 - tmpfs tmpfs rw,size=1024k
41 28 0:41 / /srv/with\\040space rw,relatime - xfs /dev/vdb rw
42 40 0:42 / /srv/scratch/p rw,relatime - proc proc rw
43 28 0:43 / /srv/over rw - tmpfs tmpfs rw
44 28 0:44 / /srv/over rw - proc proc rw
"""


def test_the_mount_table_reads_types_after_the_optional_fields() -> None:
    table = dict(mount_table(MOUNTINFO))
    assert table["/sys"] == "sysfs" and table["/"] == "ext4"
    assert table["/srv/with space"] == "xfs"  # no optional field, an escaped space


@pytest.mark.parametrize(("path", "fstype"), [
    ("/", "ext4"), ("/var/lib/sd", "ext4"), ("/dev/shm/x", "tmpfs"), ("/proc/1", "proc"),
    ("/sys/kernel/security/x", "securityfs"), ("/sys/kernel", "sysfs"),
    ("/srv/scratch/d", "tmpfs"), ("/srv/scratch/p/q", "proc"), ("/srv/scratchy", "ext4"),
    ("/srv/over/x", "proc"),  # the later mount on the same point hides the earlier
])
def test_the_filesystem_of_a_path_is_its_deepest_mount(path: str, fstype: str) -> None:
    assert location.filesystem_type(Path(path), MOUNTINFO) == fstype


def test_special_filesystems_are_refused_and_tmpfs_is_not() -> None:
    for fstype in ("proc", "sysfs", "devtmpfs", "cgroup2", "debugfs", "securityfs"):
        with pytest.raises(InvalidArgument) as err:
            location.check_filesystem(Path("/x"), fstype)
        assert (err.value.reason, err.value.details["field"]) == ("special_filesystem", "path")
    for fstype in ("ext4", "xfs", "tmpfs", "nfs4", "overlay"):
        location.check_filesystem(Path("/x"), fstype)


@pytest.mark.parametrize("path", [
    "/", "/etc", "/etc/virtnode", "/usr", "/usr/lib/x", "/lib64/x", "/libx32", "/boot/efi",
    "/dev", "/dev/shm", "/proc/self", "/sys/kernel", "/run/virtnode", "/root/sd", "/var",
    "/var/lib", "/var/log/sd", "/home", "/tmp", "/var/tmp", "/state/sub",
])
def test_system_places_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        location.check_place(Path(path), own=[Path("/state")])
    assert (err.value.reason, err.value.details["field"]) == ("system_path", "path")


@pytest.mark.parametrize("path", [
    "/srv/sd", "/var/lib/images", "/home/user/sd", "/tmp/pytest-1/sd", "/var/tmp/x",
    "/mnt", "/mnt/data", "/library", "/etcetera", "/devices", "/statefull",
])
def test_other_places_are_fine(path: str) -> None:
    location.check_place(Path(path), own=[Path("/state")])


@pytest.mark.parametrize(("text", "reason"), [
    ("relative", "invalid_path"), ("/a/../etc", "invalid_path"), ("/a\0b", "invalid_path"),
    ("/" + "x" * 256, "path_too_long"), ("/a/" + "é" * 128, "path_too_long"),
    ("/" + "/".join(["d" * 255] * 16), "path_too_long"),
])
def test_paths_that_cannot_hold_a_domain_are_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        location.check_text(text)
    assert err.value.reason == reason


def test_a_long_path_with_room_for_the_layout_is_fine() -> None:
    location.check_text("/" + "x" * 255)
    location.check_text("/" + "/".join(["d" * 200] * 18))  # 3618 bytes

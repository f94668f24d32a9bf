"""The domain monitor on real files: ok, invalid, and a check that hangs (a leased file)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

from virtnode.config import StorageConfig
from virtnode.errors import InvalidArgument
from virtnode.storage import layout as lay
from virtnode.storage.domains.monitor import CheckResult, DomainMonitor, DomainState, check_domain
from virtnode.storage.domains.mounts import MountSpec, mount_points

SD = str(uuid.uuid4())


@pytest.fixture
def domain(tmp_path: Path) -> lay.DomainLayout:
    layout = lay.DomainLayout.of(tmp_path, SD)
    lay.format_domain(layout, lay.DomainMetadata.new(SD, "d", "localfs", SD, 512))
    return layout


def test_a_readable_domain_is_ok(domain: lay.DomainLayout) -> None:
    result = check_domain(domain, slow=10.0, mount_point=None)
    assert result.state is DomainState.OK and result.direct_io is True
    assert result.free_bytes is not None and result.total_bytes is not None
    assert 0 < result.free_bytes <= result.total_bytes


def test_damaged_or_missing_metadata(domain: lay.DomainLayout, tmp_path: Path) -> None:
    domain.metadata_path.write_text("{")
    assert check_domain(domain, 10.0, None).state is DomainState.INVALID
    domain.metadata_path.unlink()
    assert check_domain(domain, 10.0, None).state is DomainState.UNREACHABLE
    unmounted = check_domain(domain, 10.0, tmp_path)
    assert unmounted.state is DomainState.UNREACHABLE and "not mounted" in str(unmounted.error)


#: Holds a write lease on a file: another process's open() of it then blocks until the
#: lease is given up (or the kernel's lease-break-time passes), as a read of a hung storage
#: would. The holder gives it up when its stdin closes.
LEASE_HOLDER = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # told of each open that waits for it
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("holding", flush=True)
sys.stdin.read()
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
"""


async def test_a_hung_check_makes_only_that_domain_unreachable(
        domain: lay.DomainLayout) -> None:
    # A generous deadline: only the leased read hangs, the good read must pass under load.
    config = StorageConfig(monitor_interval=3600, monitor_timeout=5.0)
    changes: list[tuple[DomainState, DomainState]] = []

    def on_change(_sd: str, old: CheckResult, new: CheckResult) -> None:
        changes.append((old.state, new.state))

    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEASE_HOLDER, str(domain.metadata_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    monitor = DomainMonitor(domain, config, on_change)
    monitor._pool.start()
    try:
        assert await holder.stdout.readline() == b"holding\n"
        first = await monitor.check()
        assert first.state is DomainState.UNREACHABLE and "did not finish" in str(first.error)
        assert await monitor.check() is first  # not checked again while stuck
        holder.stdin.close()  # the lease goes, and the stuck open goes on
        assert await holder.wait() == 0
        assert monitor._pending is not None
        await asyncio.wait({monitor._pending}, timeout=5)  # the stuck call returns
        assert monitor._pending.done()
        assert (await monitor.check()).state is DomainState.OK
    finally:
        await monitor.close()
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    assert changes == [(DomainState.UNKNOWN, DomainState.UNREACHABLE),
                       (DomainState.UNREACHABLE, DomainState.OK)]


def test_a_fifo_in_place_of_the_metadata_is_invalid_without_waiting(
        domain: lay.DomainLayout) -> None:
    """A FIFO is not storage that hangs but a file no domain holds: refused at once."""
    domain.metadata_path.unlink()
    os.mkfifo(domain.metadata_path)
    result = check_domain(domain, 10.0, None)
    assert result.state is DomainState.INVALID and "regular file" in str(result.error)


def test_mount_spec_argv_forces_safe_options() -> None:
    spec = MountSpec.parse({"source": "/dev/loop7", "vfs_type": "ext4", "options": "noatime"})
    assert spec.argv(Path("/m")) == [
        "/bin/mount", "-t", "ext4", "-o", "noatime,nosuid,nodev,noexec",
        "--source", "/dev/loop7", "--target", "/m"]


@pytest.mark.parametrize("raw", [
    {"source": "-o", "vfs_type": "ext4"},
    {"source": "", "vfs_type": "ext4"},
    {"source": "/dev/x\n", "vfs_type": "ext4"},
    {"source": "/dev/x", "vfs_type": "-t"},
    {"source": "/dev/x", "vfs_type": "ext4", "options": "ro,,x"},
    {"source": "/dev/x", "vfs_type": "ext4", "options": "-x"},
    {"source": "/dev/x", "vfs_type": "ext4", "options": "a b"},
    "not an object",
])
def test_bad_mount_specs_are_refused(raw: object) -> None:
    with pytest.raises(InvalidArgument):
        MountSpec.parse(raw)


def test_mount_points_of_mountinfo() -> None:
    text = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
            "90 22 7:0 / /var/lib/with\\040space rw - ext4 /dev/loop0 rw\n")
    assert mount_points(text) == {"/", "/var/lib/with space"}

"""The domain monitor on real files: ok, invalid, and a check that hangs (a FIFO)."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from virtnode.config import StorageConfig
from virtnode.errors import InvalidArgument
from virtnode.storage import layout as lay
from virtnode.storage.monitor import CheckResult, DomainMonitor, DomainState, check_domain
from virtnode.storage.mounts import MountSpec, mount_points

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


async def test_a_hung_check_makes_only_that_domain_unreachable(
        domain: lay.DomainLayout) -> None:
    # A generous deadline: only the FIFO read hangs, the good read must pass under load.
    config = StorageConfig(monitor_interval=3600, monitor_timeout=5.0)
    changes: list[tuple[DomainState, DomainState]] = []

    def on_change(_sd: str, old: CheckResult, new: CheckResult) -> None:
        changes.append((old.state, new.state))

    good = domain.metadata_path.read_bytes()
    path = domain.metadata_path
    path.unlink()
    os.mkfifo(path)  # opening it for reading blocks until a writer comes: a hung read
    monitor = DomainMonitor(domain, config, on_change)
    monitor._pool.start()
    try:
        first = await monitor.check()
        assert first.state is DomainState.UNREACHABLE and "did not finish" in str(first.error)
        assert await monitor.check() is first  # not checked again while stuck
        # A writer releases the read. It stays open until the stuck call has returned:
        # the O_DIRECT open of a FIFO waits for a writer and then fails (EINVAL), and the
        # plain open that follows waits for a writer again.
        writer = await asyncio.to_thread(os.open, path, os.O_WRONLY)
        try:
            assert monitor._pending is not None
            await asyncio.wait({monitor._pending}, timeout=5)  # the stuck call returns
            assert monitor._pending.done()
        finally:
            os.close(writer)
        path.unlink()
        path.write_bytes(good)
        assert (await monitor.check()).state is DomainState.OK
    finally:
        await monitor.close()
    assert changes == [(DomainState.UNKNOWN, DomainState.UNREACHABLE),
                       (DomainState.UNREACHABLE, DomainState.OK)]


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

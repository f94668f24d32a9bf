"""The domain monitor: is each attached domain readable, how fast, how full.

Every ``storage.monitor_interval`` each domain's metadata file is read with direct I/O
(``O_DIRECT`` into a page-aligned buffer, so the page cache cannot answer for a storage
that has gone away), its free and total space read with ``statvfs`` and the metadata
parsed. A check runs in the domain's own daemon thread with a deadline
(``storage.monitor_timeout``): a filesystem that hangs holds that one thread, never the
event loop or another domain. A domain whose check is still stuck is ``unreachable``, and
it is not checked again until the stuck call returns.

States::

    unknown      not checked yet
    ok           metadata read and valid
    slow         as ok, but the read took longer than storage.monitor_slow
    unreachable  the read failed, missed its deadline, or the mount is gone
    invalid      the metadata was read but is not this domain's valid metadata
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from virtnode.config import StorageConfig
from virtnode.errors import ApiError
from virtnode.storage.domains import mounts
from virtnode.storage.layout import MAX_METADATA_BYTES, DomainLayout, DomainMetadata
from virtnode.util.aio import DaemonThreadPool
from virtnode.util.jsontypes import JsonObject

log = logging.getLogger(__name__)

#: Direct I/O needs buffers, offsets and lengths aligned to the logical block size; a page
#: covers 512 and 4096-byte sectors.
_ALIGN = mmap.PAGESIZE


class DomainState(StrEnum):
    UNKNOWN = "unknown"
    OK = "ok"
    SLOW = "slow"
    UNREACHABLE = "unreachable"
    INVALID = "invalid"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check (or the lack of one)."""

    state: DomainState
    checked: float | None = None
    read_latency: float | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    direct_io: bool | None = None
    error: str | None = None

    def to_api(self) -> JsonObject:
        return {
            "state": self.state.value,
            "checked": self.checked,
            "read_latency_seconds": self.read_latency,
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
            "direct_io": self.direct_io,
            "error": self.error,
        }


def direct_read(path: Path) -> tuple[bytes, bool]:
    """Read a small file bypassing the page cache; returns ``(data, direct)``.

    Filesystems without ``O_DIRECT`` (tmpfs answers ``EINVAL``) are read normally and say
    so with ``direct=False``. Raises ``OSError``.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd, direct = os.open(path, flags), False
    try:
        size = -(-(MAX_METADATA_BYTES + 1) // _ALIGN) * _ALIGN
        with mmap.mmap(-1, size) as buffer:  # anonymous maps are page-aligned
            count = os.preadv(fd, [buffer], 0)
            return bytes(buffer[:count]), direct
    finally:
        os.close(fd)


def check_domain(layout: DomainLayout, slow: float, mount_point: Path | None) -> CheckResult:
    """Check one domain now (blocking: runs in the domain's monitor thread)."""
    now = time.time()
    try:
        if mount_point is not None and not mounts.is_mounted(mount_point):
            return CheckResult(DomainState.UNREACHABLE, now, error=f"{mount_point} is not mounted")
        path = layout.metadata_path
        started = time.perf_counter()
        data, direct = direct_read(path)
        latency = time.perf_counter() - started
        fs = os.statvfs(layout.domain_dir)
    except OSError as exc:
        return CheckResult(DomainState.UNREACHABLE, now,
                           error=f"{exc.filename or layout.domain_dir}: {exc.strerror}")
    except ApiError as exc:  # an unsafe path
        return CheckResult(DomainState.INVALID, now, error=exc.message)
    free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    result = CheckResult(DomainState.SLOW if latency > slow else DomainState.OK, now,
                         round(latency, 6), free, total, direct)
    try:
        metadata = DomainMetadata.parse(data, str(path))
    except ApiError as exc:
        return replace(result, state=DomainState.INVALID, error=exc.message)
    if metadata.uuid != layout.sd_id:
        return replace(result, state=DomainState.INVALID,
                       error=f"{path} names domain {metadata.uuid}")
    return result


#: Told of every change of state: (sd_id, previous result, new result).
OnChange = Callable[[str, CheckResult, CheckResult], None]


class DomainMonitor:
    """Checks one domain periodically in its own daemon thread."""

    def __init__(self, layout: DomainLayout, config: StorageConfig, on_change: OnChange, *,
                 mount_point: Path | None = None) -> None:
        self.layout = layout
        self._config = config
        self._on_change = on_change
        self._mount_point = mount_point
        self.result = CheckResult(DomainState.UNKNOWN)
        self._pool = DaemonThreadPool(1, f"sd-monitor-{layout.sd_id[:8]}")
        self._pending: asyncio.Future[CheckResult] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def sd_id(self) -> str:
        return self.layout.sd_id

    def start(self) -> None:
        self._pool.start()
        self._task = asyncio.create_task(self._run(), name=f"sd-monitor-{self.sd_id}")

    async def close(self) -> None:
        """Stop checking. A check stuck in the kernel keeps its (daemon) thread until it
        returns; nothing waits for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._pool.shutdown(wait=False)

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._config.monitor_interval)

    async def check(self) -> CheckResult:
        """Check now (unless the last check is still stuck) and return the result."""
        if self._pending is not None and not self._pending.done():
            return self.result  # still stuck: unreachable until it returns
        future = asyncio.wrap_future(self._pool.submit(
            check_domain, self.layout, self._config.monitor_slow, self._mount_point))
        self._pending = future
        timeout = self._config.monitor_timeout
        try:
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(_consume)
            result = CheckResult(DomainState.UNREACHABLE, time.time(),
                                 error=f"check did not finish within {timeout:g}s")
        except Exception as exc:  # a bug in the check must not end the monitor
            log.exception("storage domain %s: check failed", self.sd_id)
            result = CheckResult(DomainState.UNREACHABLE, time.time(), error=str(exc))
        self._set(result)
        return result

    def _set(self, result: CheckResult) -> None:
        previous, self.result = self.result, result
        if previous.state != result.state:
            log.info("storage domain %s: %s -> %s%s", self.sd_id, previous.state.value,
                     result.state.value, f" ({result.error})" if result.error else "")
            self._on_change(self.sd_id, previous, result)


def _consume(future: asyncio.Future[CheckResult]) -> None:
    with contextlib.suppress(BaseException):
        future.result()


#: ``(sd_id, name, latest result)`` of every attached domain.
Results = Callable[[], Iterable[tuple[str, str, CheckResult]]]


class StorageCollector:
    """``/metrics`` families from the monitors' latest results (no I/O)."""

    def __init__(self, results: Results) -> None:
        self._results = results

    def collect(self) -> Iterator[Metric]:
        labels = ["sd_id", "sd_name"]
        state = GaugeMetricFamily("virtnode_storage_domain_state",
                                  "1 for the domain's current monitor state",
                                  labels=[*labels, "state"])
        latency = GaugeMetricFamily("virtnode_storage_domain_read_latency_seconds",
                                    "direct-I/O read of the domain metadata, last check",
                                    labels=labels)
        free = GaugeMetricFamily("virtnode_storage_domain_free_bytes",
                                 "space available to the agent on the domain", labels=labels)
        total = GaugeMetricFamily("virtnode_storage_domain_total_bytes",
                                  "size of the domain's filesystem", labels=labels)
        checked = GaugeMetricFamily("virtnode_storage_domain_last_check_timestamp_seconds",
                                    "when the domain was last checked", labels=labels)
        for sd_id, name, result in self._results():
            for each in DomainState:
                state.add_metric([sd_id, name, each.value], 1.0 if result.state is each else 0.0)
            if result.read_latency is not None:
                latency.add_metric([sd_id, name], result.read_latency)
            if result.free_bytes is not None and result.total_bytes is not None:
                free.add_metric([sd_id, name], result.free_bytes)
                total.add_metric([sd_id, name], result.total_bytes)
            if result.checked is not None:
                checked.add_metric([sd_id, name], result.checked)
        yield from (state, latency, free, total, checked)

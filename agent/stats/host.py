"""Host counters from psutil. Blocking (reads /proc): call it from a worker thread.

:func:`collect` returns raw, cumulative counters in plain dicts; rates are computed
from two of them by :mod:`virtnode.stats.rates`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import psutil

from virtnode.util.jsontypes import JsonObject


def _times(cpu: Any) -> dict[str, float]:
    return {key: float(value) for key, value in cpu._asdict().items()}


def _sum_times(cores: list[dict[str, float]]) -> dict[str, float]:
    """The whole host's CPU times: each mode's sum over the cores.

    Rounded to the microsecond, which drops the float noise of the sum and none of the
    clock ticks the times are counted in.
    """
    if not cores:
        return {}
    return {mode: round(sum(core[mode] for core in cores), 6) for mode in cores[0]}


def _filesystem(path: str) -> JsonObject | None:
    try:
        usage = psutil.disk_usage(path)
    except OSError:
        return None  # not mounted (yet) or gone: report nothing rather than fail the cycle
    return {
        "path": path,
        "total_bytes": usage.total,
        "used_bytes": usage.used,
        "free_bytes": usage.free,
        "percent": float(usage.percent),
    }


def collect(paths: Iterable[str] = ()) -> JsonObject:
    """Read the host's counters now; ``paths`` are the filesystems whose usage to report."""
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load1, load5, load15 = os.getloadavg()
    nics = psutil.net_io_counters(pernic=True)
    disks = psutil.disk_io_counters(perdisk=True) or {}
    # One read of /proc/stat: the total is summed from the cores rather than read again.
    cores = [_times(core) for core in psutil.cpu_times(percpu=True)]
    return {
        "time": time.time(),
        "monotonic": time.monotonic(),
        "cpu": _sum_times(cores),
        "cores": cores,
        "memory": {
            "total_bytes": memory.total,
            "available_bytes": memory.available,
            "used_bytes": memory.used,
            "free_bytes": memory.free,
            "percent": float(memory.percent),
        },
        "swap": {
            "total_bytes": swap.total,
            "used_bytes": swap.used,
            "free_bytes": swap.free,
            "percent": float(swap.percent),
        },
        "load": {"1m": load1, "5m": load5, "15m": load15},
        "nics": {
            name: {
                "rx_bytes": c.bytes_recv,
                "tx_bytes": c.bytes_sent,
                "rx_packets": c.packets_recv,
                "tx_packets": c.packets_sent,
                "rx_errors": c.errin,
                "tx_errors": c.errout,
                "rx_dropped": c.dropin,
                "tx_dropped": c.dropout,
            }
            for name, c in nics.items()
        },
        "disks": {
            name: {
                "read_bytes": c.read_bytes,
                "write_bytes": c.write_bytes,
                "reads": c.read_count,
                "writes": c.write_count,
                "read_time_ms": c.read_time,
                "write_time_ms": c.write_time,
            }
            for name, c in disks.items()
        },
        "filesystems": [fs for fs in map(_filesystem, paths) if fs is not None],
    }

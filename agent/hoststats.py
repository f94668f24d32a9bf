"""Host statistics from psutil. Blocking (reads /proc): call it from a worker thread."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

JsonObject = dict[str, Any]


def _busy_fraction(before: Any, after: Any) -> float:
    idle_fields = ("idle", "iowait")
    total = sum(after) - (sum(before) if before is not None else 0.0)
    idle = sum(getattr(after, f, 0.0) for f in idle_fields) - (
        sum(getattr(before, f, 0.0) for f in idle_fields) if before is not None else 0.0
    )
    return 0.0 if total <= 0 else max(0.0, min(1.0, 1.0 - idle / total))


def collect(previous_cpu_times: Any = None) -> tuple[JsonObject, Any]:
    """Return host statistics and the CPU times to pass in next time.

    CPU percent is measured since ``previous_cpu_times`` (since boot on the first call).
    """
    cpu_times = psutil.cpu_times()
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load1, load5, load15 = os.getloadavg()
    nics = psutil.net_io_counters(pernic=True)
    disks = psutil.disk_io_counters(perdisk=True) or {}
    stats: JsonObject = {
        "time": time.time(),
        "cpu": {
            "count": psutil.cpu_count() or 1,
            "percent": round(100.0 * _busy_fraction(previous_cpu_times, cpu_times), 2),
            "times_seconds": {k: float(v) for k, v in cpu_times._asdict().items()},
        },
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
        "nics": [
            {
                "name": name,
                "rx_bytes": c.bytes_recv,
                "tx_bytes": c.bytes_sent,
                "rx_packets": c.packets_recv,
                "tx_packets": c.packets_sent,
                "rx_errors": c.errin,
                "tx_errors": c.errout,
                "rx_dropped": c.dropin,
                "tx_dropped": c.dropout,
            }
            for name, c in sorted(nics.items())
        ],
        "disks": [
            {
                "name": name,
                "read_bytes": c.read_bytes,
                "write_bytes": c.write_bytes,
                "reads": c.read_count,
                "writes": c.write_count,
                "read_time_ms": c.read_time,
                "write_time_ms": c.write_time,
            }
            for name, c in sorted(disks.items())
        ],
    }
    return stats, cpu_times

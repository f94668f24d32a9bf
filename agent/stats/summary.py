"""The compact forms of host and VM statistics: the ``stats.host`` and ``stats.vm`` events.

Pure functions on the API's shapes (``Host.getStats``, ``VM.getStats``); the sampler builds
its events with them and the client's tables read results with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from virtnode.util.jsontypes import JsonObject

Counters = Mapping[str, Any]


def _total(items: Iterable[Counters], field: str) -> float | None:
    values = [item[field] for item in items if item.get(field) is not None]
    return round(sum(values), 2) if values else None


def host_summary(stats: Counters) -> JsonObject:
    """The compact form of host stats: the ``stats.host`` event and one history sample.

    Network totals leave out loopback, which moves no guest or host traffic that matters.
    """
    nics = [nic for nic in stats["nics"] if nic["name"] != "lo"]
    return {
        "time": stats["time"],
        "cpu_percent": stats["cpu"]["percent"],
        "memory_used_bytes": stats["memory"]["used_bytes"],
        "memory_available_bytes": stats["memory"]["available_bytes"],
        "swap_used_bytes": stats["swap"]["used_bytes"],
        "load_1m": round(stats["load"]["1m"], 2),
        "net_rx_bytes_per_second": _total(nics, "rx_bytes_per_second"),
        "net_tx_bytes_per_second": _total(nics, "tx_bytes_per_second"),
        "disk_read_bytes_per_second": _total(stats["disks"], "read_bytes_per_second"),
        "disk_write_bytes_per_second": _total(stats["disks"], "write_bytes_per_second"),
    }


def vm_summary(stats: Counters) -> JsonObject:
    """The compact form of one VM's stats in the ``stats.vm`` event."""
    return {
        "vm_id": stats["vm_id"],
        "name": stats["name"],
        "state": stats["state"],
        "cpu_percent": stats["cpu"]["percent"],
        "memory_used_bytes": stats["memory"]["used_bytes"],
        "disk_read_bytes_per_second": _total(stats["disks"], "read_bytes_per_second"),
        "disk_write_bytes_per_second": _total(stats["disks"], "write_bytes_per_second"),
        "net_rx_bytes_per_second": _total(stats["nics"], "rx_bytes_per_second"),
        "net_tx_bytes_per_second": _total(stats["nics"], "tx_bytes_per_second"),
        "stale_seconds": stats["stale_seconds"],
    }

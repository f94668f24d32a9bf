"""Statistics from counters: rates, percentages and the API's shapes. Pure functions.

Counters come from two samples of the same object; a rate is the difference divided by
the seconds between them. A rate is ``None`` while there is no earlier sample, and when a
counter went backwards (a restarted VM, a re-created device): no number beats a wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from virtnode.util.jsontypes import JsonObject
from virtnode.vm.state import vm_state

Counters = Mapping[str, Any]

_NS = 1e9
_IDLE = ("idle", "iowait")
_NIC_FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors",
               "rx_dropped", "tx_dropped")
_NIC_RATES = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
# libvirt's net.N.* suffixes and ours.
_NIC_KEYS = {"rx.bytes": "rx_bytes", "tx.bytes": "tx_bytes", "rx.pkts": "rx_packets",
             "tx.pkts": "tx_packets", "rx.errs": "rx_errors", "tx.errs": "tx_errors",
             "rx.drop": "rx_dropped", "tx.drop": "tx_dropped"}
# Disk counters and the names of their rates, the same for host and VM disks.
_DISK_RATES = (("read_bytes", "read_bytes_per_second"), ("write_bytes", "write_bytes_per_second"),
               ("reads", "read_ops_per_second"), ("writes", "write_ops_per_second"))
_BLOCK_KEYS = {"rd.bytes": "read_bytes", "wr.bytes": "write_bytes", "rd.reqs": "reads",
               "wr.reqs": "writes", "rd.times": "read_time_ns", "wr.times": "write_time_ns",
               "fl.reqs": "flushes", "fl.times": "flush_time_ns", "capacity": "capacity_bytes",
               "allocation": "allocation_bytes", "physical": "physical_bytes"}
_BALLOON_KIB = {"current": "balloon_bytes", "maximum": "maximum_bytes", "rss": "rss_bytes",
                "available": "available_bytes", "unused": "unused_bytes",
                "usable": "usable_bytes"}


def rate(before: float | None, after: float | None, seconds: float) -> float | None:
    """``(after - before) / seconds``; None without both values, time, or on a reset."""
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def cpu_shares(before: Counters | None, after: Counters) -> JsonObject:
    """Busy, user and system percent of one CPU between two psutil times dicts."""
    if before is None:
        return {"percent": None, "user_percent": None, "system_percent": None}
    total = sum(after.values()) - sum(before.values())
    if total <= 0:
        return {"percent": 0.0, "user_percent": 0.0, "system_percent": 0.0}
    idle = sum(after.get(f, 0.0) - before.get(f, 0.0) for f in _IDLE)

    def share(part: float) -> float:
        return round(max(0.0, min(100.0, 100.0 * part / total)), 2)

    return {
        "percent": share(total - idle),
        "user_percent": share(after.get("user", 0.0) - before.get("user", 0.0)),
        "system_percent": share(after.get("system", 0.0) - before.get("system", 0.0)),
    }


def _with_rates(before: Counters | None, after: Counters, fields: Iterable[str],
                seconds: float, suffix: str) -> JsonObject:
    out = dict(after)
    for name in fields:
        previous = None if before is None else before.get(name)
        out[f"{name}{suffix}"] = _round(rate(previous, after.get(name), seconds))
    return out


def _disk_rates(before: Counters | None, after: Counters, seconds: float) -> JsonObject:
    return {out: _round(rate(before.get(field) if before else None, after.get(field), seconds))
            for field, out in _DISK_RATES}


def host_stats(before: Counters | None, after: Counters) -> JsonObject:
    """The ``Host.getStats`` result from two samples of :func:`hoststats.collect`."""
    seconds = after["monotonic"] - before["monotonic"] if before is not None else 0.0
    cores_before = before["cores"] if before is not None else []
    cores = []
    for i, core in enumerate(after["cores"]):
        share = cpu_shares(cores_before[i] if i < len(cores_before) else None, core)
        cores.append({"id": i, "percent": share["percent"]})
    nics = []
    for name in sorted(after["nics"]):
        old = before["nics"].get(name) if before is not None else None
        nic = _with_rates(old, after["nics"][name], _NIC_RATES, seconds, "_per_second")
        nics.append({"name": name, **nic})
    disks = []
    for name in sorted(after["disks"]):
        old = before["disks"].get(name) if before is not None else None
        disk = after["disks"][name]
        disks.append({"name": name, **disk, **_disk_rates(old, disk, seconds)})
    return {
        "time": after["time"],
        "interval_seconds": round(seconds, 3) if before is not None else None,
        "cpu": {
            "count": len(after["cores"]) or 1,
            **cpu_shares(before["cpu"] if before is not None else None, after["cpu"]),
            "cores": cores,
            "times_seconds": dict(after["cpu"]),
        },
        "memory": dict(after["memory"]),
        "swap": dict(after["swap"]),
        "load": dict(after["load"]),
        "nics": nics,
        "disks": disks,
        "filesystems": list(after["filesystems"]),
    }


def downsample(samples: Sequence[Counters], resolution: float) -> list[JsonObject]:
    """Average consecutive samples into buckets of ``resolution`` seconds.

    Each bucket's time is that of its last sample; a field that is None in every sample
    of a bucket stays None. Integer byte counts stay integers.
    """
    buckets: dict[int, list[Counters]] = {}
    for sample in samples:
        buckets.setdefault(math.floor(sample["time"] / resolution), []).append(sample)
    out = []
    for group in buckets.values():
        merged: JsonObject = {"time": group[-1]["time"]}
        for key in group[-1]:
            if key == "time":
                continue
            values = [s[key] for s in group if s.get(key) is not None]
            if not values:
                merged[key] = None
            elif all(isinstance(v, int) for v in values):
                merged[key] = sum(values) // len(values)
            else:
                merged[key] = round(sum(values) / len(values), 2)
        out.append(merged)
    return out


# --- VMs ----------------------------------------------------------------------------------


def _indexed(record: Counters, prefix: str) -> dict[int, dict[str, Any]]:
    """Group ``prefix.N.key`` entries of a libvirt stats record by N."""
    groups: dict[int, dict[str, Any]] = {}
    for key, value in record.items():
        if not key.startswith(prefix):
            continue
        index, _, rest = key[len(prefix):].partition(".")
        if index.isdigit() and rest:
            groups.setdefault(int(index), {})[rest] = value
    return groups


def parse_domain(record: Counters) -> JsonObject:
    """Turn one libvirt ``getAllDomainStats`` record into nested counters.

    Devices are keyed by name (``vda``, ``vnet3``), so samples pair up even when libvirt
    numbers them differently. Balloon figures are converted from KiB to bytes.
    """
    vcpus = {
        i: {"state": int(v.get("state", 0)), "time_ns": v.get("time")}
        for i, v in _indexed(record, "vcpu.").items()
    }
    disks: dict[str, JsonObject] = {}
    for v in _indexed(record, "block.").values():
        if "name" in v:
            disk = {ours: v[theirs] for theirs, ours in _BLOCK_KEYS.items() if theirs in v}
            disk["path"] = str(v.get("path", ""))
            disks[str(v["name"])] = disk
    nics: dict[str, JsonObject] = {}
    for v in _indexed(record, "net.").values():
        if "name" in v:
            nic = {ours: v[theirs] for theirs, ours in _NIC_KEYS.items() if theirs in v}
            nic["bridge"] = str(v.get("bridge", ""))  # added by domstats
            nics[str(v["name"])] = nic
    memory = {
        ours: int(record[f"balloon.{theirs}"]) * 1024
        for theirs, ours in _BALLOON_KIB.items() if f"balloon.{theirs}" in record
    }
    return {
        "state": vm_state(record.get("state.state", 0), record.get("state.reason", 0)),
        "cpu_ns": record.get("cpu.time"),
        "user_ns": record.get("cpu.user"),
        "system_ns": record.get("cpu.system"),
        "vcpu_count": int(record.get("vcpu.current", len(vcpus))),
        "vcpus": vcpus,
        "memory": memory,
        "disks": disks,
        "nics": nics,
    }


def _percent(before: float | None, after: float | None, seconds: float,
             cpus: int) -> float | None:
    ns = rate(before, after, seconds)
    return None if ns is None else round(min(100.0, 100.0 * ns / _NS / max(cpus, 1)), 2)


def _memory(counters: Counters) -> JsonObject:
    memory = {key: counters.get(key) for key in _BALLOON_KIB.values()}
    # The guest's own view when its balloon driver reports one; the host's otherwise.
    available, unused = memory["available_bytes"], memory["unused_bytes"]
    if available is not None and unused is not None:
        used = max(0, available - unused)
    else:
        used = memory["rss_bytes"] if memory["rss_bytes"] is not None else (
            memory["balloon_bytes"] or 0)
    return {**memory, "used_bytes": used}


def _latency(before: Counters | None, after: Counters, time_key: str,
             ops_key: str) -> float | None:
    if before is None:
        return None
    ops = rate(before.get(ops_key), after.get(ops_key), 1.0)
    spent = rate(before.get(time_key), after.get(time_key), 1.0)
    if ops is None or spent is None:
        return None
    return round(spent / ops / _NS, 6) if ops else 0.0


def _disk(name: str, before: Counters | None, after: Counters, seconds: float) -> JsonObject:
    return {
        "name": name,
        "path": after.get("path", ""),
        **{key: after.get(key, 0) for key in ("read_bytes", "write_bytes", "reads", "writes")},
        **_disk_rates(before, after, seconds),
        "read_latency_seconds": _latency(before, after, "read_time_ns", "reads"),
        "write_latency_seconds": _latency(before, after, "write_time_ns", "writes"),
        "capacity_bytes": after.get("capacity_bytes"),
        "allocation_bytes": after.get("allocation_bytes"),
    }


def _nic(name: str, before: Counters | None, after: Counters, seconds: float) -> JsonObject:
    counters = {key: after.get(key, 0) for key in _NIC_FIELDS}
    return {"name": name, **_with_rates(before, counters, _NIC_RATES, seconds, "_per_second")}


def _seconds(ns: float | None) -> float:
    return 0.0 if ns is None else round(ns / _NS, 3)


def vm_stats(vm_id: str, name: str, before: Counters | None, after: Counters, *,
             seconds: float, time: float) -> JsonObject:
    """One VM's entry of ``VM.getStats`` from two :func:`parse_domain` results.

    CPU percentages are of the VM's vCPUs (100 is every vCPU busy); a vCPU's is of one.
    """
    vcpus = after["vcpu_count"]

    def prev(key: str) -> Any:
        return None if before is None else before.get(key)

    old_vcpus = prev("vcpus") or {}
    old_disks = prev("disks") or {}
    old_nics = prev("nics") or {}
    return {
        "vm_id": vm_id,
        "name": name,
        "state": after["state"],
        "time": time,
        "interval_seconds": round(seconds, 3) if before is not None else None,
        "stale_seconds": 0.0,
        "cpu": {
            "percent": _percent(prev("cpu_ns"), after["cpu_ns"], seconds, vcpus),
            "user_percent": _percent(prev("user_ns"), after["user_ns"], seconds, vcpus),
            "system_percent": _percent(prev("system_ns"), after["system_ns"], seconds, vcpus),
            "time_seconds": _seconds(after["cpu_ns"]),
            "user_seconds": _seconds(after["user_ns"]),
            "system_seconds": _seconds(after["system_ns"]),
        },
        "memory": _memory(after["memory"]),
        "vcpus": [
            {
                "id": i,
                "state": v["state"],
                "time_seconds": _seconds(v["time_ns"]),
                "percent": _percent((old_vcpus.get(i) or {}).get("time_ns"), v["time_ns"],
                                    seconds, 1),
            }
            for i, v in sorted(after["vcpus"].items())
        ],
        "disks": [_disk(n, old_disks.get(n), d, seconds)
                  for n, d in sorted(after["disks"].items())],
        "nics": [_nic(n, old_nics.get(n), c, seconds) for n, c in sorted(after["nics"].items())],
    }

"""Plain-text tables of host and VM statistics for ``virtnode stats``. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

from virtnode.stats.summary import vm_summary
from virtnode.util.jsontypes import JsonObject

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value: float | None, suffix: str = "") -> str:
    """``1536`` -> ``1.5 KiB``; ``-`` for an unknown value."""
    if value is None:
        return "-"
    amount = float(value)
    for unit in _UNITS:
        if abs(amount) < 1024 or unit == _UNITS[-1]:
            text = f"{amount:.0f}" if unit == "B" else f"{amount:.1f}"
            return f"{text} {unit}{suffix}"
        amount /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; numbers are given as text."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


def host_table(host: JsonObject) -> str:
    """A summary line of the host, then its NICs and disks with their rates."""
    cpu, memory, swap, load = host["cpu"], host["memory"], host["swap"], host["load"]
    head = (f"host  cpu {_percent(cpu['percent'])} of {cpu['count']}  "
            f"memory {human_bytes(memory['used_bytes'])} used, "
            f"{human_bytes(memory['available_bytes'])} available of "
            f"{human_bytes(memory['total_bytes'])}  "
            f"swap {human_bytes(swap['used_bytes'])}  "
            f"load {load['1m']:.2f} {load['5m']:.2f} {load['15m']:.2f}")
    nics = table(("NIC", "RX", "TX", "RX PKT/S", "TX PKT/S", "ERRORS", "DROPS"), [
        (n["name"], human_bytes(n["rx_bytes_per_second"], "/s"),
         human_bytes(n["tx_bytes_per_second"], "/s"),
         _number(n["rx_packets_per_second"]), _number(n["tx_packets_per_second"]),
         str(n["rx_errors"] + n["tx_errors"]), str(n["rx_dropped"] + n["tx_dropped"]))
        for n in host["nics"]
    ])
    disks = table(("DISK", "READ", "WRITE", "READ OPS/S", "WRITE OPS/S"), [
        (d["name"], human_bytes(d["read_bytes_per_second"], "/s"),
         human_bytes(d["write_bytes_per_second"], "/s"),
         _number(d["read_ops_per_second"]), _number(d["write_ops_per_second"]))
        for d in host["disks"]
    ])
    filesystems = table(("FILESYSTEM", "USED", "FREE", "USE"), [
        (f["path"], human_bytes(f["used_bytes"]), human_bytes(f["free_bytes"]),
         _percent(f["percent"]))
        for f in host["filesystems"]
    ])
    return "\n\n".join((head, nics, disks, filesystems))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def vm_table(vms: Sequence[JsonObject]) -> str:
    """One line per VM: CPU, memory, disk and network rates, and staleness."""
    rows = []
    for vm in vms:
        summary = vm_summary(vm)
        stale = summary["stale_seconds"]
        rows.append((
            summary["name"], summary["state"], _percent(summary["cpu_percent"]),
            human_bytes(summary["memory_used_bytes"]),
            human_bytes(summary["disk_read_bytes_per_second"], "/s"),
            human_bytes(summary["disk_write_bytes_per_second"], "/s"),
            human_bytes(summary["net_rx_bytes_per_second"], "/s"),
            human_bytes(summary["net_tx_bytes_per_second"], "/s"),
            f"stale {stale:.0f}s" if stale else "",
        ))
    if not rows:
        return "no running VMs sampled"
    return table(("VM", "STATE", "CPU", "MEMORY", "DISK READ", "DISK WRITE", "NET RX", "NET TX",
                  ""), rows)

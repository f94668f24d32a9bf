"""Rates and shapes from fabricated counters: no libvirt, no /proc."""

from __future__ import annotations

from typing import Any

import pytest

from virtnode.stats.metrics import RequestMetrics
from virtnode.stats.rates import (
    cpu_shares,
    downsample,
    host_stats,
    parse_domain,
    rate,
    vm_stats,
)
from virtnode.stats.summary import vm_summary


def test_rate_needs_two_values_time_and_no_reset() -> None:
    assert rate(100, 300, 2.0) == 100.0
    assert rate(None, 300, 2.0) is None
    assert rate(100, 300, 0.0) is None
    assert rate(300, 100, 2.0) is None  # the counter was reset


def test_cpu_shares_of_one_cpu() -> None:
    before = {"user": 10.0, "system": 5.0, "idle": 80.0, "iowait": 5.0}
    after = {"user": 13.0, "system": 6.0, "idle": 85.0, "iowait": 6.0}
    assert cpu_shares(before, after) == {"percent": 40.0, "user_percent": 30.0,
                                         "system_percent": 10.0}
    assert cpu_shares(None, after)["percent"] is None


def host_sample(t: float, rx: int, written: int) -> dict[str, Any]:
    times = {"user": t, "system": 0.0, "idle": t, "iowait": 0.0}
    return {
        "time": 1000.0 + t, "monotonic": t, "cpu": times, "cores": [times],
        "memory": {"total_bytes": 8, "available_bytes": 4, "used_bytes": 4, "free_bytes": 4,
                   "percent": 50.0},
        "swap": {"total_bytes": 0, "used_bytes": 0, "free_bytes": 0, "percent": 0.0},
        "load": {"1m": 1.0, "5m": 1.0, "15m": 1.0},
        "nics": {"eth0": {"rx_bytes": rx, "tx_bytes": 0, "rx_packets": rx // 100,
                          "tx_packets": 0, "rx_errors": 0, "tx_errors": 0, "rx_dropped": 0,
                          "tx_dropped": 0}},
        "disks": {"vda": {"read_bytes": 0, "write_bytes": written, "reads": 0,
                          "writes": written // 4096, "read_time_ms": 0, "write_time_ms": 0}},
        "filesystems": [],
    }


def test_host_rates_between_samples() -> None:
    first = host_stats(None, host_sample(0.0, 0, 0))
    assert first["interval_seconds"] is None and first["nics"][0]["rx_bytes_per_second"] is None
    stats = host_stats(host_sample(0.0, 0, 0), host_sample(2.0, 2000, 8192))
    assert stats["cpu"]["percent"] == 50.0 and stats["cpu"]["cores"][0]["percent"] == 50.0
    nic = stats["nics"][0]
    assert nic["rx_bytes_per_second"] == 1000.0 and nic["rx_packets_per_second"] == 10.0
    disk = stats["disks"][0]
    assert disk["write_bytes_per_second"] == 4096.0 and disk["write_ops_per_second"] == 1.0


def domain(cpu_s: float, written: int, writes: int, write_ns: int, rx: int) -> dict[str, Any]:
    return {
        "state.state": 1, "state.reason": 1,
        "cpu.time": int(cpu_s * 1e9), "cpu.user": int(cpu_s * 1e9 / 2),
        "cpu.system": int(cpu_s * 1e9 / 2),
        "balloon.current": 1024, "balloon.maximum": 2048, "balloon.rss": 512,
        "vcpu.current": 2, "vcpu.maximum": 2,
        "vcpu.0.state": 1, "vcpu.0.time": int(cpu_s * 1e9),
        "vcpu.1.state": 1, "vcpu.1.time": 0,
        "block.count": 1, "block.0.name": "vda", "block.0.path": "/img/a.qcow2",
        "block.0.rd.reqs": 0, "block.0.rd.bytes": 0, "block.0.rd.times": 0,
        "block.0.wr.reqs": writes, "block.0.wr.bytes": written, "block.0.wr.times": write_ns,
        "block.0.capacity": 1 << 30,
        "net.count": 1, "net.0.name": "vnet0", "net.0.rx.bytes": rx, "net.0.rx.pkts": rx // 100,
        "net.0.rx.errs": 0, "net.0.rx.drop": 1, "net.0.tx.bytes": 0, "net.0.tx.pkts": 0,
        "net.0.tx.errs": 0, "net.0.tx.drop": 0,
    }


VM = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def test_vm_rates_between_samples() -> None:
    before = parse_domain(domain(10.0, 0, 0, 0, 0))
    after = parse_domain(domain(12.0, 1 << 20, 10, 50_000_000, 5000))
    stats = vm_stats(VM, "a", before, after, seconds=2.0, time=5.0)
    assert stats["cpu"]["percent"] == 50.0, "one of two vCPUs busy"
    assert stats["cpu"]["user_percent"] == 25.0
    assert [v["percent"] for v in stats["vcpus"]] == [100.0, 0.0]
    (disk,) = stats["disks"]
    assert disk["write_bytes_per_second"] == 524288.0 and disk["write_ops_per_second"] == 5.0
    assert disk["write_latency_seconds"] == 0.005 and disk["read_latency_seconds"] == 0.0
    assert disk["capacity_bytes"] == 1 << 30 and disk["path"] == "/img/a.qcow2"
    (nic,) = stats["nics"]
    assert nic["rx_bytes_per_second"] == 2500.0 and nic["rx_dropped"] == 1
    assert stats["memory"]["used_bytes"] == 512 * 1024, "host RSS without guest figures"
    summary = vm_summary(stats)
    assert summary["disk_write_bytes_per_second"] == 524288.0
    assert summary["net_tx_bytes_per_second"] == 0.0


def test_vm_first_sample_and_reset_give_no_rates() -> None:
    counters = parse_domain(domain(12.0, 100, 1, 10, 0))
    first = vm_stats(VM, "a", None, counters, seconds=0.0, time=1.0)
    assert first["cpu"]["percent"] is None and first["interval_seconds"] is None
    restarted = parse_domain(domain(1.0, 0, 0, 0, 0))
    again = vm_stats(VM, "a", counters, restarted, seconds=10.0, time=2.0)
    assert again["cpu"]["percent"] is None
    assert again["disks"][0]["write_bytes_per_second"] is None


def test_guest_memory_view_wins_when_reported() -> None:
    record = {**domain(1.0, 0, 0, 0, 0), "balloon.available": 1000, "balloon.unused": 400}
    stats = vm_stats(VM, "a", None, parse_domain(record), seconds=0.0, time=1.0)
    assert stats["memory"]["used_bytes"] == 600 * 1024


def test_test_driver_records_have_only_state() -> None:
    stats = vm_stats(VM, "t", None, parse_domain({"state.state": 1, "state.reason": 0}),
                     seconds=0.0, time=1.0)
    assert stats["state"] == "running" and stats["disks"] == [] and stats["vcpus"] == []
    assert stats["memory"]["used_bytes"] == 0


def test_downsample_averages_buckets() -> None:
    samples = [{"time": 0.0, "a": 1, "b": None}, {"time": 5.0, "a": 3, "b": 2.0},
               {"time": 10.0, "a": 5, "b": None}]
    assert downsample(samples, 10) == [{"time": 5.0, "a": 2, "b": 2.0},
                                       {"time": 10.0, "a": 5, "b": None}]


@pytest.mark.parametrize("method", ["Host.ping", "Made.up"])
def test_request_metrics_bound_their_labels(method: str) -> None:
    metrics = RequestMetrics(["Host.ping"])
    metrics.observe(method, "ok", 0.0007)
    metrics.observe(method, "ok", 100.0)
    label = method if method == "Host.ping" else "other"
    assert metrics.counts == {(label, "ok"): 2}
    assert metrics.buckets[label][1] == 1, "0.0007 s is under the 1 ms bound"
    assert metrics.buckets[label][-1] == 1


def test_nic_counters_carry_the_bridge_the_sampler_read() -> None:
    record = {**domain(1.0, 0, 0, 0, 0), "net.0.bridge": "br0"}
    assert parse_domain(record)["nics"]["vnet0"]["bridge"] == "br0"
    assert parse_domain(domain(1.0, 0, 0, 0, 0))["nics"]["vnet0"]["bridge"] == ""
    stats = vm_stats(VM, "a", None, parse_domain(record), seconds=0.0, time=1.0)
    assert "bridge" not in stats["nics"][0], "VM.getStats NICs stay as they were"

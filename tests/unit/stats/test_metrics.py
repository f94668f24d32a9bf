"""The agent's Prometheus text writer against prometheus-client's parser and writer."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from virtnode.stats.metrics import render_text


class Families:
    def collect(self):  # type: ignore[no-untyped-def]
        counter = CounterMetricFamily("virtnode_vm_disk_read_bytes_total",
                                      'Bytes read.\nWith "quotes" and a \\ backslash.',
                                      labels=["vm_id", "vm_name", "device"])
        counter.add_metric(["id-1", 'we"ird\\name\nx', "vda"], 1.5e9)
        counter.add_metric(["id-2", "plain", "vdb"], 0)
        yield counter
        gauge = GaugeMetricFamily("virtnode_vm_stale_seconds", "Age.", labels=["vm_id"])
        for value in (0.25, float("nan"), float("inf"), -float("inf"), 12345678901234.0):
            gauge.add_metric([f"v{value}"], value)
        yield gauge
        hist = HistogramMetricFamily("virtnode_rpc_request_duration_seconds", "Time.",
                                     labels=["method"])
        hist.add_metric(["Host.ping"], [("0.001", 3), ("+Inf", 4)], 0.0042)
        yield hist
        plain = GaugeMetricFamily("virtnode_hypervisor_connected", "Up.")
        plain.add_metric([], 1)
        yield plain


def parsed(text: str) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], str]]]]:
    return [(f.name, f.type, f.documentation,
             [(s.name, s.labels, repr(s.value)) for s in f.samples])
            for f in text_string_to_metric_families(text)]


def test_same_families_and_samples_as_prometheus_client_writes() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    ours = render_text(registry.collect()).decode()
    theirs = generate_latest(registry).decode()
    assert parsed(ours) == parsed(theirs)
    assert 'vm_name="we\\"ird\\\\name\\nx"' in ours
    assert "# TYPE virtnode_vm_disk_read_bytes_total counter" in ours


def test_versioned_collectors_are_written_again_only_when_their_version_changes() -> None:
    from virtnode.stats.metrics import Metrics

    class Counting:
        calls = 0
        value = 1.0

        def collect(self):  # type: ignore[no-untyped-def]
            Counting.calls += 1
            gauge = GaugeMetricFamily("virtnode_test_value", "A value.")
            gauge.add_metric([], Counting.value)
            yield gauge

    version = [1]
    metrics = Metrics([])
    metrics.add_collector(Counting(), version=lambda: version[0])
    first = metrics.render()
    Counting.value = 2.0
    assert metrics.render() == first  # same cycle: the text written before
    assert Counting.calls == 1
    version[0] = 2
    assert b"virtnode_test_value 2.0" in metrics.render()
    assert Counting.calls == 2

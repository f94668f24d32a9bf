"""Prometheus metrics: ``GET /metrics`` from the sampler's cache and the agent's counters.

Nothing here calls libvirt: the collectors turn what the statistics sampler already holds
into metric families when a scrape comes in (the only read is of /proc/self, for the
agent's own process_* metrics). The text is written
by :func:`render_text`, not prometheus-client's writer, which took three quarters of a
scrape. Names start with ``virtnode_``,
values are in base units (bytes, seconds), counters end in ``_total``; VM series carry
``vm_id`` and ``vm_name``. Each :class:`Metrics` owns its registry (no global state).

Other services add their own families with :meth:`Metrics.add_collector`: any object
with a ``collect()`` method returning prometheus-client metric families.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from virtnode import __version__
from virtnode.events.bus import EventBus
from virtnode.events.event import Event
from virtnode.stats.sampler import StatsSampler
from virtnode.util.jsontypes import JsonObject

#: Upper bounds of the request duration histogram, seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)
_OTHER = "other"
_VM = ("vm_id", "vm_name")


class RequestMetrics:
    """Counts requests by method and outcome, and their durations; cheap enough per call.

    Only methods of the schema become labels: a client inventing method names cannot
    grow the series without bound.
    """

    def __init__(self, methods: Iterable[str]) -> None:
        self._methods = frozenset(methods)
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        if method not in self._methods:
            method = _OTHER
        key = (method, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        buckets = self.buckets.get(method)
        if buckets is None:
            buckets = self.buckets[method] = [0] * (len(DURATION_BUCKETS) + 1)
            self.sums[method] = 0.0
        buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sums[method] += seconds


class EventCounter:
    """Counts the events published on a bus, by topic."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def attach(self, bus: EventBus) -> Callable[[], None]:
        return bus.subscribe(["*"], self._count)

    def _count(self, event: Event) -> None:
        self.counts[event.topic] = self.counts.get(event.topic, 0) + 1


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class ServicesCollector:
    """Event subscriptions, jobs by state and uplinks, from counts the services keep."""

    def __init__(self, subscribers: Callable[[], int],
                 jobs: Callable[[], dict[str, int]],
                 uplinks: Callable[[], list[tuple[str, bool]]]) -> None:
        self._subscribers = subscribers
        self._jobs = jobs
        self._uplinks = uplinks

    def collect(self) -> Iterator[Metric]:
        subs = _gauge("virtnode_event_subscriptions",
                      "Event subscriptions open on WebSocket connections and uplinks.")
        subs.add_metric([], self._subscribers())
        yield subs
        jobs = _gauge("virtnode_jobs", "Jobs the agent holds, by state.", ["state"])
        for state, count in sorted(self._jobs().items()):
            jobs.add_metric([state], count)
        yield jobs
        links = _gauge("virtnode_uplink_connected",
                       "1 while the uplink is connected (URL without query or credentials).",
                       ["uplink"])
        for where, up in self._uplinks():
            links.add_metric([where], 1 if up else 0)
        yield links


class AgentCollector:
    """The agent's own metrics: requests, events, sampling cycles, the hypervisor link."""

    def __init__(self, requests: RequestMetrics, events: EventCounter, sampler: StatsSampler,
                 connected: Callable[[], bool]) -> None:
        self._requests = requests
        self._events = events
        self._sampler = sampler
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        info = _gauge("virtnode_agent_info", "The agent's version.", ["version"])
        info.add_metric([__version__], 1)
        yield info
        up = _gauge("virtnode_hypervisor_connected", "1 while the agent is connected to libvirt.")
        up.add_metric([], 1 if self._connected() else 0)
        yield up
        yield from self._rpc()
        events = _counter("virtnode_events_published_total", "Events published, by topic.",
                          ["topic"])
        for topic, count in sorted(self._events.counts.items()):
            events.add_metric([topic], count)
        yield events
        yield from self._cycles()

    def _rpc(self) -> Iterator[Metric]:
        requests = _counter("virtnode_rpc_requests_total",
                            "API requests answered, by method and outcome (ok or the error).",
                            ["method", "outcome"])
        for (method, outcome), count in sorted(self._requests.counts.items()):
            requests.add_metric([method, outcome], count)
        yield requests
        duration = HistogramMetricFamily("virtnode_rpc_request_duration_seconds",
                                         "Time to answer an API request, by method.",
                                         labels=["method"])
        for method, counts in sorted(self._requests.buckets.items()):
            cumulative, total = [], 0
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
                total += count
                cumulative.append((_le(bound), total))
            duration.add_metric([method], cumulative, self._requests.sums[method])
        yield duration

    def _cycles(self) -> Iterator[Metric]:
        cycle = SummaryMetricFamily("virtnode_stats_cycle_duration_seconds",
                                    "Time the statistics sampler took per cycle.",
                                    labels=["kind"])
        last = _gauge("virtnode_stats_cycle_last_duration_seconds",
                      "Duration of the latest sampling cycle.", ["kind"])
        failed = _counter("virtnode_stats_failed_cycles_total",
                          "Sampling cycles that produced no fresh values.", ["kind"])
        for kind, stats in sorted(self._sampler.cycles.items()):
            cycle.add_metric([kind], stats.count, stats.seconds)
            last.add_metric([kind], stats.last_seconds)
            failed.add_metric([kind], stats.failed)
        yield from (cycle, last, failed)
        stale = _gauge("virtnode_stats_stale_vms",
                       "VMs reported with old values because their collection is stuck.")
        stale.add_metric([], sum(1 for e in self._sampler.vms.values() if not e.fresh))
        yield stale
        overdue = _gauge("virtnode_stats_overdue_calls",
                         "Statistics calls to libvirt still running past their deadline.")
        overdue.add_metric([], self._sampler.overdue_calls)
        yield overdue


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class HostCollector:
    """Host counters and gauges from the sampler's latest host sample."""

    _NICS = (("rx_bytes", "receive_bytes"), ("tx_bytes", "transmit_bytes"),
             ("rx_packets", "receive_packets"), ("tx_packets", "transmit_packets"),
             ("rx_errors", "receive_errors"), ("tx_errors", "transmit_errors"),
             ("rx_dropped", "receive_drops"), ("tx_dropped", "transmit_drops"))
    _DISKS = (("read_bytes", "read_bytes", 1), ("write_bytes", "written_bytes", 1),
              ("reads", "reads_completed", 1), ("writes", "writes_completed", 1),
              ("read_time_ms", "read_time_seconds", 1000), ("write_time_ms",
                                                             "write_time_seconds", 1000))

    def __init__(self, sampler: StatsSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        stats = self._sampler.host
        if stats is None:
            return
        # Each value carries the time it was sampled (see architecture.md, "Statistics").
        ts = stats["time"]
        cpu = _counter("virtnode_host_cpu_seconds_total", "Time each host CPU spent per mode.",
                       ["cpu", "mode"])
        for i, core in enumerate(self._sampler.host_cores):
            for mode, seconds in core.items():
                cpu.add_metric([str(i), mode], seconds, timestamp=ts)
        yield cpu
        for section in ("memory", "swap"):
            for key in ("total_bytes", "available_bytes", "used_bytes", "free_bytes"):
                if key in stats[section]:
                    gauge = _gauge(f"virtnode_host_{section}_{key}", f"Host {section}, {key}.")
                    gauge.add_metric([], stats[section][key], timestamp=ts)
                    yield gauge
        for period in ("1m", "5m", "15m"):
            load = _gauge(f"virtnode_host_load{period[:-1]}", f"Load average over {period}.")
            load.add_metric([], stats["load"][period], timestamp=ts)
            yield load
        for ours, name in self._NICS:
            family = _counter(f"virtnode_host_network_{name}_total",
                              f"Host NIC counter {ours}.", ["device"])
            for nic in stats["nics"]:
                family.add_metric([nic["name"]], nic[ours], timestamp=ts)
            yield family
        for ours, name, divisor in self._DISKS:
            family = _counter(f"virtnode_host_disk_{name}_total", f"Host disk counter {ours}.",
                              ["device"])
            for disk in stats["disks"]:
                family.add_metric([disk["name"]], disk[ours] / divisor, timestamp=ts)
            yield family
        for key, name in (("total_bytes", "size_bytes"), ("used_bytes", "used_bytes"),
                          ("free_bytes", "free_bytes")):
            usage = _gauge(f"virtnode_host_filesystem_{name}",
                           "Usage of the filesystems the agent keeps data on.", ["path"])
            for fs in stats["filesystems"]:
                usage.add_metric([fs["path"]], fs[key], timestamp=ts)
            yield usage


class VmStaleCollector:
    """How old each VM's values are: it grows between cycles, so it is never cached."""

    def __init__(self, sampler: StatsSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        stale = _gauge("virtnode_vm_stale_seconds",
                       "Age of a VM's values when its collection is stuck; 0 when fresh.", _VM)
        for entry in self._sampler.vms.values():
            stale.add_metric([entry.stats["vm_id"], entry.stats["name"]],
                             self._sampler.stale_seconds(entry))
        yield stale


class VmCollector:
    """Per-VM series from the sampler's cache, labelled ``vm_id`` and ``vm_name``."""

    _MEMORY = ("balloon_bytes", "maximum_bytes", "used_bytes", "rss_bytes", "available_bytes",
               "unused_bytes", "usable_bytes")
    _DISK_COUNTERS = (("read_bytes", "read_bytes_total", 1.0),
                      ("write_bytes", "write_bytes_total", 1.0),
                      ("reads", "reads_total", 1.0), ("writes", "writes_total", 1.0),
                      ("flushes", "flushes_total", 1.0),
                      ("read_time_ns", "read_time_seconds_total", 1e9),
                      ("write_time_ns", "write_time_seconds_total", 1e9),
                      ("flush_time_ns", "flush_time_seconds_total", 1e9))
    _DISK_GAUGES = (("capacity_bytes", "capacity_bytes"), ("allocation_bytes",
                                                           "allocation_bytes"),
                    ("physical_bytes", "physical_bytes"))
    _NICS = HostCollector._NICS

    def __init__(self, sampler: StatsSampler,
                 known: Callable[[], Iterable[tuple[str, str, str]]] = tuple) -> None:
        self._sampler = sampler
        #: Every VM the agent knows of, (vm_id, name, state): those the sampler skips
        #: (defined, shut off) still get their info series, so collectors can count them.
        self._known = known

    def collect(self) -> Iterator[Metric]:
        entries = [(e.stats, e.counters) for e in self._sampler.vms.values()]
        info = _gauge("virtnode_vm_info",
                      "One series per VM the agent knows of, running or not, with its state.",
                      [*_VM, "state"])
        sampled = {stats["vm_id"] for stats, _ in entries}
        for vm_id, name, state in sorted(self._known()):
            if vm_id not in sampled:
                info.add_metric([vm_id, name, state], 1)
        vcpus = _gauge("virtnode_vm_vcpus", "vCPUs the VM runs with.", _VM)
        cpu = {key: _counter(f"virtnode_vm_cpu_{key}_total", f"VM CPU time ({key}).", _VM)
               for key in ("seconds", "user_seconds", "system_seconds")}
        vcpu = _counter("virtnode_vm_vcpu_seconds_total", "Time each vCPU ran.", [*_VM, "vcpu"])
        memory = {key: _gauge(f"virtnode_vm_memory_{key}", f"VM memory, {key}.", _VM)
                  for key in self._MEMORY}
        for stats, counters in entries:
            labels = [stats["vm_id"], stats["name"]]
            ts = stats["time"]  # when this VM's values were sampled
            info.add_metric([*labels, stats["state"]], 1)
            vcpus.add_metric(labels, counters["vcpu_count"], timestamp=ts)
            for key, ns in (("seconds", "cpu_ns"), ("user_seconds", "user_ns"),
                            ("system_seconds", "system_ns")):
                if counters[ns] is not None:
                    cpu[key].add_metric(labels, counters[ns] / 1e9, timestamp=ts)
            for i, v in sorted(counters["vcpus"].items()):
                if v["time_ns"] is not None:
                    vcpu.add_metric([*labels, str(i)], v["time_ns"] / 1e9, timestamp=ts)
            for key, family in memory.items():
                if stats["memory"].get(key) is not None:
                    family.add_metric(labels, stats["memory"][key], timestamp=ts)
        yield from (info, vcpus, *cpu.values(), vcpu, *memory.values())
        yield from self._disks(entries)
        yield from self._nics(entries)

    def _disks(self, entries: list[tuple[JsonObject, JsonObject]]) -> Iterator[Metric]:
        labels = [*_VM, "device"]
        counters = {k: _counter(f"virtnode_vm_disk_{n.removesuffix('_total')}_total",
                                f"VM disk counter {k}.", labels)
                    for k, n, _ in self._DISK_COUNTERS}
        gauges = {k: _gauge(f"virtnode_vm_disk_{n}", f"VM disk {k}.", labels)
                  for k, n in self._DISK_GAUGES}
        divisors = {k: d for k, _, d in self._DISK_COUNTERS}
        info = _gauge("virtnode_vm_disk_info", "One series per VM disk, with its source path.",
                      [*labels, "path"])
        for stats, raw in entries:
            for device, disk in sorted(raw["disks"].items()):
                series = [stats["vm_id"], stats["name"], device]
                info.add_metric([*series, str(disk.get("path", ""))], 1)
                for key, family in counters.items():
                    if disk.get(key) is not None:
                        family.add_metric(series, disk[key] / divisors[key],
                                          timestamp=stats["time"])
                for key, gauge in gauges.items():
                    if disk.get(key) is not None:
                        gauge.add_metric(series, disk[key], timestamp=stats["time"])
        yield from (info, *counters.values(), *gauges.values())

    def _nics(self, entries: list[tuple[JsonObject, JsonObject]]) -> Iterator[Metric]:
        labels = [*_VM, "interface"]
        families = {k: _counter(f"virtnode_vm_network_{n}_total", f"VM NIC counter {k}.", labels)
                    for k, n in self._NICS}
        info = _gauge("virtnode_vm_network_info",
                      "One series per VM NIC, with the bridge its host device is a port of.",
                      [*labels, "bridge"])
        for stats, raw in entries:
            for device, nic in sorted(raw["nics"].items()):
                info.add_metric([stats["vm_id"], stats["name"], device, nic.get("bridge", "")], 1)
                for key, family in families.items():
                    if nic.get(key) is not None:
                        family.add_metric([stats["vm_id"], stats["name"], device], nic[key],
                                          timestamp=stats["time"])
        yield from (info, *families.values())


class Metrics:
    """The agent's metrics: its collectors, and the counters the RPC layer and the bus feed."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.requests = RequestMetrics(methods)
        self.events = EventCounter()
        #: Each collector with its version function and the text last written for it.
        self._collectors: list[_Entry] = []

    def add_collector(self, collector: Collector,
                      version: Callable[[], object] | None = None) -> None:
        """Serve the families ``collector.collect()`` yields on every scrape.

        ``collect`` runs on the event loop: it must only read state the service keeps
        anyway, never do I/O. With ``version``, the text is written again only when
        ``version()`` changes (the statistics change once per sampling cycle, and a
        scrape should not pay for writing them again).
        """
        self._collectors.append(_Entry(collector, version))

    def remove_collector(self, collector: Collector) -> None:
        self._collectors = [e for e in self._collectors if e.collector is not collector]

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every collector."""
        return b"".join(entry.text() for entry in self._collectors)


class _Entry:
    __slots__ = ("_text", "_version", "_written_at", "collector")

    def __init__(self, collector: Collector, version: Callable[[], object] | None) -> None:
        self.collector = collector
        self._version = version
        self._written_at: object = None
        self._text = b""

    def text(self) -> bytes:
        if self._version is None:
            return render_text(self.collector.collect())
        version = self._version()
        if version != self._written_at or not self._text:
            self._text = render_text(self.collector.collect())
            self._written_at = version
        return self._text


_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_TYPES = {"unknown": "untyped", "info": "gauge", "stateset": "gauge"}


def render_text(metrics: Iterable[Metric]) -> bytes:
    """Families as Prometheus text, several times faster than prometheus-client's writer.

    The VM series repeat the same label sets across dozens of families, so each label
    set is escaped and joined once per scrape.
    """
    out: list[str] = []
    append = out.append
    label_text: dict[tuple[tuple[str, str], ...], str] = {}
    for metric in metrics:
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(metric.type, metric.type)}\n")
        for sample in metric.samples:
            labels = sample.labels
            if labels:
                key = tuple(labels.items())
                text = label_text.get(key)
                if text is None:
                    text = label_text[key] = "{" + ",".join(
                        f'{k}="{v.translate(_LABEL_ESCAPES)}"' for k, v in sorted(key)) + "}"
            else:
                text = ""
            if sample.timestamp is None:
                append(f"{sample.name}{text} {_number(sample.value)}\n")
            else:  # milliseconds since the epoch, as the text format has them
                stamp = round(float(sample.timestamp) * 1000)
                append(f"{sample.name}{text} {_number(sample.value)} {stamp}\n")
    return "".join(out).encode()


def _number(value: float) -> str:
    v = float(value)
    if v != v:  # noqa: PLR0124 - NaN is the one value not equal to itself
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)

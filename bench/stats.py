"""Statistics sampling benchmark: the agent's VM sampling cycle against libvirt's bulk call.

Three parts, each with an agent started by this script in its own subprocess
(``python -m virtnode serve``, a private temporary state directory, log level ``warning``,
one TCP listener on 127.0.0.1, ``--set stats.vm_interval=1`` and
``stats.host_interval=3600`` so that host samples do not fall into the measured cycles):

* **kvm**: ``--count`` firmware-only guests (64 MiB, ``kvm``, machine ``pc``, no disk,
  the domain XML the agent writes, named ``vn-bench-stats-...``) on ``qemu:///system``.
  The script subscribes to ``stats.vm``; right after each event (a cycle has just ended)
  it makes one raw ``conn.getAllDomainStats(GROUPS, BULK_FLAGS)`` call, the same groups
  and flags as the sampler (``virtnode.hypervisor.domstats``), on its own connection, in a thread.
  So agent cycles and raw calls alternate and never overlap (a raw call that ran into
  the next cycle is dropped, with that cycle). The agent's figure is the cycle's wall
  time as it records it (``duration_seconds`` of the event: the libvirt call through its
  thread pool, parsing, rates, the cache update); its CPU per cycle is the agent
  process's user + system time over a round divided by the cycles in it (that includes
  publishing and journaling the event). The raw figure is the call's wall time and the
  calling thread's CPU time. Target: median agent cycle / median raw call <= 1.2.
* **scale**: the same on libvirt's test driver with N = 10, 100 and 1000 running
  domains (a node XML file, ``test:///PATH``; each domain has a disk and a NIC, but the
  test driver returns only the state group). Reported: cycle time, per-VM cost, CPU.
* **rss**: the agent's resident set size (psutil) idle (test driver, no domains, after
  start and a few cycles) and with 1000 test-driver domains (after the scale part's
  cycles and three ``GET /metrics``). Targets: < 80 MB and < 150 MB.

Every guest this script makes is named ``vn-bench-stats-``; all of them, and only them,
are removed before and after the run. The exit status is 1 if a target is missed, 2 if
the benchmark could not run.

    .venv/bin/python bench/stats.py [--json] [--parts kvm,scale,rss]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import psutil

from virtnode.hypervisor import domstats

from common import (
    BenchError,
    JsonObject,
    Server,
    cpu_seconds,
    free_port,
    guest_xml,
    libvirt_version,
    machine,
    print_targets,
    remove_guests,
    require_at_least_one,
    scrape_metrics,
    start_agent,
    take_guest_lock,
    wait_ready,
)

TARGET_RATIO = 1.2
TARGET_IDLE_MB = 80.0
TARGET_LOADED_MB = 150.0

URI = "qemu:///system"
PREFIX = "vn-bench-stats-"
VM_INTERVAL = 1.0
AGENT_SET = (f"stats.vm_interval={VM_INTERVAL:g}", "stats.host_interval=3600")
#: In "before" rounds a raw call is timed to end this long before the next cycle is due.
MARGIN = 0.1
#: Where the raw call goes between two cycles, alternating by round.
POSITIONS = ("after", "before")
#: Longest wait for the next ``stats.vm`` event.
EVENT_TIMEOUT = 30.0
SCALE_COUNTS = (10, 100, 1000)
PARTS = ("kvm", "scale", "rss")
MB = 1024 * 1024

Conn = Any  # libvirt.virConnect; libvirt ships no type information


# --- guests --------------------------------------------------------------------------------


def open_libvirt(uri: str = URI) -> Conn:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise BenchError(f"cannot connect to {uri}: {exc}") from None


def start_guests(conn: Conn, count: int, memory_mib: int, tag: str) -> list[str]:
    """Start ``count`` transient firmware-only guests; their names."""
    names = [f"{PREFIX}{tag}-{i:02d}" for i in range(count)]
    for name in names:
        conn.createXML(guest_xml(name, memory_mib), 0)
    return names


def node_xml(count: int) -> str:
    """A test-driver node with ``count`` running domains, each with a disk and a NIC."""
    parts = ["<node>"]
    for i in range(count):
        parts.append(
            f"<domain type='test'><name>{PREFIX}t{i:04d}</name>"
            f"<uuid>{uuid.UUID(int=(0x5EED << 112) + i)}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><source file='/guest/t{i}.img'/>"
            "<target dev='vda' bus='virtio'/></disk>"
            f"<interface type='network'><source network='default'/><target dev='t{i}'/>"
            "</interface></devices></domain>")
    parts.append("</node>")
    return "\n".join(parts)


# --- the agent's cycles --------------------------------------------------------------------


@dataclass
class Cycle:
    """One ``stats.vm`` event: when it was published, the cycle's duration, VMs in it."""

    time: float
    seconds: float
    vms: int

    @property
    def started(self) -> float:
        return self.time - self.seconds


_DATA = re.compile(r'"topic":"stats\.vm".*?"data":\{"time":([-+.0-9eE]+),'
                   r'"duration_seconds":([-+.0-9eE]+)')


class CycleWatch:
    """A lean WebSocket subscriber to ``stats.vm`` that reads only the fields it needs."""

    def __init__(self, agent: Server) -> None:
        self._agent = agent
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self._agent.ws_url, max_msg_size=0)
        await self._ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1,
                                            "method": "Events.subscribe",
                                            "params": {"topics": ["stats.vm"]}}))
        while True:
            answer = json.loads(await self._ws.receive_str(timeout=EVENT_TIMEOUT))
            if answer.get("id") == 1:
                if "error" in answer:
                    raise BenchError(f"Events.subscribe failed: {answer['error']}")
                return

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def next(self) -> Cycle:
        """The next cycle's event."""
        assert self._ws is not None
        while True:
            try:
                text = await self._ws.receive_str(timeout=EVENT_TIMEOUT)
            except (TimeoutError, TypeError) as exc:
                self._agent.check_alive()
                raise BenchError(f"no stats.vm event from the agent: {exc}") from None
            found = _DATA.search(text, 0, 400)
            if found is not None:
                return Cycle(float(found[1]), float(found[2]), text.count('"vm_id":'))

    async def settle(self, vms: int, cycles: int = 3) -> None:
        """Wait until ``cycles`` consecutive cycles have sampled ``vms`` VMs."""
        seen = 0
        for _ in range(cycles + 60):
            seen = seen + 1 if (await self.next()).vms == vms else 0
            if seen >= cycles:
                return
        raise BenchError(f"the agent's cycles did not settle on {vms} VMs")


def cycle_totals(text: str) -> tuple[float, float]:
    """``virtnode_stats_cycle_duration_seconds`` count and sum for the VM cycles."""
    values = {}
    for kind in ("count", "sum"):
        found = re.search(rf'^virtnode_stats_cycle_duration_seconds_{kind}\{{kind="vm"\}} '
                          r'(\S+)$', text, re.MULTILINE)
        if found is None:
            raise BenchError("/metrics has no virtnode_stats_cycle_duration_seconds")
        values[kind] = float(found[1])
    return values["count"], values["sum"]


# --- one series: agent cycles and raw calls, alternating ----------------------------------


@dataclass
class Series:
    """Cycles of one agent and raw calls made between them."""

    vms: int
    agent_s: list[float] = field(default_factory=list)
    raw_s: list[float] = field(default_factory=list)
    raw_cpu_s: list[float] = field(default_factory=list)
    #: Agent CPU over all rounds, and the cycles in them.
    agent_cpu_total_s: float = 0.0
    cycles: int = 0
    #: Median agent / median raw, one figure per round, and where its raw calls were.
    round_ratios: list[float] = field(default_factory=list)
    round_positions: list[str] = field(default_factory=list)
    #: Mean cycle time from /metrics over the whole series.
    metrics_mean_s: float = float("nan")
    dropped: int = 0

    def summary(self) -> JsonObject:
        agent, raw = statistics.median(self.agent_s), statistics.median(self.raw_s)
        cpu = self.agent_cpu_total_s / self.cycles
        return {
            "vms": self.vms,
            "agent_cycle_s": agent,
            "raw_call_s": raw,
            "ratio": agent / raw,
            "agent_cpu_per_cycle_s": cpu,
            "raw_cpu_per_call_s": statistics.median(self.raw_cpu_s),
            "agent_per_vm_s": agent / self.vms if self.vms else None,
            "agent_cpu_per_vm_s": cpu / self.vms if self.vms else None,
            "metrics_mean_cycle_s": self.metrics_mean_s,
            "samples": len(self.agent_s),
            "dropped": self.dropped,
            "round_ratios": self.round_ratios,
            "round_positions": self.round_positions,
            "agent_samples_s": [round(v, 6) for v in self.agent_s],
            "raw_samples_s": [round(v, 6) for v in self.raw_s],
        }


def raw_call(conn: Conn) -> tuple[float, float, float]:
    """One bulk call as the sampler makes it: wall seconds, thread CPU seconds, end time."""
    cpu, started = time.thread_time(), time.perf_counter()
    conn.getAllDomainStats(domstats.GROUPS, domstats.BULK_FLAGS)
    wall = time.perf_counter() - started
    return wall, time.thread_time() - cpu, time.time()


async def until_slot(cycle: Cycle, position: str, estimate: float) -> None:
    """Wait until a raw call of ``estimate`` seconds belongs at ``position``.

    "after": at once, right after the cycle; "before": ending :data:`MARGIN` before the
    next cycle is due. Alternating the two keeps either side from always going first.
    """
    if position == "before":
        wait = cycle.started + VM_INTERVAL - MARGIN - estimate - time.time()
        if wait > 0:
            await asyncio.sleep(wait)


async def measure(agent: Server, conn: Conn, vms: int, rounds: int, pairs: int) -> Series:
    """``rounds`` rounds of ``pairs`` agent cycles, each with one raw call before the next."""
    series = Series(vms)
    watch = CycleWatch(agent)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raw")
    loop = asyncio.get_running_loop()
    try:
        await watch.open()
        await watch.settle(vms)
        count0, sum0 = cycle_totals((await scrape_metrics(agent))[1])
        await watch.next()  # the scrape is not in a measured cycle
        for rnd in range(rounds):
            position = POSITIONS[rnd % len(POSITIONS)]
            cpu0 = cpu_seconds(agent.pid)
            cycles: list[Cycle] = []
            raws: list[tuple[float, float, float]] = []
            for _ in range(pairs):
                cycles.append(await watch.next())
                estimate = statistics.median(series.raw_s) if series.raw_s else \
                    cycles[-1].seconds
                await until_slot(cycles[-1], position, estimate)
                raws.append(await loop.run_in_executor(pool, raw_call, conn))
            cycles.append(await watch.next())
            # Every cycle of the round, its first included, began after cpu0 was read.
            agent_cpu = cpu_seconds(agent.pid) - cpu0
            overlapped = set()
            round_raw = []
            for i, (wall, cpu, ended) in enumerate(raws):
                if ended > cycles[i + 1].started:  # the raw call ran into the next cycle
                    overlapped.add(i + 1)
                    series.dropped += 1
                    continue
                round_raw.append(wall)
                series.raw_cpu_s.append(cpu)
            round_agent = [c.seconds for i, c in enumerate(cycles)
                           if i not in overlapped and c.vms == vms]
            if not round_raw or not round_agent:
                raise BenchError("every raw call overlapped an agent cycle; "
                                 "raise stats.vm_interval")
            series.agent_s += round_agent
            series.raw_s += round_raw
            series.agent_cpu_total_s += agent_cpu
            series.cycles += len(cycles)
            series.round_ratios.append(statistics.median(round_agent)
                                       / statistics.median(round_raw))
            series.round_positions.append(position)
        count1, sum1 = cycle_totals((await scrape_metrics(agent))[1])
        series.metrics_mean_s = (sum1 - sum0) / (count1 - count0)
    finally:
        await watch.close()
        pool.shutdown()
    return series


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident set size now and its high-water mark (VmHWM), MB."""
    rss = psutil.Process(pid).memory_info().rss / MB
    peak = rss
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return rss, max(rss, peak)  # VmHWM is updated lazily and can trail the RSS


# --- the parts -----------------------------------------------------------------------------


@dataclass
class Options:
    parts: tuple[str, ...]
    count: int
    memory_mib: int
    rounds: int
    pairs: int
    scale_rounds: int
    settle: float


@dataclass
class Results:
    kvm: JsonObject | None = None
    scale: list[JsonObject] = field(default_factory=list)
    rss: JsonObject = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    removed_at_start: int = 0


class Agents:
    """The agents this run started, each stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Server] = []

    async def start(self, uri: str, name: str) -> Server:
        agent = start_agent(self.tmp, uri, listen=f"tcp://127.0.0.1:{free_port()}",
                            overrides=AGENT_SET, name=name)
        self.started.append(agent)
        await wait_ready(agent)
        return agent

    def stop_all(self) -> None:
        for agent in self.started:
            agent.stop()


async def run_kvm(agents: Agents, opts: Options, results: Results) -> None:
    conn = open_libvirt()
    try:
        results.removed_at_start = remove_guests(conn, PREFIX)
        try:
            start_guests(conn, opts.count, opts.memory_mib, "kvm")
            booted = time.monotonic()
            agent = await agents.start(URI, "agent-kvm")
            # Firmware starting up makes the first monitor queries slow: not what is measured.
            await asyncio.sleep(max(0.0, booted + opts.settle - time.monotonic()))
            series = await measure(agent, conn, opts.count, opts.rounds, opts.pairs)
            agent.stop()
        finally:
            remove_guests(conn, PREFIX)
    finally:
        conn.close()
    results.kvm = series.summary()


async def run_scale(agents: Agents, opts: Options, results: Results) -> None:
    for count in SCALE_COUNTS:
        path = agents.tmp / f"node{count}.xml"
        path.write_text(node_xml(count))
        uri = f"test://{path}"
        agent = await agents.start(uri, f"agent-test{count}")
        conn = open_libvirt(uri)
        try:
            series = await measure(agent, conn, count, opts.scale_rounds, opts.pairs)
        finally:
            conn.close()
        results.scale.append(series.summary())
        if count == max(SCALE_COUNTS) and "rss" in opts.parts:
            for _ in range(3):
                await scrape_metrics(agent)
            rss, peak = rss_mb(agent.pid)
            results.rss["loaded"] = {"vms": count, "rss_mb": rss, "peak_mb": peak}
        agent.stop()


async def run_idle(agents: Agents, results: Results) -> None:
    path = agents.tmp / "node0.xml"
    path.write_text(node_xml(0))
    agent = await agents.start(f"test://{path}", "agent-idle")
    watch = CycleWatch(agent)
    try:
        await watch.open()
        await watch.settle(0)
    finally:
        await watch.close()
    rss, peak = rss_mb(agent.pid)
    results.rss["idle"] = {"vms": 0, "rss_mb": rss, "peak_mb": peak}
    agent.stop()


async def run_all(tmp: Path, opts: Options, results: Results) -> None:
    agents = Agents(tmp)
    try:
        if "rss" in opts.parts:
            await run_idle(agents, results)
        if "kvm" in opts.parts:
            await run_kvm(agents, opts, results)
        if "scale" in opts.parts or "rss" in opts.parts:
            await run_scale(agents, opts, results)
    finally:
        agents.stop_all()


# --- report --------------------------------------------------------------------------------


def _machine() -> JsonObject:
    return machine(libvirt=libvirt_version())


def evaluate(results: Results) -> list[JsonObject]:
    targets = []
    if results.kvm is not None:
        ratio = results.kvm["ratio"]
        targets.append({"name": f"VM sampling cycle, {results.kvm['vms']} KVM guests, "
                                "agent / raw getAllDomainStats",
                        "value": ratio, "unit": "x", "target": f"<= {TARGET_RATIO}",
                        "passed": ratio <= TARGET_RATIO})
    for key, limit, what in (("idle", TARGET_IDLE_MB, "agent RSS idle"),
                             ("loaded", TARGET_LOADED_MB, "agent RSS with 1000 VMs")):
        if key in results.rss:
            rss = results.rss[key]["rss_mb"]
            targets.append({"name": what, "value": rss, "unit": "MB",
                            "target": f"< {limit:.0f} MB", "passed": rss < limit})
    return targets


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def print_table(results: Results, targets: list[JsonObject], opts: Options) -> None:
    info = _machine()
    load = " ".join(f"{v:.2f}" for v in results.load_before)
    print(f"machine: {info['cpus']} x {info['cpu_model']}, {info['memory_gib']} GiB; "
          f"Python {info['python']}, libvirt {info['libvirt']}; virtnode {info['virtnode']}")
    print(f"load average {load} before; agent --set {' '.join(AGENT_SET)}")
    rows = ([("kvm", results.kvm)] if results.kvm else []) + [
        ("test", s) for s in results.scale]
    if rows:
        print()
        print(f"{'':<12}{'VMs':>6}{'raw ms':>10}{'agent ms':>10}{'ratio':>8}"
              f"{'raw CPU ms':>12}{'agent CPU ms':>14}{'agent us/VM':>13}"
              f"{'CPU us/VM':>11}{'n':>5}")
        for kind, s in rows:
            print(f"{kind:<12}{s['vms']:>6}{_ms(s['raw_call_s']):>10}"
                  f"{_ms(s['agent_cycle_s']):>10}{s['ratio']:>7.2f}x"
                  f"{_ms(s['raw_cpu_per_call_s']):>12}{_ms(s['agent_cpu_per_cycle_s']):>14}"
                  f"{_us(s['agent_per_vm_s']):>13}{_us(s['agent_cpu_per_vm_s']):>11}"
                  f"{s['samples']:>5}")
        print("medians; agent ms = the cycle as the agent records it (stats.vm "
              "duration_seconds); agent CPU = process CPU over all rounds / cycles")
        for kind, s in rows:
            extra = f", {s['dropped']} pair(s) dropped (overlap)" if s["dropped"] else ""
            print(f"  {kind} {s['vms']}: mean cycle from /metrics "
                  f"{_ms(s['metrics_mean_cycle_s'])} ms{extra}")
        for kind, s in rows:
            by_round = ", ".join(f"{v:.2f} ({where})" for v, where in
                                 zip(s["round_ratios"], s["round_positions"], strict=True))
            print(f"  {kind} {s['vms']}: agent/raw by round (raw call): {by_round}")
    if results.rss:
        print()
        print(f"{'agent RSS':<12}{'VMs':>6}{'RSS MB':>10}{'peak MB':>10}")
        for key, r in results.rss.items():
            print(f"{key:<12}{r['vms']:>6}{r['rss_mb']:>10.1f}{r['peak_mb']:>10.1f}")
    if results.removed_at_start:
        print(f"\nremoved {results.removed_at_start} {PREFIX}* VM(s) left from an earlier run")
    print()
    print_targets(targets, lambda t: f"{t['value']:.2f}x" if t["unit"] == "x"
                  else f"{t['value']:.1f} MB")
    if "kvm" not in opts.parts:
        print("SKIP  VM sampling cycle with KVM guests (--parts)")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    p.add_argument("--count", type=int, default=20, help="KVM guests")
    p.add_argument("--memory", type=int, default=64, metavar="MIB", help="memory per guest")
    p.add_argument("--rounds", type=int, default=5, help="rounds on KVM; medians reported")
    p.add_argument("--scale-rounds", type=int, default=3, help="rounds per test-driver N")
    p.add_argument("--pairs", type=int, default=6,
                   help="agent cycles (each followed by a raw call) per round")
    p.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                   help="wait after starting the KVM guests before measuring")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    args.parts = tuple(x for x in args.parts.split(",") if x)
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts takes a comma-separated list of {', '.join(PARTS)}")
    require_at_least_one(p, args, "count", "rounds", "scale_rounds", "pairs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.parts, args.count, args.memory, args.rounds, args.pairs,
                   args.scale_rounds, args.settle)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised
    results = Results(load_before=os.getloadavg())
    try:
        take_guest_lock()
        with tempfile.TemporaryDirectory(prefix="virtnode-bench-") as tmpdir:
            asyncio.run(run_all(Path(tmpdir), opts, results))
    except (BenchError, OSError, aiohttp.ClientError, libvirt.libvirtError) as exc:
        print(f"bench/stats.py: {exc}", file=sys.stderr)
        return 2
    results.load_after = os.getloadavg()
    targets = evaluate(results)
    if args.json:
        print(json.dumps({
            "benchmark": "VM statistics sampling: agent cycle vs getAllDomainStats; RSS",
            "machine": _machine(),
            "options": asdict(opts),
            "agent_set": list(AGENT_SET),
            "load_average": {"before": results.load_before, "after": results.load_after},
            "kvm": results.kvm,
            "scale": results.scale,
            "rss": results.rss,
            "targets": targets,
        }, indent=2))
    else:
        print_table(results, targets, opts)
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

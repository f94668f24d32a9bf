"""VM create-and-start benchmark: ``VM.create`` through the agent, against libvirt directly.

Creates and starts firmware-only guests (64 MiB, ``kvm``, machine ``pc``, no disk, no
kernel: the firmware finds nothing to boot and waits) on ``qemu:///system``, one at a time
and ``--count`` at once, two ways in the same run:

* agent: ``VM.create`` with ``persistent`` and ``start`` true, to an agent started by this
  script in its own subprocess (``python -m virtnode serve``, a private temporary state
  directory, log level ``warning``, a unix socket listener), from ``virtnode.client.Client``
  on one connection, the calls sent concurrently with ``asyncio.gather``;
* raw: libvirt-python in this process, ``defineXMLFlags(xml, VIR_DOMAIN_DEFINE_VALIDATE)``
  then ``dom.create()``, with the domain XML the agent would write for the same spec
  (``virtnode.vm.spec.check_spec`` + ``domain_xml``), the calls made from as many threads as
  guests, all on ONE libvirt connection (the agent uses one connection too, and libvirtd
  limits the concurrent requests of each client connection).

Time is the wall time from issuing the first call until every guest is running: the
agent answers ``VM.create`` after the start, the raw path returns after ``dom.create()``.
Every guest this script makes is named ``vn-bench-...``; all of them, and only them, are
destroyed and undefined before the run, between measurements (not timed) and at the end,
whatever happened. One untimed create on each path warms up first. Each measurement runs
``--rounds`` times, agent and raw alternating (which goes first alternates too); medians
are reported. A measurement during which libvirtd restarted (other work on the host) or a
call failed is taken again, up to five times, and reported. The exit status is 1 if a
target is missed, 2 if the benchmark could not run.

    .venv/bin/python bench/vm.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from virtnode.client import Client, ClientError

from common import (
    READY_TIMEOUT,
    BenchError,
    JsonObject,
    Server,
    cpu_seconds,
    guest_spec,
    guest_xml,
    libvirt_version,
    libvirtd_pid,
    machine,
    print_targets,
    remove_guests,
    require_at_least_one,
    start_agent,
    take_guest_lock,
    wait_ready,
)

#: Target: the agent's wall time relative to libvirt's, for one guest and for ``--count``.
TARGET_RATIO = 1.15

URI = "qemu:///system"
PREFIX = "vn-bench-"
#: How long the first connection may wait for libvirtd (it may be restarting).
OPEN_TIMEOUT = 30.0
#: Longest one VM.create (or one raw define + start) may take before the run is abandoned.
CALL_TIMEOUT = 600.0
#: A measurement disturbed by a libvirtd restart or a failed call is taken again this often.
RETRIES = 5


Conn = Any  # libvirt.virConnect; libvirt ships no type information
Dom = Any  # libvirt.virDomain


# --- libvirt -------------------------------------------------------------------------------


class Libvirt:
    """This script's own connection to libvirtd, reopened if libvirtd restarts."""

    def __init__(self) -> None:
        self.conn: Conn = None
        self.opened = False  # at least once: only then may the run have made guests

    def open(self, timeout: float = 0.0) -> None:
        """Connect, retrying for up to ``timeout`` seconds (libvirtd may be restarting)."""
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.conn = libvirt.open(URI)
                self.conn.getLibVersion()
                self.opened = True
                return
            except libvirt.libvirtError as exc:
                self.conn = None
                if time.monotonic() > deadline:
                    raise BenchError(f"cannot connect to {URI}: {exc}") from None
            time.sleep(0.5)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def foreign_running(conn: Conn) -> int | None:
    """Running domains that are not this benchmark's (other work on the host)."""
    try:
        active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sum(1 for dom in active if not dom.name().startswith(PREFIX))
    except libvirt.libvirtError:
        return None  # libvirtd went away in between: not worth failing the run for


# --- one measurement -----------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: the wall time and when each guest was running (seconds)."""

    wall_s: float
    per_vm_s: list[float]
    agent_cpu_s: float | None = None


class Disturbed(Exception):
    """A measurement to take again: libvirtd restarted during it, or a call failed."""


def _first_error(results: list[Any]) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)


async def via_agent(agent: Server, names: list[str], memory_mib: int) -> Sample:
    """``VM.create`` of every guest at once on one connection."""
    client = await Client.connect(agent.url)
    try:
        await client.call("Host.ping", timeout=CALL_TIMEOUT)  # the connection is warm
        cpu_before = cpu_seconds(agent.pid)
        started = time.perf_counter()

        async def create(name: str) -> float:
            result = await client.call(
                "VM.create",
                {"spec": guest_spec(name, memory_mib), "persistent": True, "start": True},
                timeout=CALL_TIMEOUT,
            )
            done = time.perf_counter() - started
            if result.get("state") != "running":
                raise Disturbed(f"VM.create of {name} answered state {result.get('state')!r}")
            return done

        # Every call is waited for, even after one failed, so none is still creating a
        # guest when the guests are removed.
        results = await asyncio.gather(*(create(name) for name in names),
                                       return_exceptions=True)
        wall = time.perf_counter() - started
        cpu = round(cpu_seconds(agent.pid) - cpu_before, 3)
    finally:
        await client.close()
    error = _first_error(results)
    if error is not None:
        raise Disturbed(f"agent: {error}")
    return Sample(wall, sorted(r for r in results if isinstance(r, float)), cpu)


async def via_libvirt(conn: Conn, pool: concurrent.futures.Executor, names: list[str],
                      memory_mib: int) -> Sample:
    """Define and start every guest at once, one thread per guest, one connection."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()

    def create(name: str) -> tuple[Dom, float]:
        dom = conn.defineXMLFlags(guest_xml(name, memory_mib),
                                  libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        dom.create()
        return dom, time.perf_counter() - started

    results = await asyncio.gather(*(loop.run_in_executor(pool, create, name)
                                     for name in names), return_exceptions=True)
    wall = time.perf_counter() - started
    error = _first_error(results)
    if error is not None:
        raise Disturbed(f"libvirt: {error}")
    done = [r for r in results if isinstance(r, tuple)]
    for dom, _ in done:
        state, _reason = dom.state()
        if state != libvirt.VIR_DOMAIN_RUNNING:
            raise Disturbed(f"{dom.name()} is not running after dom.create() (state {state})")
    return Sample(wall, sorted(t for _, t in done))


# --- the run -------------------------------------------------------------------------------


@dataclass
class Series:
    """The samples of one path at one guest count, one per round."""

    wall_s: list[float] = field(default_factory=list)
    per_vm_p50_s: list[float] = field(default_factory=list)
    first_s: list[float] = field(default_factory=list)
    agent_cpu_s: list[float] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.wall_s.append(sample.wall_s)
        self.per_vm_p50_s.append(statistics.median(sample.per_vm_s))
        self.first_s.append(sample.per_vm_s[0])
        if sample.agent_cpu_s is not None:
            self.agent_cpu_s.append(sample.agent_cpu_s)

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else float("nan")


@dataclass
class Options:
    count: int
    rounds: int
    memory_mib: int
    settle: float
    agent_set: list[str]

    @property
    def counts(self) -> tuple[int, ...]:
        return (1, self.count) if self.count != 1 else (1,)


PATHS = ("agent", "raw")


def key(path: str, count: int) -> str:
    return f"{path}/{count}"


@dataclass
class Run:
    """Everything one run measured."""

    series: dict[str, Series]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    foreign_vms_before: int | None = 0
    foreign_vms_after: int | None = 0
    removed_at_start: int = 0
    #: Measurements taken again, and why.
    retries: list[str] = field(default_factory=list)


class Bench:
    """Takes the measurements, alternating between the agent and libvirt."""

    def __init__(self, agent: Server, lv: Libvirt, opts: Options, run: Run,
                 pool: concurrent.futures.Executor) -> None:
        self.agent = agent
        self.lv = lv
        self.opts = opts
        self.run = run
        self.pool = pool

    async def clean(self, settle: float) -> None:
        await asyncio.to_thread(remove_guests, self.lv.conn, PREFIX)
        await asyncio.sleep(settle)

    async def recover(self) -> None:
        """After a failure: reconnect to libvirtd, wait for the agent, remove the guests."""
        await asyncio.to_thread(self.lv.open, READY_TIMEOUT)
        await wait_ready(self.agent)
        await self.clean(0.0)

    async def measure(self, path: str, names: list[str]) -> Sample:
        """One measurement on a clean host, taken again if something disturbed it."""
        what = f"{path}, {len(names)} VM(s)"
        recovering = False
        for attempt in range(RETRIES + 1):
            try:
                if recovering:
                    await self.recover()
                await self.clean(self.opts.settle)
                daemon = libvirtd_pid()
                async with asyncio.timeout(CALL_TIMEOUT):
                    if path == "agent":
                        sample = await via_agent(self.agent, names, self.opts.memory_mib)
                    else:
                        sample = await via_libvirt(self.lv.conn, self.pool, names,
                                                   self.opts.memory_mib)
                if libvirtd_pid() != daemon:
                    raise Disturbed("libvirtd restarted during the measurement")
                return sample
            except (Disturbed, BenchError, ClientError, libvirt.libvirtError,
                    TimeoutError) as exc:
                self.agent.check_alive()
                why = f"{what}: {str(exc) or type(exc).__name__}"
                if attempt == RETRIES:
                    raise BenchError(f"{why} (gave up after {RETRIES} retries)") from None
                print(f"bench/vm.py: taking a measurement again: {why}", file=sys.stderr)
                self.run.retries.append(why)
                recovering = True
        raise AssertionError("unreachable")

    async def run_all(self) -> None:
        await wait_ready(self.agent)
        # Warm-up, not timed: the first start after a while loads QEMU and its caches.
        for path in PATHS:
            await self.measure(path, [f"{PREFIX}warm-{path}"])
        for rnd in range(self.opts.rounds):
            order = PATHS if rnd % 2 == 0 else PATHS[::-1]
            for count in self.opts.counts:
                for path in order:
                    names = [f"{PREFIX}{path}{count}-r{rnd + 1}-{i:02d}" for i in range(count)]
                    self.run.series[key(path, count)].add(await self.measure(path, names))


async def run_bench(agent: Server, lv: Libvirt, opts: Options, run: Run) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=opts.count,
                                               thread_name_prefix="raw") as pool:
        await Bench(agent, lv, opts, run, pool).run_all()


# --- report --------------------------------------------------------------------------------


def _machine() -> JsonObject:
    return machine(libvirt=libvirt_version())


def evaluate(run: Run, opts: Options) -> JsonObject:
    ratios: JsonObject = {}
    targets = []
    for count in opts.counts:
        agent, raw = run.series[key("agent", count)], run.series[key("raw", count)]
        ratio = agent.median("wall_s") / raw.median("wall_s")
        per_round = [a / r for a, r in zip(agent.wall_s, raw.wall_s, strict=True)]
        ratios[str(count)] = {"of_medians": ratio, "per_round": per_round}
        targets.append({
            "name": f"create+start of {count} VM{'s' if count > 1 else ''}, agent / raw",
            "value": ratio,
            "target": f"<= {TARGET_RATIO:.2f}",
            "passed": ratio <= TARGET_RATIO,
        })
    return {"ratios": ratios, "targets": targets}


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in load)


def print_table(run: Run, verdict: JsonObject, opts: Options) -> None:
    info = _machine()
    print(f"machine: {info['cpus']} x {info['cpu_model']}, {info['memory_gib']} GiB; "
          f"Python {info['python']}, libvirt {info['libvirt']}; virtnode {info['virtnode']}")
    others = ["?" if n is None else str(n) for n in (run.foreign_vms_before,
                                                     run.foreign_vms_after)]
    print(f"load average {_load(run.load_before)} before, {_load(run.load_after)} after; "
          f"other running VMs {others[0]} before, {others[1]} after")
    print(f"{URI}, {opts.memory_mib} MiB firmware-only guests; {opts.rounds} round(s), "
          f"agent and raw alternating, medians shown (seconds)"
          + (f"; agent --set {' '.join(opts.agent_set)}" if opts.agent_set else ""))
    print()
    print(f"{'':<28}{'raw':>10}{'agent':>10}{'agent/raw':>11}")
    for count in opts.counts:
        agent, raw = run.series[key("agent", count)], run.series[key("raw", count)]
        rows = [(f"{count} VM(s): all running", "wall_s")]
        if count > 1:
            rows += [(f"{count} VMs: first running", "first_s"),
                     (f"{count} VMs: per-VM p50", "per_vm_p50_s")]
        for label, name in rows:
            r, a = raw.median(name), agent.median(name)
            print(f"{label:<28}{r:>10.3f}{a:>10.3f}{a / r:>10.2f}x")
        print(f"{'':<28}{'':>10}{agent.median('agent_cpu_s'):>10.3f}  agent CPU seconds")
        if opts.rounds > 1:
            for path, series in (("raw", raw), ("agent", agent)):
                spread = ", ".join(f"{v:.3f}" for v in series.wall_s)
                print(f"  {path} by round: {spread}")
            per_round = verdict["ratios"][str(count)]["per_round"]
            print(f"  agent/raw by round: {', '.join(f'{v:.2f}' for v in per_round)}")
        print()
    if run.removed_at_start:
        print(f"removed {run.removed_at_start} vn-bench-* VM(s) left from an earlier run")
    for why in run.retries:
        print(f"measurement taken again: {why}")
    if run.removed_at_start or run.retries:
        print()
    print_targets(verdict["targets"], lambda t: f"{t['value']:.2f}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=20,
                   help="guests started at once in the concurrent measurement")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per path, alternating; medians are reported")
    p.add_argument("--memory", type=int, default=64, metavar="MIB", help="memory per guest")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="pause after removing the guests, before the next measurement")
    p.add_argument("--agent-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="pass --set to the agent (e.g. hypervisor.pool_size=20); repeatable")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    require_at_least_one(p, args, "count", "rounds")
    if args.memory < 16:
        p.error("--memory must be at least 16")
    return args


def _final_cleanup(lv: Libvirt) -> None:
    """Remove the benchmark's guests whatever happened (reconnecting if need be)."""
    if not lv.opened:
        return  # never connected: this run made nothing (and another run may hold the lock)
    for _ in range(3):
        try:
            if lv.conn is None:
                lv.open(READY_TIMEOUT)
            remove_guests(lv.conn, PREFIX)
            break
        except (BenchError, libvirt.libvirtError) as exc:
            print(f"bench/vm.py: cleanup: {exc}", file=sys.stderr)
            lv.close()
    lv.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.count, args.rounds, args.memory, args.settle, args.agent_set)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised
    run = Run({key(p, c): Series() for c in opts.counts for p in PATHS}, os.getloadavg())
    lv = Libvirt()
    agent: Server | None = None
    try:
        take_guest_lock()
        with tempfile.TemporaryDirectory(prefix="virtnode-bench-") as tmpdir:
            try:
                lv.open(OPEN_TIMEOUT)
                run.removed_at_start = remove_guests(lv.conn, PREFIX)
                run.foreign_vms_before = foreign_running(lv.conn)
                agent = start_agent(Path(tmpdir), URI, overrides=opts.agent_set)
                asyncio.run(run_bench(agent, lv, opts, run))
                run.foreign_vms_after = foreign_running(lv.conn)
            finally:
                if agent is not None:
                    agent.stop()
                _final_cleanup(lv)
    except (BenchError, OSError, libvirt.libvirtError) as exc:
        print(f"bench/vm.py: {exc}", file=sys.stderr)
        return 2
    run.load_after = os.getloadavg()
    verdict = evaluate(run, opts)
    if args.json:
        report = {
            "benchmark": f"VM create and start on {URI}: agent VM.create vs libvirt-python",
            "machine": _machine(),
            "options": {**asdict(opts), "counts": list(opts.counts)},
            "load_average": {"before": run.load_before, "after": run.load_after},
            "other_running_vms": {"before": run.foreign_vms_before,
                                  "after": run.foreign_vms_after},
            "removed_at_start": run.removed_at_start,
            "retries": run.retries,
            "results": {
                name: {"rounds": asdict(s),
                       "median": {k: s.median(k) for k, v in asdict(s).items() if v}}
                for name, s in run.series.items()
            },
            **verdict,
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(run, verdict, opts)
    return 0 if all(t["passed"] for t in verdict["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

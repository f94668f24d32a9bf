"""Event fan-out benchmark: many WebSocket subscribers, a steady stream of events.

The agent runs in this process (``virtnode.daemon.Agent`` on ``test:///default`` with a
private state directory and a unix socket), so the benchmark can publish on its event bus
at a fixed rate: ``--rate`` events per second for ``--seconds``, each journaled in the
state store and delivered to every subscriber exactly as the agent's own events are.
The subscribers are ``--subscribers`` WebSocket connections, each with one
``Events.subscribe {topics: ["bench.*"]}``, spread over ``--procs`` client processes
(this script with ``--subscriber``), so that decoding 100,000 frames a second is not
measured against the agent on the same core.

Each subscriber records, per event, the receive time minus the event's ``time`` (set
at publish), and checks that the seqs it got are exactly the ones published: nothing
lost, nothing twice, in order. Reported: latency percentiles over all deliveries, loss,
the agent process's CPU time during the run (the publishing loop included) and the
subscribers' CPU. Target: p99 < 50 ms and no loss. The exit status is 1 if a target is
missed, 2 if the benchmark could not run.

    .venv/bin/python bench/events.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from virtnode.config import build_config
from virtnode.daemon import Agent

from common import (
    READY_TIMEOUT,
    BenchError,
    JsonObject,
    cpu_seconds,
    machine,
    percentile,
    print_targets,
    require_at_least_one,
)

TARGET_P99_MS = 50.0
TOPIC = "bench.tick"
END_TOPIC = "bench.end"
#: Publishing happens in slices of this many seconds (a timer per slice, not per event).
SLICE = 0.005
SELF = str(Path(__file__).resolve())
#: The start of an event notification as the agent writes it.
HEAD = re.compile(r'\{"jsonrpc":"2.0","method":"event","params":\{"epoch":"[^"]*",'
                  r'"seq":(\d+),"topic":"([^"]*)","time":([-+.0-9eE]+),')


# --- subscriber processes ------------------------------------------------------------------


async def _subscriber(session: aiohttp.ClientSession, ready: asyncio.Event,
                      stats: JsonObject) -> None:
    async with session.ws_connect("http://localhost/rpc", max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "Events.subscribe",
                                      "params": {"topics": ["bench.*"]}}))
        answer = json.loads((await ws.receive()).data)
        stats["first_seq"] = answer["result"]["last_seq"] + 1
        ready.set()
        latencies: list[int] = stats["latencies_us"]
        seqs: list[int] = []
        clock = time.time
        async for msg in ws:
            now = clock()
            # The few fields needed, without decoding the whole message: the client's
            # CPU is not what is measured, and it shares the machine with the agent.
            head = HEAD.match(msg.data)
            if head is None:
                stats["other"].append(json.loads(msg.data).get("method"))
                continue
            if head[2] == END_TOPIC:
                break
            latencies.append(int((now - float(head[3])) * 1e6))
            seqs.append(int(head[1]))
        stats["count"] = len(seqs)
        stats["in_order_no_repeats"] = all(b > a for a, b in itertools.pairwise(seqs))
        stats["seqs"] = [seqs[0], seqs[-1]] if seqs else []


async def run_subscribers(socket_path: str, count: int) -> None:
    """Open ``count`` subscriptions, say "ready", and report what each got as JSON."""
    stats: list[JsonObject] = [{"latencies_us": [], "other": []} for _ in range(count)]
    readies = [asyncio.Event() for _ in range(count)]
    connector = aiohttp.UnixConnector(path=socket_path, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(_subscriber(session, r, s))
                 for r, s in zip(readies, stats, strict=True)]
        await asyncio.gather(*(r.wait() for r in readies))
        print("ready", flush=True)
        await asyncio.gather(*tasks)
    cpu = cpu_seconds(os.getpid())
    print(json.dumps({"subscribers": stats, "cpu_s": cpu}), flush=True)


# --- the agent and the publisher -----------------------------------------------------------


async def _start_subscribers(socket_path: str, procs: int,
                             subscribers: int) -> list[asyncio.subprocess.Process]:
    share = [subscribers // procs + (1 if i < subscribers % procs else 0) for i in range(procs)]
    children = []
    for count in share:
        children.append(await asyncio.create_subprocess_exec(
            sys.executable, SELF, "--subscriber", socket_path,
            str(count), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE))
    for child in children:
        assert child.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT):
            line = await child.stdout.readline()
        if line.strip() != b"ready":
            raise BenchError(f"a subscriber process did not start: {line!r}")
    return children


async def publish(agent: Agent, rate: int, seconds: float) -> int:
    """Publish ``rate`` events a second for ``seconds``, paced by the clock; the count."""
    loop = asyncio.get_running_loop()
    bus = agent.bus
    start = loop.time()
    published = 0
    total = int(rate * seconds)
    payload = "x" * 100  # about the size of a vm.lifecycle event
    while published < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while published < due:
            bus.publish(TOPIC, {"n": published, "pad": payload})
            published += 1
        await asyncio.sleep(SLICE)
    return published


async def run(opts: argparse.Namespace) -> JsonObject:
    with tempfile.TemporaryDirectory(prefix="virtnode-bench-events-") as tmp:
        socket_path = Path(tmp) / "agent.sock"
        config = build_config({
            "server": {"listen": [f"unix:{socket_path}"]},
            "hypervisor": {"uri": "test:///default"},
            "state": {"dir": str(Path(tmp) / "state")},
            "devices": {"source": "off"},
            "events": {"subscriber_queue": opts.subscriber_queue},
        })
        agent = Agent(config)
        await agent.start()
        children: list[asyncio.subprocess.Process] = []
        try:
            children = await _start_subscribers(str(socket_path), opts.procs,
                                                opts.subscribers)
            cpu_before = cpu_seconds(os.getpid())
            wall_before = time.perf_counter()
            published = await publish(agent, opts.rate, opts.seconds)
            agent.bus.publish(END_TOPIC, {})
            await agent.bus.flush()
            publish_wall = time.perf_counter() - wall_before
            reports = []
            for child in children:
                assert child.stdout is not None
                async with asyncio.timeout(120):
                    out = await child.stdout.read()
                    await child.wait()
                reports.append(json.loads(out))
            drain_wall = time.perf_counter() - wall_before
            agent_cpu = cpu_seconds(os.getpid()) - cpu_before
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            await agent.stop()
    return summarize(opts, published, reports,
                     {"agent_cpu": agent_cpu, "publish_wall": publish_wall,
                      "drain_wall": drain_wall})


def summarize(opts: argparse.Namespace, published: int, reports: list[JsonObject],
              times: dict[str, float]) -> JsonObject:
    agent_cpu, publish_wall = times["agent_cpu"], times["publish_wall"]
    subs = [s for report in reports for s in report["subscribers"]]
    latencies = sorted(v for s in subs for v in s["latencies_us"])
    lost = sum(published - s["count"] for s in subs)
    disordered = sum(1 for s in subs if not s["in_order_no_repeats"])
    notices = sorted({m for s in subs for m in s["other"]})
    def ms(pct: float) -> float:
        # Latencies are whole microseconds; so are the percentiles shown.
        return round(percentile(latencies, pct) / 1000, 3)

    p99 = ms(99)
    return {
        "benchmark": "event fan-out over WebSocket (agent in-process, test:///default)",
        "machine": machine(aiohttp=aiohttp.__version__),
        "options": {k: getattr(opts, k) for k in ("subscribers", "procs", "rate", "seconds",
                                                  "subscriber_queue")},
        "published": published,
        "deliveries": len(latencies),
        "lost": lost,
        "subscribers_out_of_order": disordered,
        "other_notifications": notices,
        "latency_ms": {"p50": ms(50), "p90": ms(90), "p99": p99, "max": ms(100)},
        "agent_cpu_s": round(agent_cpu, 2),
        "agent_cpu_percent_of_one_core": round(100 * agent_cpu / publish_wall, 1),
        "subscriber_cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
        "publish_wall_s": round(publish_wall, 2),
        "until_all_received_s": round(times["drain_wall"], 2),
        "targets": [
            {"name": "p99 publish-to-receive (ms)", "value": p99,
             "target": f"< {TARGET_P99_MS:.0f}", "passed": p99 < TARGET_P99_MS},
            {"name": "events lost", "value": lost, "target": "0",
             "passed": lost == 0 and disordered == 0 and not notices},
        ],
    }


def print_table(result: JsonObject) -> None:
    info, opts, lat = result["machine"], result["options"], result["latency_ms"]
    print(f"machine: {info['cpus']} x {info['cpu_model']}; Python {info['python']}, "
          f"aiohttp {info['aiohttp']}; virtnode {info['virtnode']}")
    print(f"{opts['subscribers']} subscribers in {opts['procs']} processes; "
          f"{opts['rate']} events/s for {opts['seconds']} s")
    print()
    print(f"published {result['published']}, deliveries {result['deliveries']}, "
          f"lost {result['lost']}, out of order {result['subscribers_out_of_order']}")
    print(f"publish-to-receive ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
          f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}")
    print(f"agent CPU {result['agent_cpu_s']} s ({result['agent_cpu_percent_of_one_core']}% "
          f"of one core); subscribers' CPU {result['subscriber_cpu_s']} s; all received "
          f"{result['until_all_received_s']} s after the first publish")
    print()
    print_targets(result["targets"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--subscribers", type=int, default=50)
    p.add_argument("--procs", type=int, default=2, help="subscriber processes")
    p.add_argument("--rate", type=int, default=2000, help="events per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--subscriber-queue", type=int, default=10_000,
                   help="the agent's events.subscriber_queue")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--subscriber", nargs=2, metavar=("SOCKET", "COUNT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    require_at_least_one(p, args, "subscribers", "procs", "rate")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.subscriber:
        asyncio.run(run_subscribers(args.subscriber[0], int(args.subscriber[1])))
        return 0
    try:
        result = asyncio.run(run(args))
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"bench/events.py: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0 if all(t["passed"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

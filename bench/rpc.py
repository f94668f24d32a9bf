"""RPC round-trip benchmark: ``Host.ping`` over one WebSocket, against a raw echo baseline.

Starts two servers in their own subprocesses, each on a free loopback port:

* the agent (``python -m virtnode serve``, hypervisor ``test:///default``, a private
  temporary state directory, log level ``warning``);
* a minimal aiohttp WebSocket server (this script with ``--echo-server PORT``) that parses
  each text message as JSON and answers it with a JSON-RPC-shaped response, the least
  work comparable to what the agent does for ``Host.ping``.

Both are measured with the same lean client on one connection each:

* sequential: send a request, wait for its response, repeat; latency percentiles;
* pipelined: keep ``--window`` requests in flight (a new one is sent as each response
  arrives) for ``--pipelined`` calls; requests per second.

Each measurement runs ``--rounds`` times, alternating between the two servers, and the
median is reported. The targets are checked at the end: the exit status is 1 if one is
missed, 2 if the benchmark could not run.

    .venv/bin/python bench/rpc.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from common import (
    BenchError,
    JsonObject,
    Server,
    cpu_seconds,
    free_port,
    machine,
    percentile,
    print_targets,
    require_at_least_one,
    spawn,
    start_agent,
    wait_ready,
)

#: Targets: agent pipelined throughput relative to the echo server's, and sequential p50.
TARGET_THROUGHPUT_RATIO = 0.50
TARGET_P50_US = 300.0

REQUEST = '{"jsonrpc":"2.0","method":"Host.ping","params":{},"id":%d}'
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Longest a warm-up or a round against one server may take before the run is abandoned.
ROUND_TIMEOUT = 600.0

# --- the baseline server -------------------------------------------------------------------


def _encode(obj: Any) -> str:
    # The same serialisation the agent uses for its responses.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


async def _echo_rpc(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_SIZE, heartbeat=30.0, compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            req = json.loads(msg.data)
            await ws.send_str(
                _encode({"jsonrpc": "2.0", "result": {"time": time.time()}, "id": req.get("id")})
            )
    return ws


async def _echo_health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def run_echo_server(port: int) -> int:
    """Serve the baseline on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    app = web.Application()
    app.router.add_get("/rpc", _echo_rpc)
    app.router.add_get("/healthz", _echo_health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                handle_signals=True)
    return 0


# --- server subprocesses -------------------------------------------------------------------


def start_echo(tmp: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--echo-server", str(port)]
    return spawn("echo", argv, f"tcp://127.0.0.1:{port}", tmp / "echo.log")


# --- the client ----------------------------------------------------------------------------


def _text(msg: aiohttp.WSMessage) -> str:
    if msg.type is not WSMsgType.TEXT:
        raise BenchError(f"unexpected WebSocket message {msg.type!r}: {msg.data!r}")
    return str(msg.data)


async def sequential(ws: aiohttp.ClientWebSocketResponse, first_id: int, count: int) -> list[int]:
    """``count`` round trips one after the other; their durations in nanoseconds."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    for req_id in range(first_id, first_id + count):
        started = clock()
        await ws.send_str(REQUEST % req_id)
        msg = await ws.receive()
        samples.append(clock() - started)
        response = json.loads(_text(msg))
        if response.get("id") != req_id or "result" not in response:
            raise BenchError(f"unexpected response to request {req_id}: {msg.data!r}")
    return samples


async def pipelined(ws: aiohttp.ClientWebSocketResponse, first_id: int, count: int,
                    window: int) -> float:
    """``count`` calls with ``window`` in flight; requests per second."""
    clock = time.perf_counter_ns
    next_id = first_id
    end_id = first_id + count
    received = 0
    started = clock()
    while next_id < min(first_id + window, end_id):
        await ws.send_str(REQUEST % next_id)
        next_id += 1
    while received < count:
        data = _text(await ws.receive())
        if '"result"' not in data:
            raise BenchError(f"unexpected response: {data!r}")
        received += 1
        if next_id < end_id:
            await ws.send_str(REQUEST % next_id)
            next_id += 1
    elapsed = clock() - started
    return count / (elapsed / 1e9)


# --- measurement ---------------------------------------------------------------------------


@dataclass
class Figures:
    """The figures of one server: one entry per round, and their medians."""

    p50_us: list[float] = field(default_factory=list)
    p90_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    throughput_rps: list[float] = field(default_factory=list)
    server_cpu_us: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values)


@dataclass
class Options:
    warmup: int
    calls: int
    pipelined: int
    window: int
    rounds: int


@dataclass
class Connection:
    """The client's WebSocket to one server; request ids are unique on it."""

    server: Server
    ws: aiohttp.ClientWebSocketResponse
    next_id: int = 1

    def ids(self, count: int) -> int:
        """Reserve ``count`` request ids; returns the first."""
        first = self.next_id
        self.next_id += count
        return first


async def warm_up(conn: Connection, opts: Options) -> None:
    """Both patterns once, so caches, the allocator and the TCP path settle."""
    await sequential(conn.ws, conn.ids(opts.warmup), opts.warmup)
    await pipelined(conn.ws, conn.ids(opts.warmup), opts.warmup, opts.window)


async def measure_round(conn: Connection, opts: Options, figures: Figures) -> None:
    samples = await sequential(conn.ws, conn.ids(opts.calls), opts.calls)
    figures.p50_us.append(percentile(samples, 50) / 1000)
    figures.p90_us.append(percentile(samples, 90) / 1000)
    figures.p99_us.append(percentile(samples, 99) / 1000)
    cpu_before = cpu_seconds(conn.server.pid)
    rps = await pipelined(conn.ws, conn.ids(opts.pipelined), opts.pipelined, opts.window)
    figures.throughput_rps.append(rps)
    figures.server_cpu_us.append((cpu_seconds(conn.server.pid) - cpu_before) * 1e6 / opts.pipelined)


@contextlib.asynccontextmanager
async def _deadline(server: Server, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(ROUND_TIMEOUT):
            yield
    except TimeoutError:
        raise BenchError(f"{server.name} took more than {ROUND_TIMEOUT:.0f}s for {what}:\n"
                         f"{server.log_tail()}") from None


async def run_bench(servers: list[Server], opts: Options) -> dict[str, Figures]:
    figures = {server.name: Figures() for server in servers}
    async with aiohttp.ClientSession() as session:
        for server in servers:
            await wait_ready(server)
        conns: list[Connection] = []
        try:
            for server in servers:
                ws = await session.ws_connect(server.ws_url, max_msg_size=MAX_MESSAGE_SIZE)
                conns.append(Connection(server, ws))
                async with _deadline(server, "warm-up"):
                    await warm_up(conns[-1], opts)
            for _ in range(opts.rounds):
                for conn in conns:
                    async with _deadline(conn.server, "a round"):
                        await measure_round(conn, opts, figures[conn.server.name])
        finally:
            for conn in conns:
                await conn.ws.close()
    return figures


# --- report --------------------------------------------------------------------------------


def _machine() -> JsonObject:
    return machine(aiohttp=aiohttp.__version__)


def evaluate(figures: dict[str, Figures]) -> JsonObject:
    agent, echo = figures["agent"], figures["echo"]
    ratio = agent.median("throughput_rps") / echo.median("throughput_rps")
    p50 = agent.median("p50_us")
    return {
        "throughput_ratio": ratio,
        "agent_p50_us": p50,
        "targets": [
            {
                "name": "pipelined throughput, agent / echo",
                "value": ratio,
                "target": f">= {TARGET_THROUGHPUT_RATIO:.0%}",
                "passed": ratio >= TARGET_THROUGHPUT_RATIO,
            },
            {
                "name": "sequential p50, agent (us)",
                "value": p50,
                "target": f"< {TARGET_P50_US:.0f} us",
                "passed": p50 < TARGET_P50_US,
            },
        ],
    }


def print_table(figures: dict[str, Figures], verdict: JsonObject, opts: Options) -> None:
    info = _machine()
    print(f"machine: {info['cpus']} x {info['cpu_model']}; Python {info['python']}, "
          f"aiohttp {info['aiohttp']}")
    print(f"Host.ping over one WebSocket on 127.0.0.1; {opts.rounds} round(s), medians shown; "
          f"sequential {opts.calls} calls, pipelined {opts.pipelined} calls "
          f"(window {opts.window})")
    print()
    agent, echo = figures["agent"], figures["echo"]
    print(f"{'':<26}{'echo':>12}{'agent':>12}{'agent/echo':>12}")
    rows = [
        ("sequential p50 (us)", "p50_us", "{:.0f}"),
        ("sequential p90 (us)", "p90_us", "{:.0f}"),
        ("sequential p99 (us)", "p99_us", "{:.0f}"),
        ("pipelined (req/s)", "throughput_rps", "{:.0f}"),
        ("server CPU per call (us)", "server_cpu_us", "{:.1f}"),
    ]
    for label, name, fmt in rows:
        e, a = echo.median(name), agent.median(name)
        print(f"{label:<26}{fmt.format(e):>12}{fmt.format(a):>12}{a / e:>11.2f}x")
    if opts.rounds > 1:
        spread = ", ".join(f"{v:.0f}" for v in agent.throughput_rps)
        print(f"{'agent req/s by round':<26}{spread}")
        spread = ", ".join(f"{v:.0f}" for v in echo.throughput_rps)
        print(f"{'echo req/s by round':<26}{spread}")
    print()
    print_targets(verdict["targets"], lambda t: f"{t['value']:.0%}" if "/" in t["name"]
                  else f"{t['value']:.0f} us")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--warmup", type=int, default=1000, help="warm-up calls per pattern")
    p.add_argument("--calls", type=int, default=5000, help="timed sequential calls per round")
    p.add_argument("--pipelined", type=int, default=50_000,
                   help="pipelined calls per round")
    p.add_argument("--window", type=int, default=64,
                   help="requests in flight when pipelining (the agent allows 64)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per server, alternating; medians are reported")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    require_at_least_one(p, args, "warmup", "calls", "pipelined", "window", "rounds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server is not None:
        return run_echo_server(args.echo_server)
    opts = Options(args.warmup, args.calls, args.pipelined, args.window, args.rounds)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="virtnode-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            servers.append(start_echo(tmp))
            servers.append(start_agent(tmp, "test:///default",
                                          listen=f"tcp://127.0.0.1:{free_port()}"))
            figures = asyncio.run(run_bench(servers, opts))
        except (BenchError, aiohttp.ClientError, OSError) as exc:
            print(f"bench/rpc.py: {exc}", file=sys.stderr)
            return 2
        finally:
            for server in reversed(servers):
                server.stop()
    verdict = evaluate(figures)
    if args.json:
        report = {
            "benchmark": "Host.ping over one WebSocket (127.0.0.1)",
            "machine": _machine(),
            "options": asdict(opts),
            "results": {
                name: {"rounds": asdict(f), "median": {k: f.median(k) for k in asdict(f)}}
                for name, f in figures.items()
            },
            **verdict,
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(figures, verdict, opts)
    return 0 if all(t["passed"] for t in verdict["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

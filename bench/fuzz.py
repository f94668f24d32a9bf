"""Fuzz benchmark: many hostile messages against an agent process, measured while they run.

An agent (``python -m virtnode serve`` on ``test:///default``, with a unix socket and a
loopback TCP listener) is sent messages drawn by ``tests/fuzzing.py`` from api_schema:
half as a reader over ``POST /rpc`` on TCP, half as an admin over one WebSocket on the unix
socket (every method but those that would change the host's networks or make storage
domains where the caller says). Then three attacks run against it:

* a WebSocket client that sends ``Api.describe`` requests and never reads (600 KB of
  them), holding its connection for a few seconds;
* a batch of 1,000,000 entries;
* 1,100 connections that send nothing, and some that send a header line now and then.

Meanwhile one thread asks ``GET /healthz`` every 50 ms on a new connection and another
samples the agent's RSS and open descriptors. Reported: inputs sent (messages, and the
requests in them), every answer with ``-32603`` (internal error) and every message left
unanswered, ``/healthz`` p50/p99/max during the fuzz and during the attacks, RSS and
descriptors at the start, at their peak and at the end (after the attacks' connections
are closed and the agent's timeouts have passed).

Targets: at least 100,000 inputs, 0 internal errors, 0 unanswered, ``/healthz`` p99 under
100 ms during the fuzz, descriptors back to their start, RSS back within 32 MiB of it.
The exit status is 1 if a target is missed, 2 if the benchmark could not run.

    .venv/bin/python bench/fuzz.py [--examples 100000] [--json] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from hypothesis import HealthCheck, given, seed, settings

from common import BenchError, Server, free_port, machine, percentile, print_targets, spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import Exchange, Sent, messages, post, problems
from tests.rawws import BlockingWebSocket
from virtnode.rpc.schema import load_schema
from virtnode.util.jsontypes import JsonObject

MiB = 1024 * 1024
HEALTH_EVERY = 0.05
SAMPLE_EVERY = 0.25


@dataclass
class Tally:
    messages: int = 0
    requests: int = 0
    internal: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def record(self, sent: Sent, answer: bytes | None, status: int) -> None:
        self.messages += 1
        self.requests += max(1, sent.data.count(b'"jsonrpc"'))
        for problem in problems(sent, answer, status):
            where = f"{problem} <- {sent.data[:300]!r}"
            if problem.startswith("internal error"):
                self.internal.append(where)
            elif problem == "no answer":
                self.unanswered.append(where)
            else:
                self.other.append(where)


#: Run in its own process, so that drawing the fuzz's examples in this one (which holds
#: the GIL for long stretches) does not delay it: asks /healthz on a new connection every
#: HEALTH_EVERY seconds and prints "MONOTONIC SECONDS" or "MONOTONIC fail REASON".
HEALTH_PROBE = """
import http.client, sys, time
port, every = int(sys.argv[1]), float(sys.argv[2])
while True:
    started = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                          source_address=("127.0.0.2", 0))
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
        line = f"{started} {time.monotonic() - started}" if status == 200 else \\
            f"{started} fail HTTP {status}"
    except OSError as exc:
        line = f"{started} fail {exc}"
    print(line, flush=True)
    time.sleep(every)
"""


class Monitor:
    """/healthz latency (from a child process) and the agent's RSS and descriptors."""

    def __init__(self, port: int, pid: int) -> None:
        self._port = port
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._probe: subprocess.Popen[str] | None = None
        self._phases: list[tuple[float, str]] = [(0.0, "start")]
        self.latencies: list[tuple[str, float]] = []
        self.failures: list[tuple[str, str]] = []
        self.samples: list[tuple[float, int, int]] = []
        self._threads = [threading.Thread(target=self._read_probe, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]

    @property
    def phase(self) -> str:
        return self._phases[-1][1]

    @phase.setter
    def phase(self, name: str) -> None:
        self._phases.append((time.monotonic(), name))

    def _phase_at(self, when: float) -> str:
        return [name for start, name in self._phases if start <= when][-1]

    def __enter__(self) -> Monitor:
        self._probe = subprocess.Popen(
            [sys.executable, "-c", HEALTH_PROBE, str(self._port), str(HEALTH_EVERY)],
            stdout=subprocess.PIPE, text=True)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._probe is not None:
            self._probe.terminate()
            self._probe.wait()
        for thread in self._threads:
            thread.join()

    def _read_probe(self) -> None:
        assert self._probe is not None and self._probe.stdout is not None
        for line in self._probe.stdout:
            when, _, rest = line.strip().partition(" ")
            phase = self._phase_at(float(when))
            if rest.startswith("fail"):
                self.failures.append((phase, rest))
            else:
                self.latencies.append((phase, float(rest)))

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.samples.append(self.now())

    def now(self) -> tuple[float, int, int]:
        return (time.monotonic(), self._process.memory_info().rss,
                self._process.num_fds())

    def latency(self, phase: str) -> JsonObject:
        values = [v for p, v in self.latencies if p == phase]
        if not values:
            return {"count": 0}
        return {"count": len(values), "p50_ms": round(percentile(values, 50) * 1000, 2),
                "p99_ms": round(percentile(values, 99) * 1000, 2),
                "max_ms": round(max(values) * 1000, 2),
                "failures": sum(1 for p, _ in self.failures if p == phase)}


#: Sends one message; returns the HTTP status (200 on a WebSocket) and the answer.
Send = Callable[[Sent], tuple[int, bytes | None]]


def fuzz(send: Send, strategy: Any, examples: int, run_seed: int, tally: Tally) -> None:
    @seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(sent: Sent) -> None:
        try:
            status, answer = send(sent)
        except AssertionError as exc:
            tally.other.append(f"{exc} <- {sent.data[:300]!r}")
            return
        tally.record(sent, answer, status)

    one()


# --- the attacks ---------------------------------------------------------------------------


def non_reading_client(port: int, hold: float) -> int:
    """600 KB of Api.describe requests from a client that never reads; bytes it got out."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    ws = BlockingWebSocket(sock, f"127.0.0.1:{port}")
    request = json.dumps({"jsonrpc": "2.0", "method": "Api.describe", "id": 1}).encode()
    sent = 0
    sock.settimeout(hold)
    with contextlib.suppress(OSError):
        while sent < 600 * 1024:
            ws.send(request)
            sent += len(request)
    time.sleep(hold)
    sock.close()
    return sent


def million_batch(port: int) -> JsonObject:
    data = b"[" + b",".join([b"1"] * 1_000_000) + b"]"
    started = time.perf_counter()
    status, answer = post(port, data)
    return {"seconds": round(time.perf_counter() - started, 3), "status": status,
            "answer": (answer or b"")[:200].decode(errors="replace")}


def connection_flood(port: int, count: int, hold: float) -> int:
    held = []
    for i in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            break
        if i % 5 == 0:
            with contextlib.suppress(OSError):
                sock.send(b"GET /healthz HTTP/1.1\r\n")
        held.append(sock)
    time.sleep(hold)
    for sock in held:
        sock.close()
    return len(held)


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def agent(tmp: Path) -> Iterator[tuple[Server, int, str]]:
    port = free_port()
    unix = tmp / "agent.sock"
    config = tmp / "agent.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["unix:{unix}", "tcp://127.0.0.1:{port}"]\n'
        "[hypervisor]\n"
        'uri = "test:///default"\n'
        "[state]\n"
        f'dir = "{tmp / "state"}"\n'
        "[log]\n"
        'level = "warning"\n')
    server = spawn("agent", [sys.executable, "-m", "virtnode", "serve", "--config", str(config)],
                   f"tcp://127.0.0.1:{port}", tmp / "agent.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            server.check_alive()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the agent did not start:\n{server.log_tail()}")
            time.sleep(0.1)
        yield server, port, str(unix)
    finally:
        server.stop()


def run(opts: argparse.Namespace) -> JsonObject:
    schema = load_schema()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="virtnode-fuzz-") as tmp, \
            agent(Path(tmp)) as (server, port, unix):
        time.sleep(1.0)  # let the first statistics samples settle
        with Monitor(port, server.pid) as monitor:
            start = monitor.now()
            monitor.phase = "fuzz"
            started = time.monotonic()
            half = opts.examples // 2
            fuzz(lambda sent: post(port, sent.data), messages(schema, reader=True), half,
                 opts.seed, tally)
            exchange = Exchange(unix)
            try:
                fuzz(lambda sent: (200, exchange(sent.data, sent.must_answer)),
                     messages(schema, reader=False), opts.examples - half, opts.seed + 1, tally)
            finally:
                exchange.close()
            fuzz_seconds = time.monotonic() - started
            after_fuzz = monitor.now()
            monitor.phase = "attacks"
            attacks = {
                "non_reading_client_bytes": non_reading_client(port, hold=5.0),
                "million_batch": million_batch(port),
                "connection_flood_held": connection_flood(port, 1100, hold=5.0),
            }
            monitor.phase = "settle"
            time.sleep(opts.settle)
            end = monitor.now()
            server.check_alive()
        peak_rss = max(s[1] for s in monitor.samples) if monitor.samples else end[1]
        peak_fds = max(s[2] for s in monitor.samples) if monitor.samples else end[2]
        log = server.log_path.read_text(errors="replace")
    return {
        "machine": machine(),
        "examples": opts.examples,
        "seed": opts.seed,
        "messages": tally.messages,
        "requests": tally.requests,
        "fuzz_seconds": round(fuzz_seconds, 1),
        "internal_errors": len(tally.internal),
        "unanswered": len(tally.unanswered),
        "other_problems": len(tally.other),
        "samples": {"internal": tally.internal[:20], "unanswered": tally.unanswered[:20],
                    "other": tally.other[:20]},
        "healthz": {phase: monitor.latency(phase) for phase in ("fuzz", "attacks", "settle")},
        "rss_mib": {"start": round(start[1] / MiB, 1), "after_fuzz": round(after_fuzz[1] / MiB, 1),
                    "peak": round(peak_rss / MiB, 1), "end": round(end[1] / MiB, 1)},
        "fds": {"start": start[2], "after_fuzz": after_fuzz[2], "peak": peak_fds, "end": end[2]},
        "attacks": attacks,
        "log_lines": len(log.splitlines()),
        "log_tracebacks": log.count("Traceback"),
    }


def evaluate(result: JsonObject) -> list[JsonObject]:
    rss, fds, health = result["rss_mib"], result["fds"], result["healthz"]["fuzz"]
    return [
        {"name": "inputs (requests)", "value": result["requests"], "target": ">= 100000",
         "passed": result["requests"] >= 100_000},
        {"name": "internal errors", "value": result["internal_errors"], "target": "0",
         "passed": result["internal_errors"] == 0},
        {"name": "unanswered", "value": result["unanswered"], "target": "0",
         "passed": result["unanswered"] == 0},
        {"name": "/healthz p99 during the fuzz, ms", "value": health.get("p99_ms"),
         "target": "< 100", "passed": health.get("count", 0) > 0 and health["p99_ms"] < 100},
        {"name": "descriptors end - start", "value": fds["end"] - fds["start"],
         "target": "<= 2", "passed": fds["end"] - fds["start"] <= 2},
        {"name": "RSS end - start, MiB", "value": round(rss["end"] - rss["start"], 1),
         "target": "< 32", "passed": rss["end"] - rss["start"] < 32},
        {"name": "tracebacks in the agent's log", "value": result["log_tracebacks"],
         "target": "0", "passed": result["log_tracebacks"] == 0},
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000,
                        help="messages to draw (half per caller)")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds after the attacks before the end figures")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    try:
        result = run(opts)
    except BenchError as exc:
        print(f"fuzz benchmark could not run: {exc}", file=sys.stderr)
        return 2
    targets = evaluate(result)
    result["targets"] = targets
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        for kind in ("internal", "unanswered", "other"):
            for line in result["samples"][kind][:5]:
                print(f"{kind}: {line}")
        print_targets(targets)
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Start-to-ready benchmark: from starting ``virtnode serve`` to its first ``/healthz`` 200.

Each round spawns the agent (``python -m virtnode serve``, hypervisor ``test:///default``,
a new private state directory, a unix socket listener, log level ``warning``) and polls
``GET /healthz`` on its socket every 5 ms; the time is from just before the spawn to the
first 200, so it holds the interpreter's start, the imports, loading the schema, opening
the state store and binding the listener. The agent is stopped (SIGTERM) after each round.

With ``--python`` naming other interpreters (another checkout's ``.venv/bin/python``), the
rounds alternate between them and this one, so that a change is compared with what it
replaced on the same machine in the same minutes. The target is checked at the end: the
exit status is 1 if it is missed, 2 if the benchmark could not run.

    .venv/bin/python bench/start.py [--rounds 15] [--python OTHER/.venv/bin/python] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from common import BenchError, Server, machine, print_targets, start_agent

#: Target: the agent answers /healthz within this many seconds of being started.
TARGET_SECONDS = 1.0
POLL = 0.005
GIVE_UP = 30.0


async def _ready(server: Server) -> None:
    socket_path = server.url.removeprefix("unix:")
    deadline = time.monotonic() + GIVE_UP
    while True:
        server.check_alive()
        try:
            connector = aiohttp.UnixConnector(path=socket_path)
            async with (aiohttp.ClientSession(connector=connector) as session,
                        session.get("http://localhost/healthz") as resp):
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"no /healthz 200 within {GIVE_UP:.0f}s:\n{server.log_tail()}")
        await asyncio.sleep(POLL)


def one_round(python: str) -> float:
    with tempfile.TemporaryDirectory(prefix="virtnode-bench-start-") as tmp:
        started = time.perf_counter()
        server = start_agent(Path(tmp), "test:///default", python=python)
        try:
            asyncio.run(_ready(server))
            return time.perf_counter() - started
        finally:
            server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=15, help="starts per interpreter")
    p.add_argument("--python", action="append", default=[], metavar="PATH",
                   help="another interpreter to compare with this one (repeatable)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    pythons = [sys.executable, *opts.python]
    times: dict[str, list[float]] = {p: [] for p in pythons}
    try:
        one_round(sys.executable)  # warm the page cache and the byte-compiled files
        for _ in range(opts.rounds):
            for python in pythons:
                times[python].append(one_round(python))
    except BenchError as exc:
        print(f"bench/start.py: {exc}", file=sys.stderr)
        return 2
    figures = {p: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "rounds": len(t)} for p, t in times.items()}
    ours = figures[sys.executable]["median_s"]
    targets = [{"name": "start to ready, median (s)", "value": round(ours, 3),
                "target": f"< {TARGET_SECONDS:.1f}", "passed": ours < TARGET_SECONDS}]
    if opts.json:
        print(json.dumps({"machine": machine(), "figures": figures, "targets": targets},
                         indent=2))
    else:
        for python, fig in figures.items():
            print(f"{python}: median {fig['median_s'] * 1000:.0f} ms "
                  f"({fig['min_s'] * 1000:.0f}-{fig['max_s'] * 1000:.0f}), "
                  f"{fig['rounds']} starts")
        print_targets(targets)
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

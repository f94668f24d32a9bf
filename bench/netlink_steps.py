"""Netlink layer benchmark: steps applied per second, and reading a host with many links.

In a network namespace of its own (``vn-bench-<8 hex>``, deleted at the end) it makes
``--ports`` veth pairs (both ends inside, so the namespace holds 2 x ports + 1 links),
then measures:

* **steps**: for each port, ``add_bridge brN`` + ``set_master vethN brN`` +
  ``set_up brN`` through :meth:`NetlinkHost.apply`, one step per call, each timed; then
  the same three operations for every port through ``ip -batch`` (one iproute2 process,
  one netlink socket: the raw baseline, reported per operation).
* **read**: :meth:`NetlinkHost.read_state` of the namespace, now with 3 x ports + 1
  links, ``--reads`` times; and ``ip -d -j link show`` + ``ip -j addr show`` + ``ip -j
  route show`` as the baseline.

Needs root. Prints a table, or JSON with ``--json``.

    .venv/bin/python bench/netlink_steps.py [--ports 100] [--reads 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence

from virtnode.network.kernel.netlink import NetlinkHost
from virtnode.network.model import Step


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def batch(ns: str, lines: Sequence[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".ip") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        start = time.perf_counter()
        ip("-n", ns, "-batch", script.name)
        return time.perf_counter() - start


def summary(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"count": len(ordered), "median_ms": statistics.median(ordered) * 1e3,
            "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1e3,
            "total_s": sum(ordered)}


def steps_part(ns: str, ports: int) -> dict[str, object]:
    per_action: dict[str, list[float]] = {"add_bridge": [], "set_master": [], "set_up": []}
    with NetlinkHost(ns) as host:
        host.read_state()  # opens the socket; not part of the figures
        start = time.perf_counter()
        for n in range(ports):
            for step in (Step("add_bridge", f"br{n}", {"stp": False, "vlan_filtering": False}),
                         Step("set_master", f"veth{n}", {"master": f"br{n}"}),
                         Step("set_up", f"br{n}", {"up": True})):
                began = time.perf_counter()
                host.apply([step])
                per_action[step.action].append(time.perf_counter() - began)
        wall = time.perf_counter() - start
    every = [t for times in per_action.values() for t in times]
    return {"steps": summary(every), "by_action": {k: summary(v) for k, v in per_action.items()},
            "steps_per_second": len(every) / wall}


def raw_steps_part(ns: str, ports: int) -> float:
    """The same operations through ``ip -batch``, on a second set of bridges; ms each."""
    lines = [line for n in range(ports) for line in (
        f"link add bb{n} type bridge stp_state 0", f"link set veth{n} master bb{n}",
        f"link set bb{n} up")]
    return batch(ns, lines) / len(lines) * 1e3


def read_part(ns: str, reads: int) -> dict[str, object]:
    with NetlinkHost(ns) as host:
        state = host.read_state()
        times = []
        for _ in range(reads):
            began = time.perf_counter()
            host.read_state()
            times.append(time.perf_counter() - began)
    raw = []
    for _ in range(reads):
        began = time.perf_counter()
        for args in (("-d", "-j", "link", "show"), ("-j", "addr", "show"),
                     ("-j", "route", "show")):
            ip("-n", ns, *args)
        raw.append(time.perf_counter() - began)
    return {"links": len(state.links), "read_state": summary(times),
            "ip_json_three_commands": summary(raw)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    ns = f"vn-bench-{secrets.token_hex(4)}"
    ip("netns", "add", ns)
    try:
        batch(ns, [f"link add veth{n} type veth peer name vpeer{n}"
                   for n in range(options.ports)])
        results = {"steps": steps_part(ns, options.ports),
                   "read": read_part(ns, options.reads)}
        results["steps"]["ip_batch_per_operation_ms"] = raw_steps_part(ns, options.ports)
    finally:
        ip("netns", "del", ns)
    if options.json:
        print(json.dumps(results, indent=2))
        return
    steps, read = results["steps"], results["read"]
    assert isinstance(steps, dict) and isinstance(read, dict)
    print(f"steps: {steps['steps']['count']} in {steps['steps']['total_s']:.3f} s, "
          f"{steps['steps_per_second']:.0f}/s, median {steps['steps']['median_ms']:.2f} ms, "
          f"p95 {steps['steps']['p95_ms']:.2f} ms")
    for action, figures in steps["by_action"].items():
        print(f"  {action:<11} median {figures['median_ms']:.2f} ms, "
              f"p95 {figures['p95_ms']:.2f} ms")
    print(f"  ip -batch: {steps['ip_batch_per_operation_ms']:.2f} ms per operation")
    print(f"read_state, {read['links']} links: median {read['read_state']['median_ms']:.1f} ms,"
          f" p95 {read['read_state']['p95_ms']:.1f} ms; ip -j link+addr+route: median "
          f"{read['ip_json_three_commands']['median_ms']:.1f} ms")


if __name__ == "__main__":
    main()

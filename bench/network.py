"""Network.setup benchmark: one transaction making N bridged networks, one removing them,
through the agent against the same netlink operations done directly with pyroute2.

Everything happens in a network namespace of its own (``vn-bench-<8 hex>``, deleted at the
end) holding ``--networks`` veth pairs: the ``nicN`` ends are the networks' ports, the
``peerN`` ends stay down. The agent runs inside the namespace (``ip netns exec``) on
``test:///default`` and is driven over its unix socket; each round times

* **agent**: ``Network.setup`` of N networks ``netN`` (bridge + the port ``nicN``; every
  second one tagged with VLAN 100 + N when the kernel can tag), no connectivity check, from
  the call to the job's end (``Job.wait``); then the removal of all of them the same way.
* **raw**: the same links made and removed by pyroute2 on one socket: per network
  ``link add`` (bridge), ``link set master``, ``link set up`` x2 (and the VLAN entries),
  then ``link set nomaster`` + ``link del``.

Agent and raw alternate; the figures are medians over ``--rounds``. Targets: agent/raw
<= 1.5 for the setup and for the removal, and the setup of 100 networks under 5 s. Needs
root. Prints a table, or JSON with ``--json``.

    .venv/bin/python bench/network.py [--networks 100] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from virtnode.client import Client

from common import (
    machine,
    paired_ratio,
    print_targets,
    require_at_least_one,
    spawn,
    wait_ready,
)

MAX_RATIO = 1.5
MAX_SETUP_SECONDS = 5.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_namespace(count: int) -> str:
    ns = f"vn-bench-{secrets.token_hex(4)}"
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    for n in range(count):
        ip("-n", ns, "link", "add", f"nic{n}", "type", "veth", "peer", "name", f"peer{n}")
    return ns


def networks_spec(count: int, vlans: bool) -> dict[str, Any]:
    return {f"net{n}": {"ports": [f"nic{n}"], **({"vlan": 100 + n} if vlans and n % 2 else {})}
            for n in range(count)}


async def agent_round(client: Client, count: int, vlans: bool) -> tuple[float, float]:
    times = []
    for networks in (networks_spec(count, vlans),
                     {f"net{n}": {"remove": True} for n in range(count)}):
        start = time.perf_counter()
        started = await client.call("Network.setup", {
            "networks": networks, "options": {"connectivity_check": False}})
        job = (await client.call("Job.wait", {"job_id": started["job_id"],
                                              "timeout": 300}))["job"]
        times.append(time.perf_counter() - start)
        if job["state"] != "succeeded":
            raise SystemExit(f"Network.setup failed: {job['error']}")
    return times[0], times[1]


def raw_round(ns: str, count: int, vlans: bool) -> tuple[float, float]:
    with IPRoute(netns=ns) as ipr:
        index = {link.get("ifname"): link["index"] for link in ipr.get_links()}
        start = time.perf_counter()
        for n in range(count):
            tagged = vlans and n % 2
            kind: dict[str, Any] = {"kind": "bridge"}
            if tagged:
                kind.update(br_vlan_filtering=1, br_vlan_default_pvid=100 + n)
            ipr.link("add", ifname=f"net{n}", **kind)
            bridge = ipr.link_lookup(ifname=f"net{n}")[0]
            ipr.link("set", index=index[f"nic{n}"], master=bridge)
            ipr.link("set", index=index[f"nic{n}"], state="up")
            if tagged:
                ipr.vlan_filter("add", index=index[f"nic{n}"], vlan_info={"vid": 100 + n})
                ipr.vlan_filter("add", index=bridge, vlan_info={
                    "vid": 100 + n, "flags": ["pvid", "untagged"]}, vlan_flags="self")
            ipr.link("set", index=bridge, state="up")
        made = time.perf_counter() - start
        start = time.perf_counter()
        for n in range(count):
            ipr.link("set", index=index[f"nic{n}"], master=0)
            ipr.link("del", ifname=f"net{n}")
        removed = time.perf_counter() - start
    return made, removed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = await asyncio.to_thread(make_namespace, args.networks)
    tmp = Path(tempfile.mkdtemp(prefix="vn-bench-net-"))
    sock = tmp / "agent.sock"
    config = tmp / "agent.toml"
    config.write_text("")
    server = spawn("agent", [
        "ip", "netns", "exec", ns, sys.executable, "-m", "virtnode", "serve",
        "--config", str(config), "--listen", f"unix:{sock}", "--state-dir", str(tmp / "state"),
        "--hypervisor", "test:///default", "--log-level", "warning"], f"unix:{sock}",
        tmp / "agent.log")
    try:
        await wait_ready(server)
        client = await Client.connect(f"unix:{sock}")
        features = (await client.call("Network.getState", {}))["features"]
        vlans = bool(features["vlan_filtering"])
        agent_setup, agent_remove, raw_setup, raw_remove = [], [], [], []
        for _ in range(args.rounds):
            made, removed = await agent_round(client, args.networks, vlans)
            agent_setup.append(made)
            agent_remove.append(removed)
            made, removed = await asyncio.to_thread(raw_round, ns, args.networks, vlans)
            raw_setup.append(made)
            raw_remove.append(removed)
        await client.close()
    finally:
        server.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", ns], check=False)
    setup_ratio = paired_ratio(agent_setup, raw_setup)
    remove_ratio = paired_ratio(agent_remove, raw_remove)
    median_setup = statistics.median(agent_setup)
    return {
        "machine": machine(kernel_features=features),
        "networks": args.networks,
        "vlan_tagged": args.networks // 2 if vlans else 0,
        "rounds": args.rounds,
        "agent_setup_s": agent_setup, "raw_setup_s": raw_setup,
        "agent_remove_s": agent_remove, "raw_remove_s": raw_remove,
        "targets": [
            {"name": "setup agent/raw", "value": round(setup_ratio, 2),
             "target": f"<= {MAX_RATIO}", "passed": setup_ratio <= MAX_RATIO},
            {"name": "remove agent/raw", "value": round(remove_ratio, 2),
             "target": f"<= {MAX_RATIO}", "passed": remove_ratio <= MAX_RATIO},
            {"name": f"setup of {args.networks} networks, s", "value": round(median_setup, 3),
             "target": f"< {MAX_SETUP_SECONDS}", "passed": median_setup < MAX_SETUP_SECONDS},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_at_least_one(parser, args, "networks", "rounds")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result["machine"]))
    print(f"{result['networks']} networks ({result['vlan_tagged']} VLAN-tagged), "
          f"{result['rounds']} rounds")
    for what in ("setup", "remove"):
        agent = statistics.median(result[f"agent_{what}_s"])
        raw = statistics.median(result[f"raw_{what}_s"])
        print(f"  {what:7s} agent {agent * 1e3:8.1f} ms   raw pyroute2 {raw * 1e3:8.1f} ms")
    print_targets(result["targets"])
    if not all(t["passed"] for t in result["targets"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

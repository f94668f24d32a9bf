"""Volume copy benchmark: ``Volume.copy`` through the agent against ``qemu-img convert``.

The agent runs in its own subprocess (``test:///default``, a private state directory, a
unix socket) with a ``localfs`` storage domain in a temporary folder under ``--dir``
(default /var/tmp). The source is a raw volume of ``--size-gib`` GiB (default 2) filled
with incompressible, non-zero data. Each round copies it to qcow2 twice, alternating which
goes first:

* **agent**: ``Volume.copy {src, dst_sd, dst_format: qcow2}``, then ``Job.wait`` until
  the job has succeeded: validation, space check, metadata written illegal, qemu-img
  convert with progress, fsync of the target and its folder, metadata legal;
* **direct**: ``qemu-img convert -f raw -O qcow2 SRC DST`` followed by an fsync of the
  target, since the agent's copy is durable when it ends and a bare convert's is not.

Before each copy the previous target is removed (through ``Volume.delete`` for the agent's)
and ``sync`` runs, untimed. Reported: medians of the wall times, the fastest of each,
and the median of the per-round ratios. Target: median agent / median direct <= 1.05.

    .venv/bin/python bench/volcopy.py [--json] [--rounds 9] [--size-gib 2] [--dir /var/tmp]

Exit status: 0 target met, 1 missed, 2 the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from virtnode.client import Client

from common import (
    BenchError,
    JsonObject,
    MiB,
    machine,
    paired_ratio,
    print_targets,
    start_agent,
    sync,
    wait_ready,
    write_incompressible,
)

TARGET_RATIO = 1.05
CALL_TIMEOUT = 600.0


def direct_copy(src: str, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, str(dst)],
                   check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    sync()
    return seconds


async def agent_copy(client: Client, ref: JsonObject, sd_id: str) -> float:
    start = time.perf_counter()
    started = await client.call("Volume.copy", {"src": ref, "dst_sd": sd_id,
                                                "dst_format": "qcow2"}, timeout=CALL_TIMEOUT)
    job = (await client.call("Job.wait", {"job_id": started["job_id"], "timeout": 300},
                             timeout=CALL_TIMEOUT))["job"]
    seconds = time.perf_counter() - start
    if job["state"] != "succeeded":
        raise BenchError(f"the copy job ended {job['state']}: {job.get('error')}")
    copy = job["result"]["volume"]
    await client.call("Volume.delete", {k: copy[k] for k in ("sd_id", "image_id", "volume_id")})
    await asyncio.to_thread(sync)
    return seconds


async def run(opts: argparse.Namespace, tmp: Path) -> JsonObject:
    agent = start_agent(tmp, "test:///default", overrides=["devices.source=off"])
    try:
        await wait_ready(agent)
        client = await Client.connect(agent.url)
        try:
            created = await client.call("StorageDomain.create", {
                "type": "localfs", "name": "bench", "path": str(tmp / "sd")})
            sd_id = created["domain"]["sd_id"]
            size = opts.size_gib * 1024 * MiB
            source = (await client.call("Volume.create", {
                "sd_id": sd_id, "size": size, "format": "raw"}))["volume"]
            await asyncio.to_thread(write_incompressible, source["path"], size)
            ref = {k: source[k] for k in ("sd_id", "image_id", "volume_id")}
            agent_s: list[float] = []
            direct_s: list[float] = []
            for rnd in range(opts.rounds):
                order = ("agent", "direct") if rnd % 2 == 0 else ("direct", "agent")
                for way in order:
                    if way == "agent":
                        agent_s.append(await agent_copy(client, ref, sd_id))
                    else:
                        direct_s.append(await asyncio.to_thread(
                            direct_copy, source["path"], tmp / "direct.qcow2"))
        finally:
            await client.close()
    finally:
        agent.stop()
    ratio = statistics.median(agent_s) / statistics.median(direct_s)
    return {
        "benchmark": f"Volume.copy of {opts.size_gib} GiB raw to qcow2 vs qemu-img convert",
        "machine": machine(),
        "rounds": opts.rounds,
        "agent_s": agent_s,
        "direct_s": direct_s,
        "median": {"agent": statistics.median(agent_s), "direct": statistics.median(direct_s)},
        "fastest": {"agent": min(agent_s), "direct": min(direct_s)},
        "paired_ratio": paired_ratio(agent_s, direct_s),
        "ratio": ratio,
        "passed": ratio <= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--size-gib", type=int, default=2)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="virtnode-bench-volcopy-", dir=opts.dir))
    try:
        result: dict[str, Any] = asyncio.run(run(opts, tmp))
    except (BenchError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bench/volcopy.py: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        info = result["machine"]
        print(f"machine: {info['cpus']} x {info['cpu_model']}; virtnode {info['virtnode']}")
        print(f"{result['benchmark']}; {opts.rounds} rounds, alternating (seconds)")
        print(f"{'':<16}{'direct':>10}{'agent':>10}")
        for key in ("median", "fastest"):
            print(f"{key:<16}{result[key]['direct']:>10.2f}{result[key]['agent']:>10.2f}")
        print(f"median of per-round ratios: {result['paired_ratio']:.3f}")
        print_targets([{"name": "Volume.copy / qemu-img convert", "value": result["ratio"],
                        "target": f"<= {TARGET_RATIO}", "passed": result["passed"]}],
                      lambda t: f"{t['value']:.3f}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

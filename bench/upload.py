"""Upload benchmark: ``curl -T`` of an image into a volume transfer of the agent against the
same ``curl`` into a plain aiohttp file sink.

The agent runs in its own subprocess (``test:///default``, a private state directory) on
``tcp://127.0.0.1`` with the admin role for TCP callers, and has a ``localfs`` storage
domain in a temporary folder under ``--dir`` (default /var/tmp). The file is a raw image
of ``--size-gib`` GiB (default 2) of incompressible, non-zero data. The sink is an
aiohttp application in this process on another loopback port: its ``PUT`` handler writes
each chunk of the body to a file as it comes (``iter_chunked``, a blocking write on the
loop), the simplest thing a server does with an upload. Each round, alternating which
goes first:

* **agent**: ``Volume.prepareTransfer`` (untimed), then ``curl -T FILE -X PUT`` of the
  whole file to its URL, timed by curl; then ``Volume.finalizeTransfer`` (timed apart:
  fsync, SHA-256 already taken as the bytes came, the image checks) and ``Volume.delete``;
* **sink**: the same ``curl`` to the sink, then the file is removed.

``sync`` runs between uploads, untimed. Both sides write into the page cache, neither
fsyncs during the PUT. Reported: medians of the throughputs (bytes / curl's
``time_total``), the fastest of each, the median of the per-round ratios, and the median
finalize time. Target: median agent / median sink >= 0.90.

    .venv/bin/python bench/upload.py [--json] [--rounds 7] [--size-gib 2] [--dir /var/tmp]

Exit status: 0 target met, 1 missed, 2 the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from virtnode.client import Client

from common import (
    BenchError,
    JsonObject,
    MiB,
    free_port,
    machine,
    paired_ratio,
    print_targets,
    start_agent,
    sync,
    wait_ready,
    write_incompressible,
)

TARGET_RATIO = 0.90
CALL_TIMEOUT = 600.0


async def curl_put(path: Path, url: str) -> float:
    """``curl -T``; returns curl's own total time in seconds."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "-X", "PUT", "-T", str(path), "-H", "Expect:",
        "-H", "Content-Type: application/octet-stream", "-o", "/dev/null",
        "-w", "%{time_total}", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"curl {url} failed: {err.decode(errors='replace').strip()}")
    return float(out.decode())


def sink_app(target: Path) -> web.Application:
    """A plain aiohttp file sink: PUT /sink writes the body to ``target``."""
    async def put(request: web.Request) -> web.Response:
        with target.open("wb") as out:
            async for chunk in request.content.iter_chunked(MiB):
                out.write(chunk)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_put("/sink", put)
    return app


async def agent_upload(client: Client, base: str, sd_id: str, image: Path,
                       size: int) -> tuple[float, float]:
    prepared = await client.call("Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": size, "format": "raw"})
    seconds = await curl_put(image, base + prepared["url"])
    start = time.perf_counter()
    done = await client.call("Volume.finalizeTransfer",
                             {"transfer_id": prepared["transfer_id"]}, timeout=CALL_TIMEOUT)
    finalize = time.perf_counter() - start
    volume = done["volume"]
    await client.call("Volume.delete", {k: volume[k] for k in ("sd_id", "image_id",
                                                                "volume_id")})
    await asyncio.to_thread(sync)
    return seconds, finalize


async def sink_upload(url: str, image: Path, target: Path) -> float:
    seconds = await curl_put(image, url)
    await asyncio.to_thread(target.unlink)
    await asyncio.to_thread(sync)
    return seconds


async def run(opts: argparse.Namespace, tmp: Path) -> JsonObject:
    size = opts.size_gib * 1024 * MiB
    image = tmp / "image.raw"
    await asyncio.to_thread(write_incompressible, image, size)
    port = free_port()
    agent = start_agent(tmp, "test:///default", listen=f"tcp://127.0.0.1:{port}",
                        overrides=["devices.source=off", 'access.tcp_role="admin"'])
    sink_port = free_port()
    runner = web.AppRunner(sink_app(tmp / "sink.raw"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", sink_port, reuse_address=True)
    await site.start()
    agent_bps: list[float] = []
    sink_bps: list[float] = []
    finalize_s: list[float] = []
    try:
        await wait_ready(agent)
        client = await Client.connect(agent.url)
        try:
            created = await client.call("StorageDomain.create", {
                "type": "localfs", "name": "bench", "path": str(tmp / "sd")})
            sd_id = created["domain"]["sd_id"]
            base = f"http://127.0.0.1:{port}"
            sink_url = f"http://127.0.0.1:{sink_port}/sink"
            for rnd in range(opts.rounds):
                order = ("agent", "sink") if rnd % 2 == 0 else ("sink", "agent")
                for way in order:
                    if way == "agent":
                        seconds, finalize = await agent_upload(client, base, sd_id, image,
                                                               size)
                        agent_bps.append(size / seconds)
                        finalize_s.append(finalize)
                    else:
                        sink_bps.append(size / await sink_upload(sink_url, image,
                                                                 tmp / "sink.raw"))
        finally:
            await client.close()
    finally:
        agent.stop()
        await runner.cleanup()
    ratio = statistics.median(agent_bps) / statistics.median(sink_bps)
    return {
        "benchmark": f"curl PUT of {opts.size_gib} GiB into a volume transfer vs an aiohttp "
                     "file sink",
        "machine": machine(),
        "rounds": opts.rounds,
        "agent_mib_s": [b / MiB for b in agent_bps],
        "sink_mib_s": [b / MiB for b in sink_bps],
        "finalize_s": finalize_s,
        "median": {"agent": statistics.median(agent_bps) / MiB,
                   "sink": statistics.median(sink_bps) / MiB},
        "fastest": {"agent": max(agent_bps) / MiB, "sink": max(sink_bps) / MiB},
        "paired_ratio": paired_ratio(agent_bps, sink_bps),
        "median_finalize_s": statistics.median(finalize_s),
        "ratio": ratio,
        "passed": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--size-gib", type=int, default=2)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    if shutil.which("curl") is None:
        print("bench/upload.py: curl is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="virtnode-bench-upload-", dir=opts.dir))
    try:
        result: dict[str, Any] = asyncio.run(run(opts, tmp))
    except (BenchError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bench/upload.py: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        info = result["machine"]
        print(f"machine: {info['cpus']} x {info['cpu_model']}; virtnode {info['virtnode']}")
        print(f"{result['benchmark']}; {opts.rounds} rounds, alternating (MiB/s)")
        print(f"{'':<16}{'sink':>10}{'agent':>10}")
        for key in ("median", "fastest"):
            print(f"{key:<16}{result[key]['sink']:>10.0f}{result[key]['agent']:>10.0f}")
        print(f"median of per-round ratios: {result['paired_ratio']:.3f}")
        print(f"median finalize (fsync, checks): {result['median_finalize_s']:.2f} s")
        print_targets([{"name": "agent / sink throughput", "value": result["ratio"],
                        "target": f">= {TARGET_RATIO}", "passed": result["passed"]}],
                      lambda t: f"{t['value']:.3f}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

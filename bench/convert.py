"""Copy benchmark: ``virtnode.storage.images.qemuimg.convert`` against ``qemu-img convert``
run directly.

The source is a raw image of ``--size-gib`` GiB (default 2) of incompressible, non-zero
data (one random MiB repeated), so convert has no zeros to skip. Each round copies it to
qcow2 twice, once each way, alternating which goes first:

* **direct**: ``qemu-img convert -f raw -O qcow2 SRC DST`` with ``subprocess.run``;
* **wrapper**: ``await qemuimg.convert(SRC, DST, src_fmt="raw", dst_fmt="qcow2",
  progress=...)`` in an asyncio loop, progress on (``-p``, parsed and throttled).

Before each copy the previous target is removed and ``sync`` runs, untimed, so no copy pays
for the write-back of the one before; the source stays in the page cache for both.
Reported: wall time per copy (medians over ``--rounds``, and the fastest), qemu-img's CPU
time (children's rusage), the benchmark process's own CPU during the wrapper's copies, and
the median of the two ways' ratio within each round. Target: median wrapper / median
direct <= 1.05. Everything lives in a temporary folder under ``--dir`` (default
/var/tmp), removed at the end.

    .venv/bin/python bench/convert.py [--json] [--rounds 5] [--size-gib 2] [--dir /var/tmp]

Exit status: 0 target met, 1 missed, 2 the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virtnode.storage.images import qemuimg

from common import BenchError, MiB, machine, paired_ratio, sync, write_incompressible

TARGET_RATIO = 1.05


@dataclass
class Copy:
    way: str
    seconds: float
    qemu_cpu: float
    own_cpu: float
    progress_calls: int


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh_target(dst: Path) -> None:
    dst.unlink(missing_ok=True)
    sync()


def direct(src: Path, dst: Path) -> Copy:
    cpu, own = children_cpu(), time.process_time()
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(dst)],
                   check=True)
    seconds = time.perf_counter() - start
    return Copy("direct", seconds, children_cpu() - cpu, time.process_time() - own, 0)


def wrapper(src: Path, dst: Path) -> Copy:
    calls: list[float] = []

    async def copy() -> None:
        await qemuimg.convert(src, dst, src_fmt="raw", dst_fmt="qcow2", progress=calls.append)

    loop = asyncio.new_event_loop()
    try:
        cpu, own = children_cpu(), time.process_time()
        start = time.perf_counter()
        loop.run_until_complete(copy())
        seconds = time.perf_counter() - start
        spent = children_cpu() - cpu, time.process_time() - own
    finally:
        loop.close()
    if not calls or calls[-1] != 100.0:
        raise BenchError(f"progress did not reach 100: {calls[-3:]}")
    return Copy("wrapper", seconds, spent[0], spent[1], len(calls))


def median(copies: list[Copy], way: str, field: str) -> float:
    return statistics.median(getattr(c, field) for c in copies if c.way == way)


def seconds_of(copies: list[Copy], way: str) -> list[float]:
    """The wall times of one way's copies, one per round, in order."""
    return [c.seconds for c in copies if c.way == way]


def measure(tmp: Path, size: int, rounds: int) -> list[Copy]:
    src, dst = tmp / "src.raw", tmp / "dst.qcow2"
    write_incompressible(src, size)
    fresh_target(dst)
    direct(src, dst)  # warm-up: the source into the page cache
    copies: list[Copy] = []
    for round_ in range(rounds):
        ways = (direct, wrapper) if round_ % 2 == 0 else (wrapper, direct)
        for way in ways:
            fresh_target(dst)
            copies.append(way(src, dst))
    fresh_target(dst)
    return copies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed", file=sys.stderr)
        return 2
    size = int(options.size_gib * 1024) * MiB
    try:
        with tempfile.TemporaryDirectory(prefix="virtnode-bench-convert-",
                                         dir=options.dir) as tmp:
            copies = measure(Path(tmp), size, options.rounds)
    except (BenchError, OSError, subprocess.CalledProcessError, qemuimg.QemuImgError) as exc:
        print(f"bench/convert.py: {exc}", file=sys.stderr)
        return 2
    ratio = median(copies, "wrapper", "seconds") / median(copies, "direct", "seconds")
    result: dict[str, Any] = {
        "machine": machine(),
        "size_bytes": size,
        "rounds": options.rounds,
        "copies": [asdict(c) for c in copies],
        "median": {way: {f: median(copies, way, f) for f in ("seconds", "qemu_cpu", "own_cpu")}
                   for way in ("direct", "wrapper")},
        "fastest": {way: min(seconds_of(copies, way))
                    for way in ("direct", "wrapper")},
        "paired_ratio": paired_ratio(seconds_of(copies, "wrapper"),
                                     seconds_of(copies, "direct")),
        "ratio": ratio,
        "target": TARGET_RATIO,
        "passed": ratio <= TARGET_RATIO,
    }
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{size // MiB} MiB raw -> qcow2, {options.rounds} rounds, medians")
        print(f"{'way':8} {'wall s':>8} {'MiB/s':>8} {'fastest s':>10} {'qemu-img CPU s':>15} "
              f"{'own CPU s':>10}")
        for way, figures in result["median"].items():
            print(f"{way:8} {figures['seconds']:8.2f} {size / MiB / figures['seconds']:8.0f} "
                  f"{result['fastest'][way]:10.2f} {figures['qemu_cpu']:15.2f} "
                  f"{figures['own_cpu']:10.3f}")
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"median of per-round ratios: {result['paired_ratio']:.3f}")
        print(f"{verdict} wrapper/direct = {ratio:.3f} (target <= {TARGET_RATIO})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""VM snapshot benchmark: ``VM.snapshot`` through the agent against the same work done
with qemu-img and libvirt directly.

Two firmware-only guests under KVM (64 MiB, machine ``pc``, no kernel: the firmware
finds nothing to boot and waits) on ``qemu:///system``, each with one qcow2 disk of
``--disk-mib`` MiB of which the first ``--written-mib`` are written with incompressible
data before the guest starts:

* agent: the disk is a volume of a ``localfs`` storage domain made through the agent
  (``python -m virtnode serve`` in its own subprocess, a private temporary state
  directory, log level ``warning``, a unix socket), the VM made with ``VM.create``; a
  snapshot is ``VM.snapshot`` (disk-only, ``quiesce off``: the guest has no guest
  agent) followed by ``Job.wait``, timed from the call until the job has succeeded;
* raw: the same domain XML defined with libvirt-python in this process, its disk a
  plain file; a snapshot is ``qemu-img create -f qcow2 -b LEAF -F qcow2 LAYER`` and one
  ``virDomainSnapshotCreateXML`` with ``REUSE_EXT | DISK_ONLY | NO_METADATA | ATOMIC``
  switching the disk to it: what the agent asks of libvirt, without its checks,
  journal, metadata and definition update.

Each round takes one snapshot on each path, alternating which goes first; the guests
accumulate layers over the rounds (a chain of ``--rounds`` + 1). Medians of the
per-round times and of their ratios are reported. Every VM this script makes is named
``vn-bench-snap-...``; all of them, and only them, are removed before and after the run.
Snapshots with memory and deleting snapshots (live merge) are not built yet and not
measured. Target: agent / raw at most 1.1. Exit status 1 if missed, 2 if the benchmark
could not run.

    .venv/bin/python bench/snapshot.py [--rounds N] [--json]
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

import libvirt

from virtnode.client import Client, ClientError
from virtnode.vm.spec import check_spec, domain_xml

from common import (
    BenchError,
    JsonObject,
    guest_spec,
    libvirt_version,
    machine,
    print_targets,
    remove_guests,
    start_agent,
    take_guest_lock,
    wait_ready,
    write_incompressible,
)

URI = "qemu:///system"
PREFIX = "vn-bench-snap-"
TARGET = 1.1
MiB = 1024 * 1024
FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
         | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
         | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
         | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def fill(path: Path, written: int) -> None:
    """Write ``written`` bytes of incompressible data into the qcow2 image at its start."""
    raw = path.with_suffix(".raw")
    write_incompressible(raw, written)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def raw_xml(name: str, disk: Path) -> str:
    spec = {**guest_spec(name, 64), "disks": [{"path": str(disk), "format": "qcow2"}],
            "guest_agent": False}
    return domain_xml(check_spec(spec, "kvm"), {"owner": "virtnode", "labels": {}})


def raw_snapshot(dom: Any, leaf: Path, layer: Path) -> float:
    started = time.perf_counter()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(leaf), "-F", "qcow2", str(layer))
    dom.snapshotCreateXML(
        "<domainsnapshot><disks><disk name='vda' snapshot='external' type='file'>"
        f"<driver type='qcow2'/><source file='{layer}'/></disk></disks></domainsnapshot>",
        FLAGS)
    return time.perf_counter() - started


async def agent_snapshot(client: Client, vm_id: str, name: str) -> float:
    started = time.perf_counter()
    job = await client.call("VM.snapshot", {"vm_id": vm_id, "name": name, "quiesce": "off"})
    done = (await client.call("Job.wait", {"job_id": job["job_id"], "timeout": 120}))["job"]
    if done["state"] != "succeeded":
        raise BenchError(f"VM.snapshot failed: {done.get('error')}")
    return time.perf_counter() - started


async def run(tmp: Path, conn: Any, rounds: int, disk_mib: int, written_mib: int
              ) -> tuple[list[float], list[float]]:
    agent = start_agent(tmp, URI)
    try:
        await wait_ready(agent)
        async with await Client.connect(agent.url) as client:
            sd_id = (await client.call("StorageDomain.create", {
                "type": "localfs", "name": "bench", "path": str(tmp / "sd")}))["domain"]["sd_id"]
            volume = (await client.call("Volume.create", {
                "sd_id": sd_id, "size": disk_mib * MiB, "format": "qcow2"}))["volume"]
            await asyncio.to_thread(fill, Path(volume["path"]), written_mib * MiB)
            spec = {**guest_spec(f"{PREFIX}agent", 64), "guest_agent": False,
                    "disks": [{"volume": {k: volume[k] for k in
                                          ("sd_id", "image_id", "volume_id")}}]}
            vm_id = (await client.call("VM.create", {"spec": spec}))["vm_id"]

            raw_dir = tmp / "raw"
            raw_dir.mkdir(mode=0o755)
            leaf = raw_dir / "disk0.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(leaf), f"{disk_mib}M")
            await asyncio.to_thread(fill, leaf, written_mib * MiB)
            dom = await asyncio.to_thread(conn.defineXMLFlags, raw_xml(f"{PREFIX}raw", leaf),
                                          libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            await asyncio.to_thread(dom.create)
            await asyncio.sleep(1)  # both guests past their start

            ours, theirs = [], []
            for rnd in range(rounds):
                layer = raw_dir / f"disk{rnd + 1}.qcow2"
                if rnd % 2 == 0:
                    ours.append(await agent_snapshot(client, vm_id, f"s{rnd}"))
                    theirs.append(await asyncio.to_thread(raw_snapshot, dom, leaf, layer))
                else:
                    theirs.append(await asyncio.to_thread(raw_snapshot, dom, leaf, layer))
                    ours.append(await agent_snapshot(client, vm_id, f"s{rnd}"))
                leaf = layer
            return ours, theirs
    finally:
        agent.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--disk-mib", type=int, default=1024)
    p.add_argument("--written-mib", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 < args.written_mib <= args.disk_mib:
        p.error("--rounds must be at least 1 and --written-mib within --disk-mib")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    load_before = os.getloadavg()[0]
    try:
        take_guest_lock()
        tmp = Path(tempfile.mkdtemp(prefix="virtnode-bench-snap-", dir="/var/tmp"))
        tmp.chmod(0o755)
        conn = libvirt.open(URI)
        try:
            remove_guests(conn, PREFIX)
            ours, theirs = asyncio.run(run(tmp, conn, args.rounds, args.disk_mib,
                                           args.written_mib))
        finally:
            remove_guests(conn, PREFIX)
            conn.close()
            shutil.rmtree(tmp, ignore_errors=True)
    except (BenchError, ClientError, OSError, subprocess.CalledProcessError,
            libvirt.libvirtError) as exc:
        print(f"bench/snapshot.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    ratios = [a / r for a, r in zip(ours, theirs, strict=True)]
    ratio = statistics.median(ours) / statistics.median(theirs)
    targets = [{"name": "VM.snapshot (disk-only, running), agent / raw", "value": ratio,
                "target": f"<= {TARGET:.2f}", "passed": ratio <= TARGET}]
    report: JsonObject = {
        "benchmark": "VM.snapshot through the agent vs qemu-img + libvirt directly",
        "machine": machine(libvirt=libvirt_version()),
        "options": vars(args), "load_average_1min": {"before": load_before,
                                                     "after": os.getloadavg()[0]},
        "agent_s": ours, "raw_s": theirs, "median_agent_s": statistics.median(ours),
        "median_raw_s": statistics.median(theirs),
        "median_of_ratios": statistics.median(ratios), "targets": targets}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.rounds} rounds, alternating; {args.disk_mib} MiB disks, "
              f"{args.written_mib} MiB written; load {load_before:.2f} before, "
              f"{report['load_average_1min']['after']:.2f} after")
        print(f"  agent VM.snapshot + Job.wait  median {statistics.median(ours) * 1e3:8.1f} ms")
        print(f"  raw qemu-img + libvirt        median {statistics.median(theirs) * 1e3:8.1f} ms")
        print(f"  median of per-round ratios {statistics.median(ratios):.2f}")
        print_targets(targets, lambda t: f"{t['value']:.2f}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

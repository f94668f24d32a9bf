"""VM snapshot benchmark: ``VM.snapshot`` and ``VM.deleteSnapshot`` through the agent
against the same work done with qemu-img and libvirt directly.

Two firmware-only guests under KVM (256 MiB, machine ``pc``, no kernel: the firmware
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

Three phases, each round on both paths, alternating which goes first:

* disk-only: ``--rounds`` snapshots as above;
* memory: ``--memory-rounds`` snapshots with memory (``memory: true``; raw: the same
  call with ``<memory snapshot='external' file=...>`` into an empty file and without
  ``DISK_ONLY``). The firmware guest has touched little of its 256 MiB, so the save
  image is small: this measures the path, not the disk's write rate;
* live merge: ``--merge-rounds`` times, ``--merge-mib`` MiB are written into the layer
  each VM writes (QEMU's ``qemu-io`` monitor command, in 64 MiB requests, not timed),
  then the newest snapshot is deleted: ``VM.deleteSnapshot`` + ``Job.wait`` against
  ``virDomainBlockCommit`` (``ACTIVE | RELATIVE``), polling ``blockJobInfo`` every
  0.2 s as the agent does, ``virDomainBlockJobAbort`` with ``PIVOT`` once ready, and
  the merged layer's file removed (as ``virsh blockcommit --delete`` would).

The guests accumulate layers over the rounds. Medians of the per-round times and of
their ratios are reported. Every VM this script makes is named ``vn-bench-snap-...``;
all of them, and only them, are removed before and after the run. Target: agent / raw
at most 1.1 for each phase. Exit status 1 if one is missed, 2 if the benchmark could
not run.

    .venv/bin/python bench/snapshot.py [--rounds N] [--memory-rounds N]
        [--merge-rounds N] [--merge-mib N] [--json]
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
import libvirt_qemu

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
MEMORY_MIB = 256
MEMORY_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
FLAGS = MEMORY_FLAGS | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
POLL = 0.2
#: The virtio-blk device under the disk's PCI proxy (libvirt's alias virtio-disk0).
BACKEND = "/machine/peripheral/virtio-disk0/virtio-backend"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def fill(path: Path, written: int) -> None:
    """Write ``written`` bytes of incompressible data into the qcow2 image at its start."""
    raw = path.with_suffix(".raw")
    write_incompressible(raw, written)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def raw_xml(name: str, disk: Path) -> str:
    spec = {**guest_spec(name, MEMORY_MIB), "disks": [{"path": str(disk), "format": "qcow2"}],
            "guest_agent": False}
    return domain_xml(check_spec(spec, "kvm"), {"owner": "virtnode", "labels": {}})


def raw_snapshot(dom: Any, leaf: Path, layer: Path, memory: Path | None = None) -> float:
    started = time.perf_counter()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(leaf), "-F", "qcow2", str(layer))
    saved = ""
    if memory is not None:
        memory.touch()
        saved = f"<memory snapshot='external' file='{memory}'/>"
    dom.snapshotCreateXML(
        f"<domainsnapshot>{saved}<disks><disk name='vda' snapshot='external' type='file'>"
        f"<driver type='qcow2'/><source file='{layer}'/></disk></disks></domainsnapshot>",
        FLAGS if memory is None else MEMORY_FLAGS)
    return time.perf_counter() - started


def raw_merge(dom: Any, top: Path, base: Path) -> float:
    """Active commit of ``top`` into ``base`` and the pivot, as the agent does it."""
    started = time.perf_counter()
    dom.blockCommit("vda", str(base), str(top), 0,
                    libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    while True:
        info = dom.blockJobInfo("vda", 0)
        if info and info["cur"] == info["end"] and "ready='yes'" in dom.XMLDesc(0):
            dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            top.unlink()  # what blockcommit --delete does: the agent removes it too
            return time.perf_counter() - started
        time.sleep(POLL)


def write_active(dom: Any, mib: int) -> None:
    """Write ``mib`` MiB of a pattern into the layer the VM writes, through QEMU."""
    for offset in range(0, mib, 64):
        size = min(64, mib - offset)
        said = libvirt_qemu.qemuMonitorCommand(
            dom, f"qemu-io -d {BACKEND} "
            f'"write -P 0x5a {offset}M {size}M"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if said.strip():  # it says nothing when it wrote
            raise BenchError(f"qemu-io in {dom.name()} did not write: {said.strip()}")


async def wait_job(client: Client, job: JsonObject, what: str) -> None:
    done = (await client.call("Job.wait", {"job_id": job["job_id"], "timeout": 300}))["job"]
    if done["state"] != "succeeded":
        raise BenchError(f"{what} failed: {done.get('error')}")


async def agent_snapshot(client: Client, vm_id: str, name: str, memory: bool = False
                         ) -> float:
    started = time.perf_counter()
    await wait_job(client, await client.call("VM.snapshot", {
        "vm_id": vm_id, "name": name, "quiesce": "off", "memory": memory}), "VM.snapshot")
    return time.perf_counter() - started


async def agent_merge(client: Client, vm_id: str, snapshot_id: str) -> float:
    started = time.perf_counter()
    await wait_job(client, await client.call("VM.deleteSnapshot", {
        "vm_id": vm_id, "snapshot_id": snapshot_id}), "VM.deleteSnapshot")
    return time.perf_counter() - started


async def alternate(rnd: int, ours: Any, theirs: Any) -> tuple[float, float]:
    """One round: the agent's and the raw path's times, the first going first on even
    rounds."""
    if rnd % 2 == 0:
        first = await ours()
        return first, await theirs()
    second = await theirs()
    return await ours(), second


Phases = dict[str, tuple[list[float], list[float]]]


async def run(tmp: Path, conn: Any, args: argparse.Namespace) -> Phases:
    disk_mib, written_mib = args.disk_mib, args.written_mib
    agent = start_agent(tmp, URI)
    try:
        await wait_ready(agent)
        async with await Client.connect(agent.url) as client:
            sd_id = (await client.call("StorageDomain.create", {
                "type": "localfs", "name": "bench", "path": str(tmp / "sd")}))["domain"]["sd_id"]
            volume = (await client.call("Volume.create", {
                "sd_id": sd_id, "size": disk_mib * MiB, "format": "qcow2"}))["volume"]
            await asyncio.to_thread(fill, Path(volume["path"]), written_mib * MiB)
            spec = {**guest_spec(f"{PREFIX}agent", MEMORY_MIB), "guest_agent": False,
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

            phases: Phases = {"disk-only": ([], []), "memory": ([], []), "merge": ([], [])}
            chain = [leaf]
            plan = [("disk-only", False)] * args.rounds + [("memory", True)] * args.memory_rounds
            for rnd, (phase, memory) in enumerate(plan):
                layer = raw_dir / f"disk{rnd + 1}.qcow2"
                saved = raw_dir / f"memory{rnd + 1}" if memory else None
                ours, theirs = await alternate(
                    rnd, lambda rnd=rnd, memory=memory: agent_snapshot(
                        client, vm_id, f"s{rnd}", memory),
                    lambda layer=layer, saved=saved: asyncio.to_thread(
                        raw_snapshot, dom, chain[-1], layer, saved))
                phases[phase][0].append(ours)
                phases[phase][1].append(theirs)
                chain.append(layer)
            snaps = (await client.call("VM.listSnapshots", {"vm_id": vm_id}))["snapshots"]
            agent_dom = await asyncio.to_thread(conn.lookupByUUIDString, vm_id)
            for rnd in range(min(args.merge_rounds, len(snaps))):
                await asyncio.to_thread(write_active, agent_dom, args.merge_mib)
                await asyncio.to_thread(write_active, dom, args.merge_mib)
                newest = snaps.pop()["snapshot_id"]
                top, base = chain.pop(), chain[-1]
                ours, theirs = await alternate(
                    rnd, lambda newest=newest: agent_merge(client, vm_id, newest),
                    lambda top=top, base=base: asyncio.to_thread(raw_merge, dom, top, base))
                phases["merge"][0].append(ours)
                phases["merge"][1].append(theirs)
            return phases
    finally:
        agent.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--memory-rounds", type=int, default=5)
    p.add_argument("--merge-rounds", type=int, default=3)
    p.add_argument("--merge-mib", type=int, default=1024)
    p.add_argument("--disk-mib", type=int, default=1024)
    p.add_argument("--written-mib", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 < args.written_mib <= args.disk_mib:
        p.error("--rounds must be at least 1 and --written-mib within --disk-mib")
    if not 0 < args.merge_mib <= args.disk_mib or args.memory_rounds < 0 \
            or not 0 <= args.merge_rounds <= args.rounds + args.memory_rounds:
        p.error("--merge-mib must be within --disk-mib, and --merge-rounds at most the "
                "snapshots taken")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    load_before = os.getloadavg()[0]
    try:
        take_guest_lock()
        tmp = Path(tempfile.mkdtemp(prefix="virtnode-bench-snap-", dir="/var/tmp"))
        tmp.chmod(0o755)
        conn = libvirt.open(URI)
        try:
            remove_guests(conn, PREFIX)
            phases = asyncio.run(run(tmp, conn, args))
        finally:
            remove_guests(conn, PREFIX)
            conn.close()
            shutil.rmtree(tmp, ignore_errors=True)
    except (BenchError, ClientError, OSError, subprocess.CalledProcessError,
            libvirt.libvirtError) as exc:
        print(f"bench/snapshot.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    names = {"disk-only": "VM.snapshot (disk-only, running)",
             "memory": f"VM.snapshot (memory, {MEMORY_MIB} MiB guest)",
             "merge": f"VM.deleteSnapshot (live merge of {args.merge_mib} MiB)"}
    targets, results = [], {}
    for phase, (ours, theirs) in phases.items():
        if not ours:
            continue
        ratio = statistics.median(ours) / statistics.median(theirs)
        targets.append({"name": f"{names[phase]}, agent / raw", "value": ratio,
                        "target": f"<= {TARGET:.2f}", "passed": ratio <= TARGET})
        results[phase] = {
            "agent_s": ours, "raw_s": theirs, "median_agent_s": statistics.median(ours),
            "median_raw_s": statistics.median(theirs),
            "median_of_ratios": statistics.median(
                [a / r for a, r in zip(ours, theirs, strict=True)])}
    report: JsonObject = {
        "benchmark": "VM.snapshot and VM.deleteSnapshot through the agent vs qemu-img + "
                     "libvirt directly",
        "machine": machine(libvirt=libvirt_version()),
        "options": vars(args), "load_average_1min": {"before": load_before,
                                                     "after": os.getloadavg()[0]},
        "phases": results, "targets": targets}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.disk_mib} MiB disks, {args.written_mib} MiB written; load "
              f"{load_before:.2f} before, {report['load_average_1min']['after']:.2f} after")
        for phase, result in results.items():
            print(f"  {names[phase]}: {len(result['agent_s'])} rounds, alternating")
            print(f"    agent  median {result['median_agent_s'] * 1e3:8.1f} ms")
            print(f"    raw    median {result['median_raw_s'] * 1e3:8.1f} ms")
            print(f"    median of per-round ratios {result['median_of_ratios']:.2f}")
        print_targets(targets, lambda t: f"{t['value']:.2f}")
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

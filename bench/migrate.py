"""Live migration benchmark: ``VM.migrate`` through the agents, against libvirt directly.

Runs in the lab (tools/lab): it uses a lab that is up, or brings one of two hosts up
and takes it down at the end. Two guests, each moved back and forth between lab-h1 and
lab-h2, ``--rounds`` times, two ways in the same run:

* agent: ``VM.migrate`` on the source agent (over its tls:// listener, with the lab
  client's certificate), timed from the call to the end of ``Job.wait``: the preflight,
  the destination's ``Migration.prepare`` (and its volume, with storage copy), libvirt's
  migration and ``Migration.finish``;
* raw: libvirt-python in this process, ``migrateToURI3`` on the source libvirtd with the
  flags and parameters the agent passes (peer to peer, live, ``ABORT_ON_ERROR``,
  ``PERSIST_DEST | UNDEFINE_SOURCE``; with storage copy ``NON_SHARED_DISK``, the disk
  list, the destination's address and the domain XML naming the destination file, which
  is made with ``qemu-img create`` on the destination host inside the timed part).

The guests: a firmware-only KVM guest (``--memory`` MiB, no disk: its memory is all
there is to move), and the same guest with a 1 GiB qcow2 disk holding ``--data`` MiB of
written data on the source host's own storage domain, moved with storage copy. Each round
moves a guest four times: agent A→B, raw B→A, raw A→B, agent B→A, so each way runs in
both directions and goes first as often as second; one such round, untimed, warms up
first (a lab host's libvirtd probes QEMU when it first starts one). Downtime: libvirt's
figure for the finished job (the agent reports it in the job's result; for raw, the
JOB_COMPLETED event).
Target: the median over rounds of agent time / raw time is at most 1.05. The exit status
is 1 if the target is missed, 2 if the benchmark could not run.

    .venv/bin/python bench/migrate.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from virtnode.client import Client, ClientError, tls_context

from common import BenchError, JsonObject, machine, paired_ratio, print_targets

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "tools" / "lab"
TARGET_RATIO = 1.05
FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
         | libvirt.VIR_MIGRATE_ABORT_ON_ERROR | libvirt.VIR_MIGRATE_PERSIST_DEST
         | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def lab(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0 and args[0] != "status":
        raise BenchError(f"tools/lab {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def on_host(name: str, *argv: str) -> str:
    index = name.removeprefix("lab-h")
    run = Path("/run/virtnode-lab") / name
    proc = subprocess.run(["nsenter", f"--net=/run/netns/vnlab-h{index}",
                           f"--mount={run / 'mnt'}", "--", *argv],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{name}: {' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Series:
    agent: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    agent_downtime: list[float] = field(default_factory=list)
    raw_downtime: list[float] = field(default_factory=list)
    pairs: list[tuple[float, float]] = field(default_factory=list)  # per round: agent, raw

    def summary(self) -> JsonObject:
        med = statistics.median
        return {"agent_seconds": round(med(self.agent), 3),
                "raw_seconds": round(med(self.raw), 3),
                "ratio": round(paired_ratio([p[0] for p in self.pairs],
                                            [p[1] for p in self.pairs]), 3),
                "agent_downtime_ms": med(self.agent_downtime) if self.agent_downtime else None,
                "raw_downtime_ms": med(self.raw_downtime) if self.raw_downtime else None,
                "rounds": {"agent": self.agent, "raw": self.raw,
                           "agent_downtime_ms": self.agent_downtime,
                           "raw_downtime_ms": self.raw_downtime}}


class Raw:
    """libvirt-python on the lab hosts' libvirtds, with JOB_COMPLETED events."""

    def __init__(self, hosts: list[JsonObject]) -> None:
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._loop, daemon=True).start()
        self.conns = {}
        self.completed: dict[str, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        for host in hosts:
            conn = libvirt.open(f"qemu+tcp://{host['address']}/system")
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                        self._on_completed, None)
            self.conns[host["name"]] = conn

    @staticmethod
    def _loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _on_completed(self, _conn: Any, dom: Any, stats: dict[str, Any], _opaque: Any) -> None:
        with self._arrived:
            self.completed[dom.UUIDString()] = dict(stats)
            self._arrived.notify_all()

    def downtime(self, vm_id: str, timeout: float = 3.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while vm_id not in self.completed and time.monotonic() < deadline:
                self._arrived.wait(0.1)
            stats = self.completed.pop(vm_id, None)
        return None if stats is None or "downtime" not in stats else float(stats["downtime"])

    def migrate(self, vm_id: str, source: JsonObject, destination: JsonObject,
                copy_to: str | None) -> float:
        """Seconds for one migration (with the destination file made, for a copy)."""
        dom = self.conns[source["name"]].lookupByUUIDString(vm_id)
        self.completed.pop(vm_id, None)
        params: dict[str, Any] = {}
        flags = FLAGS
        started = time.perf_counter()
        if copy_to is not None:
            on_host(destination["name"], "qemu-img", "create", "-q", "-f", "qcow2", copy_to,
                    str(1 << 30))
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
            params = {
                libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],
                libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{destination['address']}",
                libvirt.VIR_MIGRATE_PARAM_DEST_XML: _disk_at(
                    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), copy_to),
                libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: _disk_at(
                    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE
                                | libvirt.VIR_DOMAIN_XML_INACTIVE), copy_to)}
        dom.migrateToURI3(f"qemu+tcp://{destination['address']}/system", params, flags)
        return time.perf_counter() - started


def _vda(root: Any) -> Any:
    return next(d for d in root.iterfind("devices/disk") if d.find("target") is not None
                and d.find("target").get("dev") == "vda")


def _disk_at(xml: str, path: str) -> str:
    root = etree.fromstring(xml)
    disk = _vda(root)
    source = disk.find("source")
    assert source is not None
    for attr in list(source.attrib):
        del source.attrib[attr]
    source.set("file", path)
    for chain in disk.findall("backingStore"):
        disk.remove(chain)
    etree.SubElement(disk, "backingStore")
    return etree.tostring(root, encoding="unicode")


async def agent_migrate(client: Client, vm_id: str, destination: JsonObject,
                        copy_sd: str | None) -> tuple[float, JsonObject]:
    params: JsonObject = {"vm_id": vm_id, "destination": destination["url"]}
    if copy_sd is not None:
        params.update(storage="copy", destination_sd_id=copy_sd)
    started = time.perf_counter()
    job_id = (await client.call("VM.migrate", params))["job_id"]
    job = (await client.call("Job.wait", {"job_id": job_id, "timeout": 300}))["job"]
    seconds = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise BenchError(f"VM.migrate {job['state']}: {job.get('error')}")
    return seconds, job["result"]


@dataclass
class Lab:
    hosts: list[JsonObject]
    clients: dict[str, Client]
    raw: Raw

    def other(self, name: str) -> JsonObject:
        return next(h for h in self.hosts if h["name"] != name)


async def round_trip(the_lab: Lab, vm_id: str, series: Series, copy: bool,
                     files: list[tuple[str, str]]) -> None:
    """agent A→B, raw B→A, raw A→B, agent B→A."""
    a, b = the_lab.hosts
    times: dict[str, float] = {"agent": 0.0, "raw": 0.0}
    for way, source in (("agent", a), ("raw", b), ("raw", a), ("agent", b)):
        destination = the_lab.other(source["name"])
        if way == "agent":
            seconds, result = await agent_migrate(
                the_lab.clients[source["name"]], vm_id, destination,
                destination["local_sd_id"] if copy else None)
            if result.get("downtime_ms") is not None:
                series.agent_downtime.append(float(result["downtime_ms"]))
            if copy:
                [made] = result["volumes"]
                files.append((destination["name"], made["path"]))
        else:
            target = None
            if copy:
                local = Path(on_host(destination["name"], "sh", "-c",
                                     "echo /var/lib/libvirt/virtnode-local/*/images"
                                     ).strip())
                target = str(local.parent / f"bench-raw-{uuid.uuid4().hex[:8]}.qcow2")
                files.append((destination["name"], target))
            seconds = await asyncio.to_thread(the_lab.raw.migrate, vm_id, source,
                                              destination, target)
            downtime = await asyncio.to_thread(the_lab.raw.downtime, vm_id)
            if downtime is not None:
                series.raw_downtime.append(downtime)
        getattr(series, way).append(seconds)
        times[way] += seconds
    series.pairs.append((times["agent"], times["raw"]))


async def remove_old_disks(the_lab: Lab, files: list[tuple[str, str]], keep: str) -> None:
    """The copies a guest left behind on the hosts it left (not the one it uses)."""
    for host, path in list(files):
        if path == keep:
            continue
        client = the_lab.clients[host]
        volumes = (await client.call("Volume.list", {
            "sd_id": next(h for h in the_lab.hosts if h["name"] == host)["local_sd_id"]}))[
            "volumes"]
        volume = next((v for v in volumes if v.get("path") == path), None)
        if volume is not None:
            await client.call("Volume.delete", {k: volume[k] for k in
                                                ("sd_id", "image_id", "volume_id")})
        else:
            on_host(host, "rm", "-f", path)
        files.remove((host, path))


async def run(hosts: list[JsonObject], rounds: int, memory: int,
              data: int) -> dict[str, Series]:
    tls = tls_context(hosts[0]["ca"], hosts[0]["cert"], hosts[0]["key"])
    clients = {h["name"]: await Client.connect(h["url"], tls=tls) for h in hosts}
    the_lab = Lab(hosts, clients, await asyncio.to_thread(Raw, hosts))
    a = hosts[0]
    on_a = clients[a["name"]]
    results = {"memory": Series(), "copy": Series()}
    made: list[str] = []
    files: list[tuple[str, str]] = []
    try:
        spec: JsonObject = {"name": f"vn-bench-mig-{uuid.uuid4().hex[:6]}",
                            "memory_mib": memory, "domain_type": "kvm", "machine": "pc"}
        vm_id = (await on_a.call("VM.create", {"spec": spec}))["vm_id"]
        made.append(vm_id)
        # Untimed, once each way: the first QEMU a lab host's libvirtd starts probes
        # QEMU's capabilities (seconds), whichever way asked for it.
        await round_trip(the_lab, vm_id, Series(), False, files)
        for _ in range(rounds):
            await round_trip(the_lab, vm_id, results["memory"], False, files)

        disk = (await on_a.call("Volume.create", {"sd_id": a["local_sd_id"],
                                                  "format": "qcow2", "size": 1 << 30}))[
            "volume"]
        on_host(a["name"], "qemu-io", "-f", "qcow2", "-c",
                f"write -P 0x5a 0 {data}M", disk["path"])
        files.append((a["name"], disk["path"]))
        spec = {**spec, "name": f"vn-bench-mig-{uuid.uuid4().hex[:6]}", "disks": [
            {"volume": {k: disk[k] for k in ("sd_id", "image_id", "volume_id")}}]}
        copied = (await on_a.call("VM.create", {"spec": spec}))["vm_id"]
        made.append(copied)
        for warm in [True] + [False] * rounds:
            await round_trip(the_lab, copied, Series() if warm else results["copy"], True,
                             files)
            now = the_lab.raw.conns[a["name"]].lookupByUUIDString(copied)
            path = _vda(etree.fromstring(now.XMLDesc(0))).find("source").get("file")
            await remove_old_disks(the_lab, files, path)
    finally:
        for vm_id in made:
            for client in clients.values():
                with contextlib.suppress(ClientError):  # not on this host
                    await client.call("VM.undefine", {"vm_id": vm_id, "force": True})
        await remove_old_disks(the_lab, files, "")
        for client in clients.values():
            await client.close()
        for conn in the_lab.raw.conns.values():
            conn.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    parser.add_argument("--data", type=int, default=256,
                        help="MiB written into the copied guest's disk")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    ours = False
    try:
        hosts = json.loads(lab("status", "--json") or "[]")
        if len(hosts) < 2:
            if hosts:
                raise BenchError("a lab of one host is up: tools/lab down first")
            lab("up", "2")
            ours = True
            hosts = json.loads(lab("status", "--json"))
        results = asyncio.run(run(hosts[:2], args.rounds, args.memory, args.data))
    except (BenchError, ClientError, OSError, libvirt.libvirtError) as exc:
        print(f"bench/migrate.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if ours:
            lab("down")
    summary = {name: series.summary() for name, series in results.items()}
    targets = [{"name": f"agent/raw migration time ({name})", "value": s["ratio"],
                "target": f"<= {TARGET_RATIO}", "passed": s["ratio"] <= TARGET_RATIO}
               for name, s in summary.items()]
    if args.json:
        print(json.dumps({"benchmark": "VM.migrate vs migrateToURI3 in the lab",
                          "machine": machine(libvirt=libvirt.getVersion()),
                          "options": vars(args), "results": summary, "targets": targets},
                         indent=2))
    else:
        print(f"{'guest':8} {'agent s':>8} {'raw s':>8} {'ratio':>6} "
              f"{'agent downtime ms':>18} {'raw downtime ms':>16}")
        for name, s in summary.items():
            print(f"{name:8} {s['agent_seconds']:8.3f} {s['raw_seconds']:8.3f} "
                  f"{s['ratio']:6.3f} {s['agent_downtime_ms']!s:>18} "
                  f"{s['raw_downtime_ms']!s:>16}")
        print_targets(targets, lambda t: f"{t['value']:.3f}")
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

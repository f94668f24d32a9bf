"""Scrape benchmark: the agent's ``GET /metrics`` against prometheus-libvirt-exporter.

On ``qemu:///system`` with ``--count`` firmware-only guests (64 MiB, ``kvm``, machine
``pc``, no disk, named ``vn-bench-stats-...``, started by this script), two servers run
in their own subprocesses, both listening on 127.0.0.1:

* the agent (``python -m virtnode serve``, defaults: VM statistics every 10 s), which
  renders ``/metrics`` from the sampler's cache;
* ``prometheus-libvirt-exporter`` (Debian's package) pointed at ``qemu:///system``, which
  asks libvirt for every scrape.

Both are scraped by one aiohttp client (one keep-alive session per server), alternating
scrape by scrape, the order flipping every round; the time is from sending the request to
having read the whole body. Reported: p50 and p90, the body size and series, and the CPU
time of each server per scrape (for the exporter, libvirtd's too: that is where its work
happens). Target: exporter p50 / agent p50 >= 10.

Then a content check: one more guest with a disk and an ``ethernet`` NIC (a tap device
that libvirt creates, on no bridge) is started so that the exporter shows its block and
interface families too; once the agent has sampled it, both are scraped and every family
of the exporter is listed with the virtnode family of the same meaning, with how many of
the exporter's series (VM, device) have a counterpart. Target: every family of the
exporter that is about libvirt is carried. ``promtool check metrics`` must accept the
agent's output.

Every guest this script makes is named ``vn-bench-stats-`` and all of them, and only
them, are removed before and after. The exit status is 1 if a target is missed, 2 if the
benchmark could not run.

    .venv/bin/python bench/scrape.py [--json] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
from prometheus_client.parser import text_string_to_metric_families

from common import (
    BenchError,
    JsonObject,
    Server,
    cpu_seconds,
    free_port,
    libvirt_version,
    libvirtd_pid,
    machine,
    percentile,
    print_targets,
    remove_guests,
    require_at_least_one,
    scrape_metrics,
    spawn,
    start_agent,
    take_guest_lock,
    wait_ready,
)
from stats import (
    PREFIX,
    URI,
    CycleWatch,
    open_libvirt,
    start_guests,
)

TARGET_SPEEDUP = 10.0
EXPORTER = "prometheus-libvirt-exporter"

#: The exporter's families about libvirt, and the virtnode family with the same meaning.
#: ``key`` says how a series of the exporter finds its counterpart: by VM, by VM and
#: device, or the family as a whole.
MAPPING: dict[str, tuple[str, str, str]] = {
    "libvirt_up": ("virtnode_hypervisor_connected", "whole", ""),
    "libvirt_domains_number": ("virtnode_vm_info", "count",
                               "one virtnode_vm_info series per running VM: count() them"),
    "libvirt_domain_state_code": ("virtnode_vm_info", "vm",
                                  "the state is a label (running, paused), not libvirt's code"),
    "libvirt_domain_info_cpu_time_seconds_total": ("virtnode_vm_cpu_seconds_total", "vm", ""),
    "libvirt_domain_info_maximum_memory_bytes": ("virtnode_vm_memory_maximum_bytes", "vm", ""),
    "libvirt_domain_info_memory_usage_bytes": (
        "virtnode_vm_memory_balloon_bytes", "vm",
        "virDomainGetInfo's memory is the balloon's current size"),
    "libvirt_domain_info_virtual_cpus": ("virtnode_vm_vcpus", "vm", ""),
    "libvirt_domain_block_stats_read_bytes_total": ("virtnode_vm_disk_read_bytes_total",
                                                    "disk", ""),
    "libvirt_domain_block_stats_read_requests_total": ("virtnode_vm_disk_reads_total",
                                                       "disk", ""),
    "libvirt_domain_block_stats_write_bytes_total": ("virtnode_vm_disk_write_bytes_total",
                                                     "disk", ""),
    "libvirt_domain_block_stats_write_requests_total": ("virtnode_vm_disk_writes_total",
                                                        "disk", ""),
    **{f"libvirt_domain_interface_stats_{name}_total": (
        f"virtnode_vm_network_{name}_total", "nic", "")
       for name in ("receive_bytes", "receive_packets", "receive_errors", "receive_drops",
                    "transmit_bytes", "transmit_packets", "transmit_errors",
                    "transmit_drops")},
}
#: Labels of the exporter's series and the virtnode label with the same meaning.
LABELS = {"domain": "vm_name", "uuid": "vm_id", "target_device": "device or interface",
          "source_file": "path (on virtnode_vm_disk_info)",
          "source_bridge": "bridge (on virtnode_vm_network_info)"}
#: Families about the exporter's own process and runtime, not about libvirt.
SELF_PREFIXES = ("go_", "process_", "promhttp_")

Samples = dict[str, list[dict[str, str]]]


# --- the servers ---------------------------------------------------------------------------


def start_exporter(tmp: Path) -> Server:
    binary = shutil.which(EXPORTER)
    if binary is None:
        raise BenchError(f"{EXPORTER} is not installed (tools/ensure-host installs it)")
    port = free_port()
    return spawn("exporter", [binary, f"--web.listen-address=127.0.0.1:{port}",
                              f"--libvirt.uri={URI}"],
                 f"tcp://127.0.0.1:{port}", tmp / "exporter.log")


def content_guest_xml(name: str, disk: Path, tap: str) -> str:
    """A firmware-only guest with one raw disk and one NIC on a tap device of its own."""
    return (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
            f"<interface type='ethernet'><target dev='{tap}' managed='yes'/>"
            "<model type='virtio'/></interface></devices></domain>")


# --- timing --------------------------------------------------------------------------------


@dataclass
class Timing:
    """The scrapes of one server."""

    seconds: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    libvirtd_cpu_s: float = 0.0
    body_bytes: int = 0
    samples: int = 0

    def summary(self) -> JsonObject:
        n = len(self.seconds)
        return {"scrapes": n, "p50_s": percentile(self.seconds, 50),
                "p90_s": percentile(self.seconds, 90), "min_s": min(self.seconds),
                "cpu_per_scrape_s": self.cpu_s / n,
                "libvirtd_cpu_per_scrape_s": self.libvirtd_cpu_s / n,
                "body_bytes": self.body_bytes, "samples": self.samples}


async def time_scrapes(servers: dict[str, Server], rounds: int, per_round: int,
                       warmup: int) -> dict[str, Timing]:
    daemon = libvirtd_pid()
    timings = {name: Timing() for name in servers}
    sessions = {name: aiohttp.ClientSession() for name in servers}
    try:
        for name, server in servers.items():
            await wait_ready(server, path="/metrics", session=sessions[name])
            for _ in range(warmup):
                await scrape_metrics(server, sessions[name])
        names = list(servers)
        for rnd in range(rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for _ in range(per_round):
                for name in order:
                    pid = servers[name].pid
                    cpu0 = cpu_seconds(pid)
                    lv0 = cpu_seconds(daemon) if daemon is not None else 0.0
                    seconds, body = await scrape_metrics(servers[name], sessions[name])
                    timing = timings[name]
                    timing.cpu_s += cpu_seconds(pid) - cpu0
                    if daemon is not None:
                        timing.libvirtd_cpu_s += cpu_seconds(daemon) - lv0
                    timing.seconds.append(seconds)
                    timing.body_bytes = len(body.encode())
        for name, server in servers.items():
            _, body = await scrape_metrics(server, sessions[name])
            timings[name].samples = sum(len(labels) for labels in samples_of(body).values())
    finally:
        for session in sessions.values():
            await session.close()
    return timings


# --- content -------------------------------------------------------------------------------


def samples_of(text: str) -> Samples:
    """The label sets of every sample, by sample name."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def families_of(text: str) -> list[tuple[str, str]]:
    """(sample name, type) of each family, as the exporter names them."""
    out = []
    for family in text_string_to_metric_families(text):
        names = dict.fromkeys(s.name for s in family.samples)
        out += [(name, family.type) for name in names]
    return out


def _key(kind: str, labels: dict[str, str]) -> tuple[str, ...]:
    vm = (labels.get("uuid") or labels.get("vm_id") or "").lower()
    if kind in ("disk", "nic"):
        return vm, labels.get("target_device") or labels.get("device") \
            or labels.get("interface") or ""
    return (vm,)


def compare(theirs_text: str, ours_text: str) -> list[JsonObject]:
    """Each family of the exporter, its virtnode counterpart and the series matched."""
    theirs, ours = samples_of(theirs_text), samples_of(ours_text)
    rows = []
    for name, kind in families_of(theirs_text):
        series = theirs[name]
        row: JsonObject = {"exporter": name, "type": kind, "series": len(series)}
        if name.startswith(SELF_PREFIXES):
            row.update(virtnode=None, matched=None, about="exporter itself",
                       note="the exporter's own process and runtime")
            rows.append(row)
            continue
        if name not in MAPPING:
            row.update(virtnode=None, matched=0, about="libvirt", note="no counterpart known")
            rows.append(row)
            continue
        target, how, note = MAPPING[name]
        mine = ours.get(target, [])
        if how == "whole":
            matched = len(series) if mine else 0
        elif how == "count":
            matched = len(series) if mine else 0
            note = f"{note} ({len(mine)} series here)"
        else:
            have = {_key(how, labels) for labels in mine}
            matched = sum(1 for labels in series if _key(how, labels) in have)
        row.update(virtnode=target if mine else None, matched=matched, about="libvirt",
                   note=note if mine else f"{target} has no series")
        rows.append(row)
    return rows


def promtool(text: str) -> tuple[bool, str]:
    """``promtool check metrics`` on ``text``: whether it passed, and what it said."""
    binary = shutil.which("promtool")
    if binary is None:
        return False, "promtool is not installed"
    done = subprocess.run([binary, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    said = (done.stdout + done.stderr).strip()
    return done.returncode == 0, said


def make_disk(tmp: Path) -> Path:
    """A 1 MiB raw image that QEMU (another user) can reach."""
    share = tmp / "disks"
    share.mkdir(mode=0o755)
    tmp.chmod(0o711)
    disk = share / "content.img"
    with disk.open("wb") as f:
        f.truncate(1024 * 1024)
    return disk


async def content_check(agent: Server, exporter: Server, conn: Any, tmp: Path,
                        count: int) -> JsonObject:
    """Start a guest with a disk and a NIC, wait until the agent sampled it, compare."""
    disk = make_disk(tmp)
    conn.createXML(content_guest_xml(f"{PREFIX}content", disk, "vnbs-content0"), 0)
    watch = CycleWatch(agent)
    try:
        await watch.open()
        await watch.settle(count + 1, cycles=2)
    finally:
        await watch.close()
    async with aiohttp.ClientSession() as session:
        _, theirs = await scrape_metrics(exporter, session)
        _, ours = await scrape_metrics(agent, session)
    passed, said = promtool(ours)
    return {"families": compare(theirs, ours), "promtool_passed": passed,
            "promtool_output": said, "vms": count + 1}


# --- the run -------------------------------------------------------------------------------


@dataclass
class Options:
    count: int
    memory_mib: int
    rounds: int
    scrapes: int
    warmup: int


async def run_bench(tmp: Path, conn: Any, opts: Options) -> JsonObject:
    servers: dict[str, Server] = {}
    try:
        servers["agent"] = start_agent(tmp, URI, listen=f"tcp://127.0.0.1:{free_port()}")
        servers["exporter"] = start_exporter(tmp)
        await wait_ready(servers["agent"])
        watch = CycleWatch(servers["agent"])
        try:
            await watch.open()
            await watch.settle(opts.count, cycles=2)
        finally:
            await watch.close()
        per_round = max(1, opts.scrapes // opts.rounds)
        timings = await time_scrapes(servers, opts.rounds, per_round, opts.warmup)
        content = await content_check(servers["agent"], servers["exporter"], conn, tmp,
                                      opts.count)
    finally:
        for server in servers.values():
            server.stop()
    return {"timing": {name: t.summary() for name, t in timings.items()}, "content": content}


def evaluate(result: JsonObject) -> list[JsonObject]:
    timing, content = result["timing"], result["content"]
    speedup = timing["exporter"]["p50_s"] / timing["agent"]["p50_s"]
    libvirt_rows = [r for r in content["families"] if r["about"] == "libvirt"]
    missing = [r["exporter"] for r in libvirt_rows if r["matched"] != r["series"]]
    return [
        {"name": "GET /metrics p50, exporter / agent", "value": f"{speedup:.1f}x",
         "target": f">= {TARGET_SPEEDUP:.0f}x", "passed": speedup >= TARGET_SPEEDUP},
        {"name": "the exporter's libvirt families carried",
         "value": f"{len(libvirt_rows) - len(missing)} of {len(libvirt_rows)}"
                  + (f" (missing: {', '.join(missing)})" if missing else ""),
         "target": "all", "passed": not missing and bool(libvirt_rows)},
        {"name": "promtool check metrics on the agent's output",
         "value": "clean" if content["promtool_passed"] else content["promtool_output"],
         "target": "clean", "passed": content["promtool_passed"]},
    ]


# --- report --------------------------------------------------------------------------------


def _machine() -> JsonObject:
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", EXPORTER],
                             capture_output=True, text=True, check=False).stdout.strip()
    return machine(libvirt=libvirt_version(), exporter=version or "unknown")


def _lines(rows: Iterable[JsonObject]) -> Iterable[str]:
    for r in rows:
        matched = "-" if r["matched"] is None else f"{r['matched']}/{r['series']}"
        ours = r["virtnode"] or "MISSING"
        note = f"  ({r['note']})" if r["note"] else ""
        yield f"  {r['exporter']:<52} {ours:<42} {matched:>7}{note}"


def print_table(result: JsonObject, targets: list[JsonObject], opts: Options) -> None:
    info = result["machine"]
    print(f"machine: {info['cpus']} x {info['cpu_model']}, {info['memory_gib']} GiB; "
          f"Python {info['python']}, libvirt {info['libvirt']}, {EXPORTER} "
          f"{info['exporter']}; virtnode {info['virtnode']}")
    load = " ".join(f"{v:.2f}" for v in result["load_before"])
    print(f"load average {load} before; {URI}, {opts.count} firmware-only guests; "
          f"scrapes alternating, {opts.rounds} rounds")
    print()
    agent, exporter = result["timing"]["agent"], result["timing"]["exporter"]
    print(f"{'':<28}{'exporter':>12}{'agent':>12}{'exporter/agent':>16}")
    for label, key, scale, fmt in (("scrape p50 (ms)", "p50_s", 1e3, "{:.2f}"),
                                   ("scrape p90 (ms)", "p90_s", 1e3, "{:.2f}"),
                                   ("fastest scrape (ms)", "min_s", 1e3, "{:.2f}"),
                                   ("server CPU/scrape (ms)", "cpu_per_scrape_s", 1e3,
                                    "{:.2f}"),
                                   ("libvirtd CPU/scrape (ms)", "libvirtd_cpu_per_scrape_s",
                                    1e3, "{:.2f}")):
        e, a = exporter[key] * scale, agent[key] * scale
        ratio = f"{e / a:>15.1f}x" if a > 0 else f"{'-':>16}"
        print(f"{label:<28}{fmt.format(e):>12}{fmt.format(a):>12}{ratio}")
    print(f"{'body (bytes)':<28}{exporter['body_bytes']:>12}{agent['body_bytes']:>12}")
    print(f"{'samples':<28}{exporter['samples']:>12}{agent['samples']:>12}")
    print(f"{'scrapes':<28}{exporter['scrapes']:>12}{agent['scrapes']:>12}")
    content = result["content"]
    print()
    print(f"content, {content['vms']} guests (one with a disk and a NIC): the exporter's "
          f"families, virtnode's counterpart, exporter series matched")
    about_libvirt = [r for r in content["families"] if r["about"] == "libvirt"]
    itself = [r for r in content["families"] if r["about"] != "libvirt"]
    print("\n".join(_lines(about_libvirt)))
    labels = ", ".join(f"{k} -> {v or 'MISSING'}" for k, v in LABELS.items())
    print(f"  labels: {labels}")
    print(f"  about the exporter itself ({len(itself)} families: "
          f"{', '.join(sorted({r['exporter'].split('_')[0] + '_*' for r in itself}))}): "
          "the agent exports its own process_* families; go_* and promhttp_* describe "
          "the exporter's runtime")
    if not content["promtool_passed"]:
        print(f"  promtool check metrics:\n{content['promtool_output']}")
    print()
    print_targets(targets)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=20, help="firmware-only guests")
    p.add_argument("--memory", type=int, default=64, metavar="MIB", help="memory per guest")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds; the order of the two servers flips every round")
    p.add_argument("--scrapes", type=int, default=200, help="timed scrapes per server")
    p.add_argument("--warmup", type=int, default=5, help="untimed scrapes per server first")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    require_at_least_one(p, args, "count", "rounds", "scrapes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.count, args.memory, args.rounds, args.scrapes, args.warmup)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised
    load_before = os.getloadavg()
    conn = None
    try:
        take_guest_lock()
        with tempfile.TemporaryDirectory(prefix="virtnode-bench-") as tmpdir:
            conn = open_libvirt()
            try:
                removed = remove_guests(conn, PREFIX)
                start_guests(conn, opts.count, opts.memory_mib, "scrape")
                result = asyncio.run(run_bench(Path(tmpdir), conn, opts))
            finally:
                remove_guests(conn, PREFIX)
    except (BenchError, OSError, aiohttp.ClientError, libvirt.libvirtError) as exc:
        print(f"bench/scrape.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
    result.update(machine=_machine(), load_before=load_before,
                  load_after=os.getloadavg(), removed_at_start=removed,
                  options=asdict(opts))
    targets = evaluate(result)
    if args.json:
        print(json.dumps({"benchmark": f"GET /metrics, agent vs {EXPORTER}", **result,
                          "targets": targets}, indent=2))
    else:
        print_table(result, targets, opts)
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

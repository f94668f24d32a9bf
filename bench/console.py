"""Console benchmark: the agent's ``/console/{token}`` WebSocket against websockify.

Two measurements, each taken through the agent and through ``websockify`` (Debian's
``/usr/bin/websockify``, a plain WebSocket-to-TCP bridge) in the same run, with the same
client code (one aiohttp WebSocket per session, loopback TCP for both):

* serial round trip: the ``console`` guest of ``tests/guests.py`` (busybox shell on
  ttyS0, prompt ``guest# ``) under TCG, twice: one VM created by ``VM.create`` with the
  agent's pty console (the agent's path: WebSocket, agent, libvirt's console stream,
  pty), and one defined here with libvirt directly from the same domain XML but a
  ``<serial type='tcp'>`` listening on 127.0.0.1 that websockify bridges. A round trip is
  sending ``echo x''N\\r`` in one frame and waiting for ``xN\\r\\n``; the next one is
  sent after the prompt is back. ``--trips`` timed round trips per path and round after
  ``--warmup`` untimed ones; p50 and p95 over all rounds.
* VNC throughput: one firmware-only guest under KVM (64 MiB, machine ``pc``, VNC on
  127.0.0.1 without a password), defined here with libvirt directly. The agent's path is
  ``VM.openConsole`` kind ``vnc`` (``virDomainOpenGraphics``); websockify bridges
  QEMU's VNC port from the live XML. After the RFB 3.8 handshake (no authentication,
  shared) and SetEncodings Raw only, the client sends a non-incremental
  FramebufferUpdateRequest for the whole screen, reads the whole update, and repeats for
  ``--seconds``. QEMU sends an update only on its display refresh timer (every 50 to
  200 ms here), so the *paced stream* (payload bytes per wall-clock second) is QEMU's
  rate for any bridge that keeps up, and differs between paths by a missed or gained
  tick. What the bridge itself sets is how fast an update flows once QEMU sends it:
  *VNC throughput* is the median over updates of its size divided by the time from its
  first byte to its last (*update carried*), and that is the throughput target. The
  paced stream is reported beside it.

The agent (``python -m virtnode serve`` on ``qemu:///system``, a private temporary state
directory, log level ``warning``, a unix socket for the calls (root is admin there) and a
loopback TCP listener for the consoles) and websockify run in their own subprocesses and
are stopped by their pids at the end. Every VM this script makes is named
``vn-bench-console-...``; all of them, and only them, are removed before and after the
run. Each measurement runs ``--rounds`` times, agent and websockify alternating.

Targets: the agent's serial p50 at most 1.2 times websockify's, and its VNC throughput at
least websockify's. The exit status is 1 if one is missed, 2 if the benchmark could not
run.

    .venv/bin/python bench/console.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import psutil
from lxml import etree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import guests
from virtnode.client import Client, ClientError
from virtnode.vm.spec import check_spec, domain_xml

from common import (
    READY_TIMEOUT,
    BenchError,
    JsonObject,
    Server,
    free_port,
    libvirt_version,
    machine,
    percentile,
    print_targets,
    remove_guests,
    require_at_least_one,
    spawn,
    take_guest_lock,
    wait_ready,
)

URI = "qemu:///system"
PREFIX = "vn-bench-console-"
#: Targets: the agent's serial p50 relative to websockify's; its VNC throughput relative.
TARGET_LATENCY = 1.2
TARGET_THROUGHPUT = 1.0
#: How long the console guest may take to boot to its shell under TCG.
BOOT_TIMEOUT = 180.0
#: Longest one round trip or one framebuffer update may take.
STEP_TIMEOUT = 30.0
PROMPT = b"guest# "
PATHS = ("agent", "websockify")

Conn = Any  # libvirt.virConnect; libvirt ships no type information


# --- guests --------------------------------------------------------------------------------


def console_spec(name: str, image: guests.GuestImage) -> JsonObject:
    return {"name": name, "memory_mib": guests.MEMORY_MIB, "domain_type": "qemu",
            "machine": "pc", "kernel": str(image.kernel), "initrd": str(image.initrd),
            "cmdline": "console=ttyS0"}


def _xml(spec: JsonObject) -> etree._Element:
    metadata = {"owner": "virtnode", "created": f"{time.time():.3f}", "labels": {}}
    return etree.fromstring(domain_xml(check_spec(spec, "kvm"), metadata))


def unix_serial_xml(spec: JsonObject, path: Path) -> str:
    """The domain XML of ``spec`` with its serial console on a unix socket QEMU listens on."""
    root = _xml(spec)
    devices = root.find("devices")
    assert devices is not None
    for tag in ("serial", "console"):
        old = devices.find(tag)
        assert old is not None
        target = old.find("target")
        assert target is not None
        old.clear()
        old.set("type", "unix")
        etree.SubElement(old, "source", mode="bind", path=str(path))
        old.append(target)
    return etree.tostring(root, encoding="unicode")


def open_vnc_xml(name: str) -> str:
    """A firmware-only KVM guest whose VNC listens on 127.0.0.1 without a password."""
    root = _xml({"name": name, "memory_mib": 64, "domain_type": "kvm", "machine": "pc",
                 "graphics": "vnc", "serial": False})
    graphics = root.find("devices/graphics")
    assert graphics is not None
    for attr in ("passwd", "passwdValidTo"):
        graphics.attrib.pop(attr, None)
    return etree.tostring(root, encoding="unicode")


def start_domain(conn: Conn, xml: str) -> Any:
    dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.create()
    return dom


def vnc_port(dom: Any) -> int:
    graphics = etree.fromstring(dom.XMLDesc(0)).find("devices/graphics[@type='vnc']")
    if graphics is None or int(graphics.get("port", "-1")) <= 0:
        raise BenchError(f"{dom.name()} has no VNC port in its live XML")
    return int(graphics.get("port"))


# --- websockify ----------------------------------------------------------------------------


def start_websockify(tmp: Path, name: str, target: int | Path) -> Server:
    """websockify on a free loopback port, bridging to a TCP port of 127.0.0.1 or to a
    unix socket."""
    command = shutil.which("websockify")
    if command is None:
        raise BenchError("websockify is not installed (Debian package websockify)")
    port = free_port()
    to = ([f"--unix-target={target}"] if isinstance(target, Path)
          else [f"127.0.0.1:{target}"])
    return spawn(name, [command, f"127.0.0.1:{port}", *to],
                 f"tcp://127.0.0.1:{port}", tmp / f"{name}.log")


async def wait_listening(server: Server, timeout: float = READY_TIMEOUT) -> None:
    host, port = server.url.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{server.name} does not listen on {server.url}") from None
            await asyncio.sleep(0.05)


def stop_with_children(server: Server) -> None:
    """Stop a server we started and then the children it forked (websockify forks one per
    connection), each by its pid."""
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.stop()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    psutil.wait_procs(children, timeout=5)


# --- sessions ------------------------------------------------------------------------------


class Session:
    """One WebSocket session: binary payload in ``buf``, read on demand."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buf = bytearray()
        self.received = 0

    async def more(self) -> None:
        msg = await self.ws.receive(timeout=STEP_TIMEOUT)
        if msg.type is aiohttp.WSMsgType.BINARY:
            self.buf += msg.data
            self.received += len(msg.data)
        elif msg.type is not aiohttp.WSMsgType.TEXT:
            raise BenchError(f"the console session ended: {msg.type.name} "
                             f"{self.ws.close_code} {msg.extra}")

    async def read_until(self, marker: bytes, start: int = 0) -> int:
        """Read until ``marker`` is in the buffer from ``start``; the index after it."""
        while (at := self.buf.find(marker, start)) < 0:
            await self.more()
        return at + len(marker)

    async def read(self, size: int) -> bytes:
        while len(self.buf) < size:
            await self.more()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    async def skip(self, size: int) -> None:
        """Drop ``size`` bytes without copying more than one message at a time."""
        while size > 0:
            if not self.buf:
                await self.more()
            taken = min(size, len(self.buf))
            del self.buf[:taken]
            size -= taken


@contextlib.asynccontextmanager
async def session(http: aiohttp.ClientSession, url: str) -> AsyncIterator[Session]:
    async with http.ws_connect(url, protocols=("binary",), max_msg_size=0,
                               compress=0, autoping=True) as ws:
        yield Session(ws)


async def agent_url(client: Client, agent_http: str, vm_id: str, kind: str) -> str:
    grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": kind,
                                                 "takeover": "keep"})
    return agent_http.replace("http://", "ws://") + str(grant["url"])


# --- serial --------------------------------------------------------------------------------


async def round_trip(s: Session, n: int) -> float:
    """Type ``echo x''N``; seconds until its answer; then wait for the prompt."""
    s.buf.clear()
    started = time.perf_counter()
    await s.ws.send_bytes(f"echo x''{n}\r".encode())
    end = await s.read_until(f"x{n}\r\n".encode())
    elapsed = time.perf_counter() - started
    await s.read_until(PROMPT, end)
    return elapsed


async def wait_for_shell(http: aiohttp.ClientSession, url: str) -> None:
    """Until the baseline guest's shell answers through websockify (QEMU keeps no output
    for a TCP serial nobody is connected to, so the shell is asked, not waited for)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            async with session(http, url) as s:
                await s.ws.send_bytes(b"\r")
                async with asyncio.timeout(2.0):
                    await s.read_until(PROMPT)
                return
        except (TimeoutError, aiohttp.ClientError, BenchError):
            if time.monotonic() > deadline:
                raise BenchError("the websockify guest's shell did not answer within "
                                 f"{BOOT_TIMEOUT:.0f}s") from None
            await asyncio.sleep(1.0)


async def wait_for_console_log(client: Client, vm_id: str) -> None:
    async with asyncio.timeout(BOOT_TIMEOUT):
        while True:
            log = await client.call("VM.getConsoleLog", {"vm_id": vm_id, "format": "text"})
            if guests.GUEST_READY in log["text"] and PROMPT.decode() in log["text"]:
                return
            await asyncio.sleep(0.2)


async def serial_series(http: aiohttp.ClientSession, url: str, opts: Options,
                        rnd: int) -> list[float]:
    async with session(http, url) as s:
        base = rnd * (opts.warmup + opts.trips) * 10
        for i in range(opts.warmup):
            await round_trip(s, base + i)
        return [await round_trip(s, base + opts.warmup + i) for i in range(opts.trips)]


# --- VNC -----------------------------------------------------------------------------------


async def rfb_handshake(s: Session) -> tuple[int, int, int]:
    """RFB 3.8, no authentication, shared; then Raw encoding only. Width, height, bytes
    per pixel."""
    if await s.read(12) != b"RFB 003.008\n":
        raise BenchError("the server does not speak RFB 3.8")
    await s.ws.send_bytes(b"RFB 003.008\n")
    count = (await s.read(1))[0]
    if 1 not in await s.read(count):
        raise BenchError("the VNC server does not offer no-authentication")
    await s.ws.send_bytes(b"\x01")
    if await s.read(4) != b"\x00\x00\x00\x00":
        raise BenchError("the VNC security handshake failed")
    await s.ws.send_bytes(b"\x01")
    width, height = struct.unpack(">HH", await s.read(4))
    pixel_format = await s.read(16)
    (name_length,) = struct.unpack(">I", await s.read(4))
    await s.read(name_length)
    await s.ws.send_bytes(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw
    return width, height, pixel_format[0] // 8


async def framebuffer_update(s: Session, bpp: int) -> tuple[float, int]:
    """Read one FramebufferUpdate of Raw rectangles: seconds from its first byte to its
    last (the time the bridge takes to carry it, without QEMU's wait for its timer), and
    its size in bytes."""
    kind, count = struct.unpack(">BxH", await s.read(4))
    started = time.perf_counter()
    if kind != 0:
        raise BenchError(f"unexpected RFB server message type {kind}")
    size = 4
    for _ in range(count):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await s.read(12))
        if encoding != 0:
            raise BenchError(f"unexpected RFB encoding {encoding}")
        await s.skip(w * h * bpp)
        size += 12 + w * h * bpp
    return time.perf_counter() - started, size


@dataclass
class VncRound:
    """One VNC session's figures."""

    stream_bytes_per_s: float  # the paced stream: payload bytes / wall time
    carried_s: list[float]  # per update: first byte to last
    flow_bytes_per_s: list[float]  # per update: its size / its carried time


async def vnc_throughput(http: aiohttp.ClientSession, url: str, seconds: float
                         ) -> VncRound:
    async with session(http, url) as s:
        width, height, bpp = await rfb_handshake(s)
        request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)
        await s.ws.send_bytes(request)  # warm-up: the first update, not counted
        await framebuffer_update(s, bpp)
        first = s.received - len(s.buf)
        started = time.perf_counter()
        carried, flow = [], []
        while (elapsed := time.perf_counter() - started) < seconds:
            await s.ws.send_bytes(request)
            took, size = await framebuffer_update(s, bpp)
            carried.append(took)
            flow.append(size / took)
        return VncRound((s.received - len(s.buf) - first) / elapsed, carried, flow)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    warmup: int
    trips: int
    seconds: float


@dataclass
class Figures:
    """One path's measurements."""

    round_trips_s: list[float] = field(default_factory=list)
    p50_by_round_s: list[float] = field(default_factory=list)
    vnc_bytes_per_s: list[float] = field(default_factory=list)  # the paced stream, by round
    vnc_update_carried_s: list[float] = field(default_factory=list)  # every update
    vnc_flow_bytes_per_s: list[float] = field(default_factory=list)  # every update

    def summary(self) -> JsonObject:
        return {"p50_s": percentile(self.round_trips_s, 50),
                "p95_s": percentile(self.round_trips_s, 95),
                "vnc_bytes_per_s": statistics.median(self.vnc_bytes_per_s),
                "vnc_update_carried_s": statistics.median(self.vnc_update_carried_s),
                "vnc_flow_bytes_per_s": statistics.median(self.vnc_flow_bytes_per_s)}


@dataclass
class Setup:
    tmp: Path
    conn: Conn
    agent: Server
    agent_http: str
    bridges: list[Server] = field(default_factory=list)


def start_virtnode(tmp: Path) -> tuple[Server, str]:
    """The agent, with a unix socket for the calls and a loopback TCP port for consoles."""
    (tmp / "agent.toml").write_text("")
    unix = f"unix:{tmp / 'agent.sock'}"
    port = free_port()
    argv = [sys.executable, "-m", "virtnode", "serve", "--config", str(tmp / "agent.toml"),
            "--listen", unix, "--listen", f"tcp://127.0.0.1:{port}",
            "--state-dir", str(tmp / "agent-state"), "--hypervisor", URI,
            "--log-level", "warning",
            "--set", f"vm.allowed_paths={json.dumps([str(guests.cache_root())])}"]
    return spawn("agent", argv, unix, tmp / "agent.log"), f"http://127.0.0.1:{port}"


async def run_bench(setup: Setup, opts: Options) -> dict[str, Figures]:
    figures = {path: Figures() for path in PATHS}
    image = await guests.guest_image("console")
    await wait_ready(setup.agent)
    tag = uuid.uuid4().hex[:6]
    serial_socket = guests.console_log_path(f"{PREFIX}serial-ws-{tag}").with_suffix(".sock")
    async with await Client.connect(setup.agent.url) as client:
        created = await client.call("VM.create", {"spec": console_spec(
            f"{PREFIX}serial-agent-{tag}", image)})
        serial_vm = str(created["vm_id"])
        await asyncio.to_thread(start_domain, setup.conn, unix_serial_xml(
            console_spec(f"{PREFIX}serial-ws-{tag}", image), serial_socket))
        vnc_dom = await asyncio.to_thread(start_domain, setup.conn,
                                          open_vnc_xml(f"{PREFIX}vnc-{tag}"))
        vnc_vm = vnc_dom.UUIDString()
        serial_ws = start_websockify(setup.tmp, "websockify-serial", serial_socket)
        setup.bridges.append(serial_ws)
        vnc_ws = start_websockify(setup.tmp, "websockify-vnc",
                                  await asyncio.to_thread(vnc_port, vnc_dom))
        setup.bridges.append(vnc_ws)
        for bridge in setup.bridges:
            await wait_listening(bridge)
        ws_serial_url = serial_ws.url.replace("tcp://", "ws://") + "/"
        ws_vnc_url = vnc_ws.url.replace("tcp://", "ws://") + "/"
        async with aiohttp.ClientSession() as http:
            await wait_for_console_log(client, serial_vm)
            await wait_for_shell(http, ws_serial_url)
            for rnd in range(opts.rounds):
                order = PATHS if rnd % 2 == 0 else PATHS[::-1]
                for path in order:
                    url = (await agent_url(client, setup.agent_http, serial_vm, "serial")
                           if path == "agent" else ws_serial_url)
                    trips = await serial_series(http, url, opts, rnd)
                    figures[path].round_trips_s += trips
                    figures[path].p50_by_round_s.append(statistics.median(trips))
                for path in order:
                    url = (await agent_url(client, setup.agent_http, vnc_vm, "vnc")
                           if path == "agent" else ws_vnc_url)
                    vnc = await vnc_throughput(http, url, opts.seconds)
                    figures[path].vnc_bytes_per_s.append(vnc.stream_bytes_per_s)
                    figures[path].vnc_update_carried_s += vnc.carried_s
                    figures[path].vnc_flow_bytes_per_s += vnc.flow_bytes_per_s
    return figures


# --- report --------------------------------------------------------------------------------


def _machine() -> JsonObject:
    return machine(libvirt=libvirt_version())


def evaluate(figures: dict[str, Figures]) -> JsonObject:
    agent, ws = figures["agent"].summary(), figures["websockify"].summary()
    latency = agent["p50_s"] / ws["p50_s"]
    throughput = agent["vnc_flow_bytes_per_s"] / ws["vnc_flow_bytes_per_s"]
    return {"ratios": {"serial_p50": latency,
                       "serial_p95": agent["p95_s"] / ws["p95_s"],
                       "vnc_throughput": throughput,
                       "vnc_stream": agent["vnc_bytes_per_s"] / ws["vnc_bytes_per_s"],
                       "vnc_update_carried": (agent["vnc_update_carried_s"]
                                              / ws["vnc_update_carried_s"])},
            "targets": [
                {"name": "serial round trip p50, agent / websockify", "value": latency,
                 "target": f"<= {TARGET_LATENCY:.2f}", "passed": latency <= TARGET_LATENCY},
                {"name": "VNC throughput, agent / websockify", "value": throughput,
                 "target": f">= {TARGET_THROUGHPUT:.2f}",
                 "passed": throughput >= TARGET_THROUGHPUT},
            ]}


def print_table(figures: dict[str, Figures], verdict: JsonObject, opts: Options,
                load: tuple[float, float]) -> None:
    info = _machine()
    print(f"machine: {info['cpus']} x {info['cpu_model']}, {info['memory_gib']} GiB; "
          f"Python {info['python']}, libvirt {info['libvirt']}; virtnode {info['virtnode']}")
    print(f"load average {load[0]:.2f} before, {load[1]:.2f} after; {opts.rounds} round(s), "
          f"agent and websockify alternating; serial: {opts.trips} timed round trips per "
          f"round; VNC: {opts.seconds:g} s per round, medians")
    print()
    agent, ws = figures["agent"].summary(), figures["websockify"].summary()
    ratios = verdict["ratios"]
    print(f"{'':<28}{'websockify':>12}{'agent':>12}{'agent/ws':>10}")
    for label, key, scale, unit, ratio in (
            ("serial round trip p50", "p50_s", 1e3, "ms", ratios["serial_p50"]),
            ("serial round trip p95", "p95_s", 1e3, "ms", ratios["serial_p95"]),
            ("VNC throughput", "vnc_flow_bytes_per_s", 1 / 2**20, "MiB/s",
             ratios["vnc_throughput"]),
            ("VNC paced stream", "vnc_bytes_per_s", 1 / 2**20, "MiB/s",
             ratios["vnc_stream"]),
            ("VNC update carried p50", "vnc_update_carried_s", 1e3, "ms",
             ratios["vnc_update_carried"])):
        print(f"{label + ' (' + unit + ')':<28}{ws[key] * scale:>12.2f}"
              f"{agent[key] * scale:>12.2f}{ratio:>9.2f}x")
    if opts.rounds > 1:
        print()
        for path in PATHS:
            p50s = ", ".join(f"{v * 1e3:.2f}" for v in figures[path].p50_by_round_s)
            vnc = ", ".join(f"{v / 2**20:.1f}" for v in figures[path].vnc_bytes_per_s)
            print(f"  {path} by round: p50 {p50s} ms; VNC paced stream {vnc} MiB/s")
    print()
    print_targets(verdict["targets"], lambda t: f"{t['value']:.2f}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per path, alternating")
    p.add_argument("--trips", type=int, default=200,
                   help="timed serial round trips per path and round")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed serial round trips before each series")
    p.add_argument("--seconds", type=float, default=15.0,
                   help="seconds of VNC updates per path and round")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    require_at_least_one(p, args, "rounds", "trips")
    if args.warmup < 0 or args.seconds <= 0:
        p.error("--warmup must be at least 0 and --seconds more than 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.rounds, args.warmup, args.trips, args.seconds)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised
    load_before = os.getloadavg()[0]
    conn: Conn = None
    setup: Setup | None = None
    agent_log = ""
    try:
        take_guest_lock()
        with tempfile.TemporaryDirectory(prefix="virtnode-bench-") as tmpdir:
            try:
                conn = libvirt.open(URI)
                remove_guests(conn, PREFIX)
                agent, agent_http = start_virtnode(Path(tmpdir))
                setup = Setup(Path(tmpdir), conn, agent, agent_http)
                figures = asyncio.run(run_bench(setup, opts))
            except BaseException:
                agent_log = setup.agent.log_tail() if setup is not None else ""
                raise
            finally:
                if setup is not None:
                    for bridge in setup.bridges:
                        stop_with_children(bridge)
                    setup.agent.stop()
                if conn is not None:
                    remove_guests(conn, PREFIX)
                    conn.close()
    except (BenchError, ClientError, aiohttp.ClientError, OSError, TimeoutError,
            libvirt.libvirtError) as exc:
        print(f"bench/console.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        if agent_log:
            print(f"the agent's log ends with:\n{agent_log}", file=sys.stderr)
        return 2
    load = (load_before, os.getloadavg()[0])
    verdict = evaluate(figures)
    if args.json:
        report = {
            "benchmark": "serial round trip and VNC throughput: agent WebSocket vs websockify",
            "machine": _machine(),
            "options": asdict(opts),
            "load_average_1min": {"before": load[0], "after": load[1]},
            "results": {path: {**asdict(f), "summary": f.summary()}
                        for path, f in figures.items()},
            **verdict,
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(figures, verdict, opts, load)
    return 0 if all(t["passed"] for t in verdict["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

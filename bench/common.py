"""What the benchmarks share: servers in subprocesses, readiness, CPU time, the machine.

The benchmark scripts are run as ``python bench/NAME.py``, so this module is imported as
``common`` from the scripts' own folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import psutil

import virtnode
from virtnode.util.jsontypes import JsonObject
from virtnode.vm.spec import check_spec, domain_xml

#: How long a started server may take to be ready (answer ``GET /healthz`` with 200), and
#: bench/events.py's subscriber processes to have subscribed.
READY_TIMEOUT = 120.0
#: How long a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0


MiB = 1024 * 1024

#: Held by every benchmark that makes guests on qemu:///system while it runs: two at
#: once would disturb each other's figures (and ``vn-bench-`` covers both prefixes).
GUEST_LOCK = Path(tempfile.gettempdir()) / "virtnode-bench-guests.lock"
#: Where the host's libvirt daemon writes its pid: the monolithic libvirtd, or the modular
#: virtqemud that serves qemu:///system in its place.
LIBVIRTD_PID_FILES = (Path("/run/libvirtd.pid"), Path("/var/run/libvirtd.pid"),
                      Path("/run/virtqemud.pid"))
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                   | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


class BenchError(Exception):
    """The benchmark could not run (a server did not start, a response was wrong)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server this benchmark started, listening on ``url`` (``unix:PATH`` or ``tcp://``)."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def ws_url(self) -> str:
        """The WebSocket URL of a TCP listener."""
        return "ws://" + self.url.removeprefix("tcp://") + "/rpc"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}:\n"
                             f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process we started (by its pid) and wait; SIGKILL if it hangs."""
        if self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=STOP_TIMEOUT)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop on SIGTERM; killing it", file=sys.stderr)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def spawn(name: str, argv: Sequence[str], url: str, log_path: Path) -> Server:
    """Start ``argv`` with its stderr in ``log_path``."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)
    return Server(name, proc, url, log_path)


def start_agent(tmp: Path, hypervisor: str, *, listen: str | None = None,
                overrides: Sequence[str] = (), name: str = "agent",
                python: str = sys.executable) -> Server:
    """Start ``python -m virtnode serve`` with its state and an empty config in ``tmp``.

    ``listen`` defaults to a unix socket in ``tmp``; ``overrides`` are ``--set`` items;
    ``python`` is the interpreter (another checkout's virtual environment, to compare).
    """
    config = tmp / f"{name}.toml"
    config.write_text("")  # isolate the run from a host-wide configuration file
    url = listen or f"unix:{tmp / (name + '.sock')}"
    argv = [
        python, "-m", "virtnode", "serve",
        "--config", str(config),
        "--listen", url,
        "--state-dir", str(tmp / f"{name}-state"),
        "--hypervisor", hypervisor,
        "--log-level", "warning",
    ]
    for item in overrides:
        argv += ["--set", item]
    return spawn(name, argv, url, tmp / f"{name}.log")


async def wait_ready(server: Server, timeout: float = READY_TIMEOUT, *, path: str = "/healthz",
                     session: aiohttp.ClientSession | None = None) -> None:
    """Poll ``GET path`` until it answers 200; BenchError if the server exits first.

    With ``session`` (TCP servers only) the polls go through it, so its connection to the
    server is open for what follows.
    """
    deadline = time.monotonic() + timeout
    if server.url.startswith("unix:"):
        socket_path = server.url.removeprefix("unix:")
        base = "http://localhost"
    else:
        socket_path = ""
        base = "http://" + server.url.removeprefix("tcp://")
    while True:
        server.check_alive()
        try:
            if session is not None:
                async with session.get(base + path) as resp:
                    if resp.status == 200:
                        return
            else:
                connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
                async with (aiohttp.ClientSession(connector=connector) as own,
                            own.get(base + path) as resp):
                    if resp.status == 200:
                        return
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} did not answer GET {path} with 200 within "
                             f"{timeout:.0f}s:\n{server.log_tail()}")
        await asyncio.sleep(0.05)


async def scrape_metrics(server: Server,
                         session: aiohttp.ClientSession | None = None) -> tuple[float, str]:
    """``GET /metrics`` of a TCP server: seconds from sending the request to having read
    the whole body, and the body. Without ``session``, one is opened for this request.
    """
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await scrape_metrics(server, own)
    url = "http://" + server.url.removeprefix("tcp://") + "/metrics"
    started = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.text()
    seconds = time.perf_counter() - started
    if resp.status != 200:
        raise BenchError(f"{server.name}: GET /metrics answered {resp.status}")
    return seconds, body


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def percentile(values: Iterable[float], pct: float) -> float:
    """The ``pct`` percentile (0 to 100) of ``values``, NaN if there are none.

    Linear interpolation between the two closest ranks, as ``numpy.percentile`` does and
    ``statistics.quantiles(method="inclusive")``: the 50th is the median, the 100th the
    largest value.
    """
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = pct / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median over rounds of ``ours[i] / theirs[i]``, the two measured in the same round."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def sync() -> None:
    """``sync``: write back every dirty page, so the next measurement does not pay for it."""
    subprocess.run(["sync"], check=True)


def write_incompressible(path: str | Path, size: int) -> None:
    """Write ``size`` bytes of non-zero data that does not compress (one random MiB over
    and over) from the start of ``path``, created if missing, not truncated; then sync.
    """
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as out:
        for _ in range(size // MiB):
            out.write(block)
    sync()


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


def source_revision() -> str:
    """The git revision the benchmark runs from, with ``+dirty`` for local changes."""
    root = str(Path(__file__).resolve().parent.parent)
    try:
        rev = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine(**extra: Any) -> JsonObject:
    """The machine and software the figures were taken on."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "virtnode": f"{virtnode.__version__} ({source_revision()})",
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        **extra,
    }


def require_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         *names: str) -> None:
    """Reject (``parser.error``) any of the options ``names`` (dest names) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def _value(target: JsonObject) -> str:
    return f"{target['value']}"


def print_targets(targets: Sequence[JsonObject],
                  shown: Callable[[JsonObject], str] = _value) -> None:
    """``PASS`` or ``FAIL``, the name, the value as ``shown`` writes it, and the target."""
    for target in targets:
        status = "PASS" if target["passed"] else "FAIL"
        print(f"{status}  {target['name']}: {shown(target)} (target {target['target']})")


def libvirt_version() -> str:
    """The version of the libvirt library this process uses, as ``MAJOR.MINOR.MICRO``."""
    lib = libvirt.getVersion()
    return f"{lib // 1_000_000}.{lib // 1000 % 1000}.{lib % 1000}"


def take_guest_lock() -> int:
    """Lock :data:`GUEST_LOCK` for this process's lifetime; BenchError if another run has it."""
    fd = os.open(GUEST_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BenchError(f"another benchmark with guests is running ({GUEST_LOCK} is locked)"
                         ) from None
    return fd


def guest_spec(name: str, memory_mib: int) -> JsonObject:
    """The ``VM.create`` spec of a firmware-only benchmark guest (``kvm``, machine ``pc``)."""
    return {"name": name, "memory_mib": memory_mib, "domain_type": "kvm", "machine": "pc"}


def guest_xml(name: str, memory_mib: int) -> str:
    """The domain XML the agent writes for :func:`guest_spec` (with its metadata)."""
    metadata = {"owner": "virtnode", "created": f"{time.time():.3f}", "labels": {}}
    return domain_xml(check_spec(guest_spec(name, memory_mib), "kvm"), metadata)


def libvirtd_pid() -> int | None:
    """The pid of the host's libvirt daemon, to notice a restart or to read its CPU time."""
    for path in LIBVIRTD_PID_FILES:
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{value}").exists():
            return value
    return None


def remove_guests(conn: Any, prefix: str) -> int:
    """Destroy and undefine every domain whose name starts with ``prefix``; how many."""
    removed = 0
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(prefix):
            continue
        removed += 1
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefineFlags(_UNDEFINE_FLAGS)
    left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    if left:
        raise BenchError(f"cannot remove the benchmark's VMs: {', '.join(sorted(left))}")
    return removed

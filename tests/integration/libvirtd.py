"""The host's libvirtd, for tests that need qemu:///system or must kill and restart it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from signal import SIGCONT

from tests.subproc import run

QEMU_URI = "qemu:///system"
PID_FILES = (Path("/run/libvirtd.pid"), Path("/var/run/libvirtd.pid"))
SYSTEMD = Path("/run/systemd/system").is_dir()


async def answers(timeout: float = 10.0) -> bool:
    """Whether libvirtd answers on qemu:///system."""
    try:
        done = await run("virsh", "-c", QEMU_URI, "uri", timeout=timeout)
    except (TimeoutError, FileNotFoundError):
        return False
    return done.status == 0


def pid() -> int:
    for path in PID_FILES:
        try:
            value = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
        if Path(f"/proc/{value}").exists():
            return value
    raise AssertionError("libvirtd is not running (no live pid file)")


async def start(timeout: float = 30.0) -> None:
    """Start libvirtd the way tools/ensure-host does and wait until it answers."""
    if SYSTEMD:
        (await run("systemctl", "start", "libvirtd.service")).check()
    else:
        (await run("libvirtd", "-d")).check()
    await _until_it_answers(timeout, "libvirtd did not come back")


async def resume(timeout: float = 30.0) -> None:
    """SIGCONT a stopped libvirtd and wait until it answers, so that no later test (nor
    tools/ensure-host) meets a daemon still catching up."""
    signal(SIGCONT)
    await _until_it_answers(timeout, "libvirtd did not answer again after SIGCONT")


async def _until_it_answers(timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not await answers():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.2)


def signal(signum: int) -> int:
    """Send ``signum`` to libvirtd; returns its pid."""
    target = pid()
    os.kill(target, signum)
    return target

"""The host's libvirtd, for tests that need qemu:///system or must kill and restart it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

QEMU_URI = "qemu:///system"
PID_FILES = (Path("/run/libvirtd.pid"), Path("/var/run/libvirtd.pid"))
SYSTEMD = Path("/run/systemd/system").is_dir()


async def run(*argv: str, timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def answers(timeout: float = 10.0) -> bool:
    """Whether libvirtd answers on qemu:///system."""
    try:
        status, _ = await run("virsh", "-c", QEMU_URI, "uri", timeout=timeout)
    except (TimeoutError, FileNotFoundError):
        return False
    return status == 0


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
        await run("systemctl", "start", "libvirtd.service")
    else:
        status, out = await run("libvirtd", "-d")
        assert status == 0, out
    deadline = time.monotonic() + timeout
    while not await answers():
        assert time.monotonic() < deadline, "libvirtd did not come back"
        await asyncio.sleep(0.2)


def signal(signum: int) -> int:
    """Send ``signum`` to libvirtd; returns its pid."""
    target = pid()
    os.kill(target, signum)
    return target

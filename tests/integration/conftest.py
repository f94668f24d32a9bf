"""Fixtures for tests on the host's libvirtd (qemu:///system)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from tests.agentproc import IMAGE_ROOT, AgentProcess, start_agent
from tests.conftest import missing
from tests.integration import libvirtd as daemon
from tests.integration.lab import hosts  # noqa: F401 - fixture
from tests.integration.wireserver import serve, served, wire_schema  # noqa: F401 - fixtures
from tests.subproc import run
from virtnode.client import Client, RemoteError

#: Names of VMs the tests create start with this, so that cleanup finds them all.
VM_PREFIX = os.environ.get("VIRTNODE_TEST_VM_PREFIX", "vn-it-")

FAST_RECOVERY = {
    "hypervisor": {
        "keepalive_interval": 1,
        "keepalive_count": 2,
        "reconnect_min": 0.2,
        "reconnect_max": 1.0,
    }
}


@pytest.fixture
async def qemu_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    """An agent on qemu:///system that notices a lost libvirtd within seconds."""
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=FAST_RECOVERY)
    yield agent
    status = await agent.stop()
    assert status == 0, agent.log


@pytest.fixture
async def impatient_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    """Like ``qemu_agent``, with a 1 s deadline on every libvirt call."""
    sections = {"hypervisor": {**FAST_RECOVERY["hypervisor"], "call_timeout": 1.0}}
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=sections)
    yield agent
    status = await agent.stop()
    assert status == 0, agent.log


def vm_name() -> str:
    return f"{VM_PREFIX}{uuid.uuid4().hex[:8]}"


def _remove_test_vms(prefix: str) -> None:
    import libvirt

    conn = libvirt.open(daemon.QEMU_URI)
    try:
        for dom in conn.listAllDomains():
            if not dom.name().startswith(prefix):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


@pytest.fixture
async def cleanup_vms(libvirtd: None) -> AsyncIterator[None]:
    """Remove every VM the test made (by name prefix), whatever happened."""
    yield
    await asyncio.to_thread(_remove_test_vms, VM_PREFIX)


async def virt(fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(conn)`` on a fresh qemu:///system connection in a thread."""
    import libvirt

    def call() -> Any:
        conn = libvirt.open(daemon.QEMU_URI)
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(call)


@pytest.fixture
async def image_dir() -> AsyncIterator[Path]:
    """A directory QEMU (running as its own user) can reach, removed afterwards."""
    path = IMAGE_ROOT / uuid.uuid4().hex[:8]
    await asyncio.to_thread(path.mkdir, parents=True)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o777)
    yield path
    await asyncio.to_thread(shutil.rmtree, path, True)


async def make_image(directory: Path, name: str, size: str = "16M",
                     fmt: str = "qcow2") -> Path:
    path = directory / name
    (await run("qemu-img", "create", "-q", "-f", fmt, path, size)).check()
    return path


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no space until written."""
    with open(path, "wb") as handle:
        handle.truncate(size)


class LoopFsFactory(Protocol):
    async def __call__(self, size: int, *, mount: Path | None = None,
                       mkfs_options: Sequence[str] = ()) -> str: ...


@pytest.fixture
async def loop_fs(tmp_path: Path) -> AsyncIterator[LoopFsFactory]:
    """Make sparse ext4 images under tmp_path on loop devices; returns the device.

    ``mount`` (a directory, made if absent) mounts the filesystem there. Afterwards every
    mount of each device, the fixture's own or one an agent left, is unmounted and the
    device detached.
    """
    if os.geteuid() != 0:
        missing("loop devices need root")
    if not await asyncio.to_thread(os.path.exists, "/dev/loop-control"):
        missing("no loop devices (/dev/loop-control is absent)")
    folder = tmp_path / "loop-fs"
    devices: list[str] = []

    async def make(size: int, *, mount: Path | None = None,
                   mkfs_options: Sequence[str] = ()) -> str:
        await asyncio.to_thread(folder.mkdir, exist_ok=True)
        image = folder / f"{len(devices)}.img"
        await asyncio.to_thread(sparse_file, image, size)
        (await run("mkfs.ext4", "-q", "-F", *mkfs_options, image)).check()
        device = (await run("losetup", "--find", "--show", image)).check().strip()
        devices.append(device)
        if mount is not None:
            await asyncio.to_thread(mount.mkdir, parents=True, exist_ok=True)
            (await run("mount", device, mount)).check()
        return device

    try:
        yield make
    finally:
        for device in devices:
            targets = await run("findmnt", "--list", "-no", "TARGET", "--source", device)
            for target in targets.out.splitlines():
                await run("umount", target)
            await run("losetup", "-d", device)


def qemu_io_command() -> str:
    """Where qemu-io is; its absence is ``missing``."""
    path = shutil.which("qemu-io")
    if path is None:
        missing("qemu-io is not installed (qemu-utils)")
    assert path is not None
    return path


async def qemu_io(image: str | Path, fmt: str, command: str) -> str:
    """Run one qemu-io command (``write -P 0x11 0 1M``, ``read -P ...``) on ``image``."""
    return (await run(qemu_io_command(), "-f", fmt, "-c", command, image)).check()


async def qemu_pid(name: str) -> int:
    """The pid of the QEMU process libvirtd runs for VM ``name``."""
    text = await asyncio.to_thread(Path(f"/run/libvirt/qemu/{name}.pid").read_text)
    return int(text.strip())


@pytest.fixture
async def bridge() -> AsyncIterator[str]:
    """A Linux bridge with no uplink for NIC tests, deleted afterwards."""
    name = f"vnbr{uuid.uuid4().hex[:6]}"
    (await run("ip", "link", "add", name, "type", "bridge")).check()
    (await run("ip", "link", "set", name, "up")).check()
    yield name
    await run("ip", "link", "del", name)


async def next_event(client: Client, topic: str, predicate: Callable[[dict[str, Any]], bool],
                     timeout: float = 15.0) -> dict[str, Any]:
    """The next event on ``topic`` whose data satisfies ``predicate``."""
    async with asyncio.timeout(timeout):
        async for note in client.notifications():
            params = note["params"]
            if note["method"] == "event" and params["topic"] == topic and predicate(
                    params["data"]):
                return dict(params["data"])
    raise AssertionError("connection closed before the event")


async def expect_error(client: Client, method: str, params: dict[str, Any],
                       name: str | None = None, reason: str | None = None) -> RemoteError:
    """The error ``method`` answers with; its name and reason checked when given."""
    with pytest.raises(RemoteError) as caught:
        await client.call(method, params)
    if name is not None:
        assert caught.value.name == name, caught.value.error
    if reason is not None:
        assert caught.value.reason == reason, caught.value.error
    return caught.value


async def wait_job(client: Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """The job once it has finished, or as it is after ``timeout`` seconds (Job.wait)."""
    job: dict[str, Any] = (await client.call("Job.wait",
                                             {"job_id": job_id, "timeout": timeout}))["job"]
    return job


async def scrape(url: str, path: str = "/metrics",
                 unix: Path | None = None) -> tuple[int, str, str]:
    """GET ``url + path`` (over the unix socket ``unix`` if given): status, type, body."""
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else None
    async with (aiohttp.ClientSession(connector=connector) as session,
                session.get(url + path) as resp):
        return resp.status, resp.headers["Content-Type"], await resp.text()

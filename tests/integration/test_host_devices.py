"""host.device events from a real agent, for loop devices and veth pairs made by the test.

Needs root (losetup, ip link). Devices are named ``vn-t-*`` (veth) or are loop devices
the test made itself; only those are removed. The veth pair gets no addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import sparse_file
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

IMAGE_SIZE = 8 * 1024 * 1024
LOOP_CTL_REMOVE = 0x4C81
EVENT_TIMEOUT = 15.0

Predicate = Callable[[dict[str, Any]], bool]


@pytest.fixture
def root_tools() -> None:
    if os.geteuid() != 0:
        missing("device tests need root (losetup, ip link)")
    for tool in ("losetup", "ip"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")


@pytest.fixture
async def devices(root_tools: None, agent: AgentProcess,
                  checked_client: ClientFactory) -> AsyncIterator[Client]:
    """A client subscribed to host.device on the agent."""
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["host.device"]})
    yield client


async def expect(client: Client, *wanted: Predicate,
                 timeout: float = EVENT_TIMEOUT) -> list[dict[str, Any]]:
    """Wait until every predicate has matched a host.device event, in the given order."""
    found: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for note in client.notifications():
            params = note["params"]
            assert note["method"] == "event" and params["topic"] == "host.device", note
            seen.append(params["data"])
            if wanted[len(found)](params["data"]):
                found.append(params["data"])
                if len(found) == len(wanted):
                    return found
    raise AssertionError(f"connection closed; events seen: {seen}")


def event(action: str, name: str, **fields: Any) -> Predicate:
    def match(data: dict[str, Any]) -> bool:
        return (data["action"] == action and data["name"] == name
                and all(data.get(k) == v for k, v in fields.items()))
    return match


def any_of(*predicates: Predicate) -> Predicate:
    return lambda data: any(p(data) for p in predicates)


async def test_capabilities_say_which_source_is_used(agent: AgentProcess,
                                                     checked_client: ClientFactory) -> None:
    client = await checked_client(agent.unix_url)
    caps = await client.call("Host.getCapabilities")
    udev = await asyncio.to_thread(Path("/run/udev/control").exists)
    assert caps["features"]["device_events"] == ("udev" if udev else "kernel")
    await agent.wait_log("host device events from")
    assert "host.device" in caps["features"]["events"]


async def test_veth_pair_add_and_remove(devices: Client) -> None:
    name = f"vn-t-{uuid.uuid4().hex[:6]}"
    peer = f"{name}p"
    try:
        (await run("ip", "link", "add", name, "type", "veth", "peer", "name", peer)).check()
        added = await expect(devices, any_of(event("add", name), event("add", peer)),
                             any_of(event("add", name), event("add", peer)))
        assert {a["name"] for a in added} == {name, peer}
        for data in added:
            assert data["subsystem"] == "net"
            assert data["devpath"].endswith(f"/net/{data['name']}")
            assert data["ifindex"] > 0
            assert len(data["mac"].split(":")) == 6
        (await run("ip", "link", "del", name)).check()
        removed = await expect(devices, any_of(event("remove", name), event("remove", peer)),
                               any_of(event("remove", name), event("remove", peer)))
        assert {r["name"] for r in removed} == {name, peer}
        assert all("mac" not in r for r in removed)
    finally:
        await run("ip", "link", "del", name)


async def test_attaching_a_loop_device_is_a_change(devices: Client, tmp_path: Path) -> None:
    image = tmp_path / "loop.img"
    await asyncio.to_thread(sparse_file, image, IMAGE_SIZE)
    node = (await run("losetup", "-f", "--show", image)).check().strip()
    name = Path(node).name
    try:
        # losetup -f may first create the device (add); either way attaching changes it.
        attached = await expect(devices, event("change", name, size_bytes=IMAGE_SIZE))
        assert attached[0]["devnode"] == node
        assert attached[0]["devtype"] == "disk"
        assert attached[0]["major"] == 7
    finally:
        await run("losetup", "-d", node)
    await expect(devices, event("change", name, size_bytes=0))


def _free_loop_number() -> int:
    number = 64
    while Path(f"/sys/block/loop{number}").exists() or Path(f"/dev/loop{number}").exists():
        number += 1
    return number


def _remove_loop_device(number: int) -> None:
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        fcntl.ioctl(fd, LOOP_CTL_REMOVE, number)
    finally:
        os.close(fd)


async def test_loop_device_add_and_remove(devices: Client, tmp_path: Path) -> None:
    number = await asyncio.to_thread(_free_loop_number)
    name, node = f"loop{number}", f"/dev/loop{number}"
    image = tmp_path / "loop.img"
    await asyncio.to_thread(sparse_file, image, IMAGE_SIZE)
    created = False
    try:
        # losetup creates a loop device that does not exist yet.
        (await run("losetup", "--show", node, image)).check()
        created = True
        added = await expect(devices, event("add", name))
        assert added[0]["devnode"] == node
        assert added[0]["minor"] == number
        (await run("losetup", "-d", node)).check()
        await asyncio.to_thread(_remove_loop_device, number)
        created = False
        removed = await expect(devices, event("remove", name))
        assert removed[0]["major"] == 7
        assert "size_bytes" not in removed[0]
    finally:
        if created:
            await run("losetup", "-d", node)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_remove_loop_device, number)

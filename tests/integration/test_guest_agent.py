"""The guest agent of a real guest: qemu-guest-agent in the ``agent`` test guest, on the
channel every VM gets from its spec. What it reports reaches VM.getInfo and ``vm.guest``
events; VM.freeze really freezes (a write in the guest waits for the thaw); every freeze
ends, by VM.thaw, by its timeout, or at the agent's next start after a crash; a guest
agent that never answers delays nothing else; VM.shutdown goes through it."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests import guests
from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import expect_error, make_image, vm_name
from tests.integration.consoleclient import console
from tests.integration.serialshell import SerialShell, serial_shell
from virtnode.client import Client, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

#: Short enough for a test to wait for a refresh, long enough not to be a busy loop.
SECTIONS = {"guest_agent": {"refresh_interval": 5, "timeout": 2}}


@pytest.fixture
async def ga_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=SECTIONS)
    yield agent
    if agent.proc.returncode is None:
        await agent.stop()


async def agent_vm(client: Client, image_dir: Path, disk: str = "data.qcow2",
                   **spec: Any) -> str:
    image = await guests.guest_image("agent")
    path = await make_image(image_dir, disk, "64M")
    created = await client.call("VM.create", {"spec": {
        "name": vm_name(), "domain_type": "qemu", "memory_mib": 256,
        "kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": "console=ttyS0",
        "disks": [{"path": str(path), "format": "qcow2"}], **spec}})
    return str(created["vm_id"])


async def guest_when(client: Client, vm_id: str, holds: Callable[[dict[str, Any]], bool],
                     timeout: float = 120) -> dict[str, Any]:
    """VM.getInfo's guest section once ``holds(section)``."""
    deadline = time.monotonic() + timeout
    while True:
        guest: dict[str, Any] = (await client.call("VM.getInfo", {"vm_id": vm_id}))["guest"]
        if holds(guest):
            return guest
        assert time.monotonic() < deadline, f"the guest section never got there: {guest}"
        await asyncio.sleep(0.2)


async def guest_events(client: Client, vm_id: str) -> list[dict[str, Any]]:
    got = await client.call("Events.get", {"since": 0, "topics": ["vm.guest"], "limit": 1000})
    return [e["data"] for e in got["events"] if e["data"]["vm_id"] == vm_id]


async def event_when(client: Client, vm_id: str, holds: Callable[[dict[str, Any]], bool],
                     timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for event in await guest_events(client, vm_id):
            if holds(event):
                return event
        assert time.monotonic() < deadline, await guest_events(client, vm_id)
        await asyncio.sleep(0.2)


async def start_write(shell: SerialShell, number: int) -> tuple[re.Pattern[bytes], int]:
    """Type a write into /data whose answer (``WROTE-<number>``, computed by the shell so
    that the typed line does not hold it) comes once the write is done."""
    start = len(shell.socket.output)
    await shell.socket.send(
        f"echo {number} > /data/file{number}; echo WROTE-$(({number} + 0))\r".encode())
    return re.compile(rb"WROTE-%d\r?\n" % number), start


async def wrote(shell: SerialShell, done: tuple[re.Pattern[bytes], int],
                timeout: float) -> bool:
    try:
        await shell._read(done[0], timeout, done[1])
    except TimeoutError:
        return False
    return True


async def test_what_the_guest_agent_reports_reaches_getinfo_and_events(
        ga_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(ga_agent.unix_url)
    image = await guests.guest_image("agent")
    vm_id = await agent_vm(client, image_dir)

    guest = await guest_when(client, vm_id,
                             lambda g: g["agent"] == "connected" and g["fetched_at"])
    assert guest["os"]["kernel_release"] == image.kernel_release
    assert guest["os"]["machine"] == "x86_64"
    assert 0 <= guest["age_seconds"] < 10 and not guest["frozen"]
    # The guest's init leaves its loopback down: no address yet.
    assert guest["interfaces"] == [{"name": "lo", "hwaddr": "00:00:00:00:00:00",
                                    "addresses": []}]
    kinds = [e["event"] for e in await guest_events(client, vm_id)]
    assert kinds[:2] == ["connected", "info"], kinds

    async with serial_shell(ga_agent, client, vm_id) as shell:
        status, out = await shell.run(
            "datadisk && echo one > /data/one && sync && ip link set lo up")
        assert status == 0, out
        # The next refresh shows the new filesystem, with the disk it is on, and the
        # loopback's addresses.
        guest = await guest_when(client, vm_id, lambda g: any(
            f["mountpoint"] == "/data" for f in g.get("filesystems", [])), timeout=30)
        assert {"type": "ipv4", "address": "127.0.0.1", "prefix": 8} in \
            guest["interfaces"][0]["addresses"], guest["interfaces"]
        [data] = [f for f in guest["filesystems"] if f["mountpoint"] == "/data"]
        assert data["type"] == "ext4" and data["total_bytes"] > 50 * 2**20, data
        assert data["disks"] == ["vda"], data  # the VM's device name for the disk
    assert any(e["event"] == "info" and any(
        f["mountpoint"] == "/data" for f in e["guest"].get("filesystems", []))
        for e in await guest_events(client, vm_id))


async def test_a_frozen_guest_waits_and_every_freeze_ends(
        ga_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
        tmp_path: Path) -> None:
    client = await checked_client(ga_agent.unix_url)
    vm_id = await agent_vm(client, image_dir)
    await guest_when(client, vm_id, lambda g: g["agent"] == "connected")
    async with serial_shell(ga_agent, client, vm_id) as shell:
        status, out = await shell.run("datadisk")
        assert status == 0, out

        # Frozen: a write waits until VM.thaw.
        frozen = await client.call("VM.freeze", {"vm_id": vm_id, "timeout": 60})
        assert frozen["frozen"] >= 1 and frozen["thaw_at"] > time.time() + 50
        guest = (await client.call("VM.getInfo", {"vm_id": vm_id}))["guest"]
        assert (guest["frozen"], guest["thaw_at"]) == (True, frozen["thaw_at"])
        await expect_error(client, "VM.freeze", {"vm_id": vm_id}, "FailedPrecondition",
                           "already_frozen")
        write = await start_write(shell, 2)
        assert not await wrote(shell, write, 3), "a write went through a frozen filesystem"
        assert (await client.call("VM.thaw", {"vm_id": vm_id}))["thawed"] >= 1
        assert await wrote(shell, write, 10), "the write did not finish after the thaw"
        assert not (await client.call("VM.getInfo", {"vm_id": vm_id}))["guest"]["frozen"]
        await event_when(client, vm_id, lambda e: e["event"] == "thawed"
                         and e["reason"] == "thaw")

        # A freeze nobody thaws ends by itself.
        began = time.monotonic()
        await client.call("VM.freeze", {"vm_id": vm_id, "timeout": 2})
        write = await start_write(shell, 3)
        assert await wrote(shell, write, 30), "the freeze did not end at its timeout"
        assert time.monotonic() - began >= 1.5
        await event_when(client, vm_id, lambda e: e["event"] == "thawed"
                         and e["reason"] == "timeout")

        # Nor does a freeze outlive an agent that crashed: the next one thaws it.
        await client.call("VM.freeze", {"vm_id": vm_id, "timeout": 600})
        write = await start_write(shell, 4)
        assert not await wrote(shell, write, 2)
    await ga_agent.stop(signal.SIGKILL)
    again = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI, sections=SECTIONS)
    try:
        client = await checked_client(again.unix_url)
        await event_when(client, vm_id, lambda e: e["event"] == "thawed"
                         and e["reason"] == "agent_restart")
        grant = await client.call("VM.openConsole", {"vm_id": vm_id, "kind": "serial",
                                                     "takeover": "disconnect"})
        async with console(again, grant["url"], via="unix") as socket:
            shell = SerialShell(socket)
            await shell.wait_prompt()
            status, out = await shell.run("cat /data/file4")
            assert (status, out.strip()) == (0, "4")
        guest = await guest_when(client, vm_id, lambda g: g["agent"] == "connected")
        assert not guest["frozen"]
    finally:
        await again.stop()


async def test_a_guest_agent_that_never_answers_delays_nothing_else(
        ga_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(ga_agent.unix_url)
    vm_id = await agent_vm(client, image_dir)
    await guest_when(client, vm_id, lambda g: g["agent"] == "connected" and g["fetched_at"])
    async with serial_shell(ga_agent, client, vm_id) as shell:
        status, out = await shell.run("kill -STOP $(pidof qemu-ga)")
        assert status == 0, out
        try:
            freeze = asyncio.create_task(client.call("VM.freeze", {"vm_id": vm_id}))
            await asyncio.sleep(0.3)
            assert not freeze.done()
            began = time.monotonic()
            info = await client.call("VM.getInfo", {"vm_id": vm_id})
            await client.call("VM.list", {})
            assert time.monotonic() - began < 1.0, "a stuck guest agent delayed other calls"
            assert info["state"] == "running"
            with pytest.raises(RemoteError) as caught:
                await freeze
            assert caught.value.reason == "guest_agent_unavailable", caught.value.error
        finally:
            await shell.run("kill -CONT $(pidof qemu-ga)")


async def test_shutdown_goes_through_the_guest_agent_when_there_is_one(
        ga_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(ga_agent.unix_url)
    vm_id = await agent_vm(client, image_dir)
    await guest_when(client, vm_id, lambda g: g["agent"] == "connected")
    result = await client.call("VM.shutdown", {"vm_id": vm_id, "methods": ["agent"],
                                               "timeout": 60})
    assert (result["stopped_by"], result["tried"]) == ("agent", ["agent"])

    # Without the channel the agent method is skipped at once.
    bare = await agent_vm(client, image_dir, "bare.qcow2", guest_agent=False)
    assert (await client.call("VM.getInfo", {"vm_id": bare}))["guest"]["agent"] == "none"
    began = time.monotonic()
    result = await client.call("VM.shutdown", {"vm_id": bare, "methods": ["agent", "acpi"],
                                               "timeout": 60})
    assert (result["stopped_by"], result["tried"]) == ("acpi", ["acpi"])
    assert time.monotonic() - began < 60

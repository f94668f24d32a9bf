"""The ``agent`` guest of tests/guests.py on qemu:///system: Debian's qemu-ga answers on
the virtio-serial channel ``org.qemu.guest_agent.0``, and freezes and thaws the ext2
filesystem that ``datadisk`` makes on the guest's virtio disk.

One guest serves the module: defined directly with libvirt (no agent of ours), its serial
port a unix socket the tests type into (``guest# `` prompt) and log to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import guests
from tests.agentproc import IMAGE_ROOT
from tests.conftest import missing
from tests.integration import libvirtd as daemon
from tests.integration.conftest import VM_PREFIX, _remove_test_vms, sparse_file
from tests.integration.serialshell import SerialShell

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

#: The VMs of these tests, and only they, are removed afterwards.
PREFIX = f"{VM_PREFIX}agent-"
BOOT_TIMEOUT = 120.0
#: libvirt learns that the guest opened the channel from a QEMU event shortly after.
AGENT_TIMEOUT = 30.0
DISK_SIZE = 64 * 1024 * 1024


class SocketTerminal:
    """The guest's serial port as its unix socket gives it, for :class:`SerialShell`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.output = bytearray()

    async def receive(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("the serial socket closed")
        self.output += data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Guest:
    dom: Any  # libvirt.virDomain
    name: str
    image: guests.GuestImage
    console: Path
    shell: SerialShell
    terminal: SocketTerminal
    boot_seconds: float


async def check_host() -> None:
    """What the libvirtd fixture checks, for a guest that lives as long as the module
    (and under TCG: no /dev/kvm needed)."""
    if os.geteuid() != 0:
        missing("tests on qemu:///system need root")
    if not await daemon.answers():
        missing("libvirtd does not answer on qemu:///system (run tools/ensure-host)")


@contextlib.asynccontextmanager
async def booted(*, channel: bool, disk: bool) -> AsyncIterator[Guest]:
    """A transient agent guest booted to its ready marker and prompting; removed after."""
    import libvirt

    await check_host()
    image = await guests.guest_image("agent")
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    # QEMU runs as its own user: the directory of the disk and socket must let it in.
    directory = IMAGE_ROOT / name
    await asyncio.to_thread(directory.mkdir, parents=True)
    os.chmod(directory.parent, 0o755)
    os.chmod(directory, 0o777)
    console = await asyncio.to_thread(guests.console_log_path, name)
    socket = directory / "serial.sock"
    data = directory / "data.raw"
    if disk:
        await asyncio.to_thread(sparse_file, data, DISK_SIZE)
    xml = guests.domain_xml(image, name, str(uuid.uuid4()), console,
                            disk=data if disk else None, agent_channel=channel,
                            serial_socket=socket)
    conn = await asyncio.to_thread(libvirt.open, daemon.QEMU_URI)
    dom = terminal = None
    try:
        started = time.monotonic()
        dom = await asyncio.to_thread(conn.createXML, xml, 0)
        await guests.wait_for_console(console, timeout=BOOT_TIMEOUT)
        boot = time.monotonic() - started
        print(f"agent guest {name} (channel={channel}, disk={disk}) ready after {boot:.2f} s")
        terminal = SocketTerminal(*await asyncio.open_unix_connection(str(socket)))
        shell = SerialShell(terminal)
        await shell.wait_prompt()
        # Without a size the shell wraps what it echoes at 80 columns.
        await shell.run("stty cols 4000")
        yield Guest(dom, name, image, console, shell, terminal, boot)
    finally:
        if terminal is not None:
            await terminal.close()
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.destroy)  # transient: destroying removes it
        await asyncio.to_thread(conn.close)
        await asyncio.to_thread(console.unlink, missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, directory, True)


@pytest.fixture(scope="module")
async def guest() -> AsyncIterator[Guest]:
    """The agent guest with the guest agent's channel and a blank 64 MiB virtio disk."""
    try:
        async with booted(channel=True, disk=True) as running:
            yield running
    finally:
        # Whatever a failed test left behind.
        await asyncio.to_thread(_remove_test_vms, PREFIX)


async def agent(guest: Guest, execute: str, arguments: dict[str, Any] | None = None,
                timeout: int = 10) -> Any:
    """One guest agent command through libvirt; its "return" value."""
    import libvirt_qemu

    command = json.dumps({"execute": execute,
                          **({"arguments": arguments} if arguments is not None else {})})
    answer = await asyncio.to_thread(libvirt_qemu.qemuAgentCommand, guest.dom, command,
                                     timeout, 0)
    return json.loads(answer)["return"]


async def agent_log(guest: Guest) -> str:
    status, log = await guest.shell.run("cat /tmp/qemu-ga.log")
    return log if status == 0 else f"(no qemu-ga log: {log})"


async def ping(guest: Guest) -> float:
    """Seconds until guest-ping answers."""
    import libvirt

    started = time.monotonic()
    while True:
        try:
            assert await agent(guest, "guest-ping") == {}
            return time.monotonic() - started
        except libvirt.libvirtError as error:
            # "QEMU guest agent is not connected" until libvirt has seen the guest open
            # its end of the channel.
            if time.monotonic() - started > AGENT_TIMEOUT:
                raise AssertionError(f"guest-ping: {error}; qemu-ga's log:\n"
                                     f"{await agent_log(guest)}") from error
            await asyncio.sleep(0.2)


async def test_guest_agent_answers_ping(guest: Guest) -> None:
    print(f"guest-ping answered {await ping(guest):.2f} s after the ready marker")
    log = await asyncio.to_thread(guests.console_tail, guest.console)
    assert "qemu-ga runs on /dev/vport" in log and guests.AGENT_CHANNEL in log, log


async def test_guest_agent_is_started_again_when_it_exits(guest: Guest) -> None:
    status, first = await guest.shell.run("pidof qemu-ga")
    assert status == 0, first
    assert (await guest.shell.run("kill $(pidof qemu-ga)"))[0] == 0
    print(f"guest-ping answered {await ping(guest):.2f} s after qemu-ga was killed")
    status, second = await guest.shell.run("pidof qemu-ga")
    assert status == 0 and second != first, (first, second)
    assert "qemu-ga exited" in await agent_log(guest)


async def test_guest_agent_reports_the_guest(guest: Guest) -> None:
    info = await agent(guest, "guest-get-osinfo")
    assert info["kernel-release"] == guest.image.kernel_release, info
    assert info["machine"] == "x86_64", info
    # The host name is the guest's own, as it is now.
    assert (await guest.shell.run("hostname agentguest"))[0] == 0
    assert await agent(guest, "guest-get-host-name") == {"host-name": "agentguest"}


async def test_guest_agent_freezes_and_thaws_the_data_disk(guest: Guest) -> None:
    status, out = await guest.shell.run("datadisk", timeout=60)
    assert status == 0, out
    status, out = await guest.shell.run("grep ' /data ' /proc/mounts")
    assert status == 0 and out.startswith("/dev/vda /data ext4 "), out
    status, out = await guest.shell.run("echo hello > /data/marker && sync")
    assert status == 0, out

    assert await agent(guest, "guest-fsfreeze-status") == "thawed"
    try:
        frozen = await agent(guest, "guest-fsfreeze-freeze", timeout=30)
        print(f"guest-fsfreeze-freeze froze {frozen} filesystem(s)")
        assert isinstance(frozen, int) and frozen >= 1, (frozen, await agent_log(guest))
        assert await agent(guest, "guest-fsfreeze-status") == "frozen"
    finally:
        thawed = await agent(guest, "guest-fsfreeze-thaw", timeout=30)
    assert thawed == frozen
    assert await agent(guest, "guest-fsfreeze-status") == "thawed"
    # Thawed, the filesystem takes writes again and kept what was written before.
    status, out = await guest.shell.run("echo again >> /data/marker && cat /data/marker")
    assert (status, out) == (0, "hello\nagain\n")

    # datadisk mounts an existing filesystem as it is.
    assert (await guest.shell.run("umount /data && datadisk"))[0] == 0
    assert await guest.shell.run("cat /data/marker") == (0, "hello\nagain\n")


async def test_guest_without_the_channel_or_a_disk_still_gets_ready() -> None:
    async with booted(channel=False, disk=False) as bare:
        log = await asyncio.to_thread(guests.console_tail, bare.console)
        assert f"no {guests.AGENT_CHANNEL} channel" in log, log
        status, out = await bare.shell.run("pidof qemu-ga")
        assert status != 0, out

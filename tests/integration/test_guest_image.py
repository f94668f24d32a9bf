"""The real Linux test guest of tests/guests.py: built and cached, booted under TCG on
qemu:///system, and it reacts (or, as "noacpi", does not) to ACPI shutdown and reboot."""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import pytest

from tests import guests
from tests.integration import libvirtd as daemon

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.usefixtures("libvirtd")]

T = TypeVar("T")
BOOT_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 15.0
IGNORED_FOR = 5.0


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    """A libvirt call, off the event loop."""
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def conn() -> AsyncIterator[libvirt.virConnect]:
    connection = await blocking(libvirt.open, daemon.QEMU_URI)
    yield connection
    await blocking(connection.close)


@dataclass
class Guest:
    dom: libvirt.virDomain
    uuid: str
    console: Path
    boot_seconds: float


@asynccontextmanager
async def running_guest(conn: libvirt.virConnect, variant: str) -> AsyncIterator[Guest]:
    """A transient guest of ``variant``, booted to its ready marker; destroyed at the end."""
    image = await guests.guest_image(variant)
    guest_uuid = str(uuid.uuid4())
    name = f"vn-test-{guest_uuid[:8]}"
    console = await asyncio.to_thread(guests.console_log_path, name)
    xml = guests.domain_xml(image, name, guest_uuid, console)
    started = time.monotonic()
    dom = await blocking(conn.createXML, xml, 0)
    try:
        await guests.wait_for_console(console, timeout=BOOT_TIMEOUT)
        boot = time.monotonic() - started
        print(f"{variant} guest {name} ready after {boot:.2f} s")
        yield Guest(dom, guest_uuid, console, boot)
    finally:
        with suppress(libvirt.libvirtError):
            await blocking(dom.destroy)
        await asyncio.to_thread(console.unlink, missing_ok=True)


async def exists(conn: libvirt.virConnect, guest_uuid: str) -> bool:
    domains = await blocking(conn.listAllDomains, 0)
    return any(dom.UUIDString() == guest_uuid for dom in domains)


async def wait_gone(conn: libvirt.virConnect, guest: Guest, timeout: float) -> float:
    """Seconds until the transient domain is gone (it is shut off)."""
    started = time.monotonic()
    while await exists(conn, guest.uuid):
        if time.monotonic() - started > timeout:
            tail = await asyncio.to_thread(guests.console_tail, guest.console)
            raise AssertionError(f"still defined after {timeout} s; console:\n{tail}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def markers(guest: Guest, marker: str = guests.GUEST_READY) -> int:
    return await asyncio.to_thread(guests.count_marker, guest.console, marker)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, contents) of a newc cpio archive."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701", f"bad cpio magic at {offset}"
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body:body + size])
        offset = (body + size + 3) & ~3


# Building ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", guests.VARIANTS)
async def test_image_is_built_once_and_readable_by_qemu(variant: str) -> None:
    image = await guests.guest_image(variant)
    again = await guests.guest_image(variant)
    assert again == image
    assert image.kernel_release in image.kernel.parent.name
    assert variant in image.initrd.parent.name
    for path in (image.kernel, image.initrd):
        mode = (await asyncio.to_thread(path.stat)).st_mode
        assert mode & stat.S_IROTH, f"{path} is not world-readable"
    for directory in (image.initrd.parent, *image.initrd.parent.parents):
        mode = (await asyncio.to_thread(directory.stat)).st_mode
        assert mode & stat.S_IXOTH, f"QEMU cannot reach {directory}"

    archive = read_newc(gzip.decompress(await asyncio.to_thread(image.initrd.read_bytes)))
    assert stat.S_ISCHR(archive["dev/console"][0])
    assert archive["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert archive["bin/busybox"][1][:4] == b"\x7fELF"
    for module in ("evdev.ko", "button.ko"):
        assert archive[f"lib/modules/{module}"][1][:4] == b"\x7fELF"
    init = archive["init"][1].decode()
    assert guests.GUEST_READY in init
    handler = "etc/acpi/PWRF/00000080"
    if variant in ("acpi", "writer", "console", "agent"):
        assert "acpid" in init
        assert b"poweroff -f" in archive[handler][1]
    else:
        assert "acpid -d" not in init
        assert handler not in archive
    disk_modules = [name for name in archive if name.startswith("lib/modules/z")]
    if variant == "writer":
        assert "of=/dev/vda" in init
        assert disk_modules[-1].endswith("virtio_blk.ko"), disk_modules
        assert disk_modules == sorted(disk_modules), "the init loads them in name order"
    elif variant == "console":
        assert "getty" in init and "findlabel" in init
        assert disk_modules[-1].endswith("isofs.ko"), disk_modules
        assert any(name.endswith("sr_mod.ko") for name in disk_modules)
        assert disk_modules == sorted(disk_modules), "the init loads them in name order"
    elif variant == "agent":
        assert "getty" in init and "findlabel" in init and "datadisk" in init
        assert "qemu-ga -m virtio-serial" in init and guests.AGENT_CHANNEL in init
        for module in ("sr_mod.ko", "virtio_blk.ko", "virtio_console.ko"):
            assert any(name.endswith(module) for name in disk_modules), disk_modules
        assert disk_modules == sorted(disk_modules), "the init loads them in name order"
        # qemu-ga with real files (no links) for its libraries and the loader.
        for name in ("usr/sbin/qemu-ga", "lib64/ld-linux-x86-64.so.2",
                     "lib/x86_64-linux-gnu/libc.so.6",
                     "lib/x86_64-linux-gnu/libglib-2.0.so.0"):
            mode, data = archive[name]
            assert stat.S_ISREG(mode) and data[:4] == b"\x7fELF", name
        assert image.agent_deb is not None and "qemu-guest-agent" in image.agent_deb
    else:
        assert not disk_modules


async def test_racing_builders_make_one_image(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shared = (await guests.guest_image("acpi")).kernel.parent.parent / "debs"
    # Reuse the downloaded packages, so the race is over unpacking and renaming.
    await asyncio.to_thread(shutil.copytree, shared, cache / "debs")
    first, second = await asyncio.gather(
        guests.guest_image("acpi", cache), guests.guest_image("acpi", cache)
    )
    assert first == second
    names = sorted(os.listdir(cache))
    assert not [name for name in names if name.startswith(".build-")], names
    assert len([name for name in names if "-acpi-" in name]) == 1, names
    assert len([name for name in names if "-noacpi-" in name]) == 1, names


async def test_wait_for_console_counts_and_times_out(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    with pytest.raises(TimeoutError, match="no console log"):
        await guests.wait_for_console(log, "READY", timeout=0.1)

    first_seen = asyncio.Event()

    async def boots_twice() -> None:
        await asyncio.sleep(0.1)  # deliberate: the guest boots while the waiting is under way
        await asyncio.to_thread(log.write_text, "kernel\nREADY\n")
        await first_seen.wait()
        await asyncio.to_thread(log.write_text, "kernel\nREADY\nkernel\nREADY\n")

    writer = asyncio.create_task(boots_twice())
    assert await guests.wait_for_console(log, "READY", timeout=5) == 1
    first_seen.set()
    assert await guests.wait_for_console(log, "READY", timeout=5, count=2) == 2
    await writer
    with pytest.raises(TimeoutError, match="seen 2 times"):
        await guests.wait_for_console(log, "READY", timeout=0.1, count=3)


# Booting ----------------------------------------------------------------------------------


async def test_acpi_guest_powers_off_on_acpi_shutdown(conn: libvirt.virConnect) -> None:
    async with running_guest(conn, "acpi") as guest:
        await blocking(guest.dom.shutdown)
        took = await wait_gone(conn, guest, SHUTDOWN_TIMEOUT)
        print(f"acpi guest gone {took:.2f} s after virDomainShutdown")
        assert await markers(guest, guests.GUEST_POWEROFF) == 1


async def test_noacpi_guest_ignores_acpi_shutdown_and_reboot(conn: libvirt.virConnect) -> None:
    async with running_guest(conn, "noacpi") as guest:
        await blocking(guest.dom.shutdown)
        await blocking(guest.dom.reboot, 0)
        await asyncio.sleep(IGNORED_FOR)  # deliberate: time must pass to show nothing happens
        state, _ = await blocking(guest.dom.state)
        assert state == libvirt.VIR_DOMAIN_RUNNING
        assert await markers(guest) == 1
        assert await markers(guest, guests.GUEST_POWEROFF) == 0


async def test_acpi_guest_comes_back_after_reboot(conn: libvirt.virConnect) -> None:
    async with running_guest(conn, "acpi") as guest:
        qemu_id = await blocking(guest.dom.ID)
        started = time.monotonic()
        # No guest agent: libvirt presses the ACPI power button with its fake-reboot flag
        # set; when the guest powers off, libvirt resets it instead of stopping QEMU.
        await blocking(guest.dom.reboot, 0)
        seen = await guests.wait_for_console(guest.console, timeout=BOOT_TIMEOUT, count=2)
        print(f"acpi guest ready again {time.monotonic() - started:.2f} s after virDomainReboot")
        assert seen == 2
        assert await markers(guest, guests.GUEST_POWEROFF) == 1
        state, _ = await blocking(guest.dom.state)
        assert state == libvirt.VIR_DOMAIN_RUNNING
        assert await blocking(guest.dom.ID) == qemu_id  # the same QEMU process

"""A real Linux guest (TCG, busybox initramfs) through the agent: graceful shutdown, reboot,
and unplug answered by the guest's kernel."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests import guests
from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, make_image, next_event, vm_name
from virtnode.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


async def linux_vm(client: Client, variant: str, *, wait_ready: bool = True,
                   ) -> tuple[str, Path]:
    """Create and start a Linux guest from raw XML; returns (vm_id, console log)."""
    image = await guests.guest_image(variant)
    name = vm_name()
    console = guests.console_log_path(name)
    xml = guests.domain_xml(image, name, str(uuid.uuid4()), console)
    result = await client.call("VM.create", {"xml": xml, "persistent": False})
    if wait_ready:
        await guests.wait_for_console(console, guests.GUEST_READY, timeout=60)
    return str(result["vm_id"]), console


async def test_acpi_shutdown_stops_the_guest_gracefully(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "acpi")
    result = await client.call("VM.shutdown",
                               {"vm_id": vm_id, "timeout": 30, "fallback": "destroy"})
    assert result["stopped_by"] == "acpi", result
    assert result["tried"] == ["acpi"], "no guest agent: skipped without a wait"
    assert result["seconds"] < 15
    assert guests.count_marker(console, guests.GUEST_POWEROFF) == 1
    await expect_error(client, "VM.getInfo", {"vm_id": vm_id}, "NotFound")  # transient


async def test_shutdown_while_booting_is_not_lost(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    """The first ACPI press reaches a kernel that has no handler yet; the agent presses
    again until the guest's acpid is there to power it off."""
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "acpi", wait_ready=False)
    result = await client.call("VM.shutdown",
                               {"vm_id": vm_id, "timeout": 60, "fallback": "none"})
    assert result["stopped_by"] == "acpi", result
    assert guests.count_marker(console, guests.GUEST_POWEROFF) == 1


async def test_guest_ignoring_acpi_falls_back_to_destroy(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "noacpi")
    await expect_error(client, "VM.shutdown",
                       {"vm_id": vm_id, "timeout": 2, "fallback": "none"},
                       "DeadlineExceeded", "shutdown_timeout")
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
    result = await client.call("VM.shutdown",
                               {"vm_id": vm_id, "timeout": 2, "fallback": "destroy"})
    assert result["stopped_by"] == "destroy" and result["tried"] == ["acpi", "destroy"]
    assert guests.count_marker(console, guests.GUEST_POWEROFF) == 0


async def test_reboot_restarts_the_guest(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "acpi")
    await client.call("Events.subscribe", {"topics": ["vm.lifecycle"]})
    assert (await client.call("VM.reboot", {"vm_id": vm_id}))["state"] == "running"
    await guests.wait_for_console(console, guests.GUEST_READY, timeout=60, count=2)
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"


async def test_unplug_completes_when_the_guest_releases_the_disk(
    qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "acpi")
    await client.call("Events.subscribe", {"topics": ["vm.device"]})
    image = await make_image(image_dir, "data.qcow2")
    target = (await client.call("VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": str(image), "format": "qcow2"}}))["target"]
    # The guest kernel logs the new virtio-blk PCI function (1af4:1001) once it found it.
    await guests.wait_for_console(console, "[1af4:1001]", timeout=30)
    await client.call("VM.hotunplugDisk", {"vm_id": vm_id, "target": target, "timeout": 30})
    disks = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["disks"]
    assert disks == []
    event = await next_event(client, "vm.device", lambda data: data["vm_id"] == vm_id)
    assert event["event"] == "removed" and event["alias"].startswith("virtio-disk")


async def test_nic_unplug_completes_when_the_guest_releases_it(
    qemu_agent: AgentProcess, checked_client: ClientFactory, bridge: str,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    vm_id, console = await linux_vm(client, "acpi")
    mac = (await client.call("VM.hotplugNic", {"vm_id": vm_id,
                                               "nic": {"bridge": bridge}}))["mac"]
    await guests.wait_for_console(console, "[1af4:1000]", timeout=30)  # virtio-net found
    await client.call("VM.hotunplugNic", {"vm_id": vm_id, "mac": mac, "timeout": 30})
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["nics"] == []

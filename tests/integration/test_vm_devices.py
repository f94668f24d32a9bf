"""Live changes to running firmware-only KVM guests: hotplug, tickets, memory, vCPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration.conftest import expect_error, make_image, virt, vm_name
from tests.integration.test_vm_lifecycle import create, firmware_spec

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


async def domain_xml(name: str, *, inactive: bool = False, secure: bool = False) -> Any:
    import libvirt

    flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
        libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
    xml = await virt(lambda conn: conn.lookupByName(name).XMLDesc(flags))
    return etree.fromstring(xml.encode())


async def test_disk_hotplug_reaches_guest_and_definition(
    qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name)
    image = await make_image(image_dir, "data.qcow2")
    result = await client.call("VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": str(image), "format": "qcow2"}})
    assert result["target"] == "vda"
    disks = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["disks"]
    assert disks == [{"target": "vda", "bus": "virtio", "device": "disk", "path": str(image),
                      "format": "qcow2"}]
    for inactive in (False, True):
        root = await domain_xml(name, inactive=inactive)
        assert root.xpath("devices/disk/source/@file") == [str(image)]
    second = await make_image(image_dir, "more.raw", fmt="raw")
    result = await client.call("VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": str(second), "format": "raw"}})
    assert result["target"] == "vdb"
    await expect_error(client, "VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": str(second), "target": "vda"}},
        "AlreadyExists", "target_taken")
    await expect_error(client, "VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": str(image_dir / "absent.qcow2")}},
        "NotFound", "no_such_file")
    await expect_error(client, "VM.hotplugDisk", {
        "vm_id": vm_id, "disk": {"path": "relative/path.qcow2"}}, "InvalidArgument")


async def test_unplug_that_the_guest_never_answers_times_out(
    qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path,
) -> None:
    """SeaBIOS does not eject PCI devices: the unplug request is left unanswered."""
    client = await checked_client(qemu_agent.unix_url)
    vm_id = await create(client, vm_name())
    image = await make_image(image_dir, "data.qcow2")
    await client.call("VM.hotplugDisk", {"vm_id": vm_id,
                                         "disk": {"path": str(image), "format": "qcow2"}})
    error = await expect_error(client, "VM.hotunplugDisk",
                               {"vm_id": vm_id, "target": "vda", "timeout": 1},
                               "DeadlineExceeded", "unplug_timeout")
    assert error.data["object"] == "disk" and error.data["id"] == "vda"
    await expect_error(client, "VM.hotunplugDisk", {"vm_id": vm_id, "target": "vdz"},
                       "NotFound", "no_such_device")


async def test_nic_hotplug_on_a_bridge(
    qemu_agent: AgentProcess, checked_client: ClientFactory, bridge: str,
) -> None:
    from tests.subproc import run

    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name)
    mac = (await client.call("VM.hotplugNic", {
        "vm_id": vm_id, "nic": {"bridge": bridge, "mac": "52:54:00:aa:bb:01"}}))["mac"]
    assert mac == "52:54:00:aa:bb:01"
    nics = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["nics"]
    assert nics[0]["mac"] == mac and nics[0]["source"] == bridge
    tap = nics[0]["device"]
    links = (await run("ip", "-o", "link", "show", "master", bridge)).check()
    assert tap and tap in links, "the guest's tap device is plugged into the bridge"
    generated = (await client.call("VM.hotplugNic", {
        "vm_id": vm_id, "nic": {"bridge": bridge, "model": "e1000"}}))["mac"]
    assert generated.startswith("52:54:00:") and generated != mac
    root = await domain_xml(name, inactive=True)
    assert sorted(root.xpath("devices/interface/mac/@address")) == sorted([mac, generated])
    await expect_error(client, "VM.hotplugNic", {
        "vm_id": vm_id, "nic": {"bridge": bridge, "mac": mac}}, "AlreadyExists", "mac_taken")


async def test_ticket_sets_an_expiring_console_password(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    import time

    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name, spec=firmware_spec(name, graphics="vnc"))
    graphics = (await domain_xml(name, secure=True)).find("devices/graphics")
    assert graphics.get("passwdValidTo", "").startswith("1970"), "locked until a ticket"
    ticket = await client.call("VM.setTicket", {"vm_id": vm_id, "protocol": "vnc",
                                                "password": "s3cret", "expires_in": 300})
    assert ticket["host"] == "127.0.0.1" and ticket["port"] >= 5900
    assert abs(ticket["expires"] - (time.time() + 300)) < 10
    graphics = (await domain_xml(name, secure=True)).find("devices/graphics")
    assert graphics.get("passwd") == "s3cret"
    assert graphics.get("passwdValidTo", "")[:4] == time.strftime("%Y", time.gmtime())
    await expect_error(client, "VM.setTicket", {"vm_id": vm_id, "protocol": "spice",
                                                "password": "x"},
                       "FailedPrecondition", "no_graphics")
    await expect_error(client, "VM.setTicket", {"vm_id": vm_id, "protocol": "vnc",
                                                "password": "longer-than-8"},
                       "InvalidArgument")


async def test_memory_and_vcpus_change_live_within_their_maximum(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    spec = firmware_spec(name, memory_mib=64, max_memory_mib=128, vcpus=1, max_vcpus=2,
                         machine="q35")
    vm_id = await create(client, name, spec=spec)
    assert (await client.call("VM.setVcpus", {"vm_id": vm_id, "vcpus": 2}))["vcpus"] == 2
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["vcpus"] == 2
    root = await domain_xml(name, inactive=True)
    assert root.find("vcpu").get("current") in (None, "2")
    await expect_error(client, "VM.setVcpus", {"vm_id": vm_id, "vcpus": 3},
                       "FailedPrecondition")
    await client.call("VM.setMemory", {"vm_id": vm_id, "memory_mib": 96})
    root = await domain_xml(name, inactive=True)
    assert int(root.findtext("currentMemory")) == 96 * 1024
    error = await expect_error(client, "VM.setMemory", {"vm_id": vm_id, "memory_mib": 256},
                               "FailedPrecondition", "above_maximum")
    assert "128" in error.message


def q35_spec(name: str, image: Path, bridge: str) -> dict[str, Any]:
    return firmware_spec(name, machine="q35",
                         disks=[{"path": str(image), "format": "qcow2"}],
                         nics=[{"bridge": bridge}])


async def test_a_q35_vm_can_hotplug_as_many_devices_as_it_has_spare_ports(
    tmp_path: Path, libvirtd: None, checked_client: ClientFactory, image_dir: Path,
    bridge: str,
) -> None:
    """libvirt alone leaves a q35 VM one spare port: a NIC, then a disk, failed."""
    from tests.agentproc import running_agent
    from tests.integration import libvirtd as daemon
    from virtnode.vm.pcieports import free_ports

    async with running_agent(tmp_path, hypervisor=daemon.QEMU_URI,
                             sections={"vm": {"hotplug_ports": 2}}) as agent:
        client = await checked_client(agent.unix_url)
        name = vm_name()
        vm_id = await create(client, name,
                             spec=q35_spec(name, await make_image(image_dir, "boot.qcow2"),
                                           bridge))
        assert free_ports(await domain_xml(name, inactive=True)) == 2
        await client.call("VM.hotplugNic", {"vm_id": vm_id, "nic": {"bridge": bridge}})
        data = await make_image(image_dir, "data.qcow2")
        target = (await client.call("VM.hotplugDisk", {
            "vm_id": vm_id, "disk": {"path": str(data), "format": "qcow2"}}))["target"]
        assert target == "vdb"
        assert free_ports(await domain_xml(name, inactive=True)) == 0
        more = await make_image(image_dir, "more.qcow2")
        await expect_error(client, "VM.hotplugDisk", {
            "vm_id": vm_id, "disk": {"path": str(more), "format": "qcow2"}},
            "ResourceExhausted", "no_free_slot")
        await expect_error(client, "VM.hotplugNic", {"vm_id": vm_id,
                                                     "nic": {"bridge": bridge}},
                           "ResourceExhausted", "no_free_slot")
        disks = (await client.call("VM.getInfo", {"vm_id": vm_id}))["devices"]["disks"]
        assert [d["target"] for d in disks] == ["vda", "vdb"], "the refused disk left nothing"


async def test_q35_vms_from_specs_and_xml_get_the_default_spare_ports(
    qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path, bridge: str,
) -> None:
    from virtnode.vm.pcieports import free_ports

    client = await checked_client(qemu_agent.unix_url)
    image = await make_image(image_dir, "boot.qcow2")
    name = vm_name()
    await create(client, name, spec=q35_spec(name, image, bridge), start=False)
    assert free_ports(await domain_xml(name, inactive=True)) == 8
    # XML that places a NIC itself (as an exported definition does) takes one of the
    # ports the agent counted on: the stored definition is topped up.
    nic = (f"<interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/>"
           "<address type='pci' domain='0' bus='0x01' slot='0' function='0'/></interface>")
    for devices, expected in ((nic, 8),
                              ("<controller type='pci' index='0' model='pcie-root'/>"
                               "<controller type='pci' model='pcie-root-port'/>"
                               "<controller type='usb' model='none'/>"
                               "<memballoon model='none'/>", None)):
        name = vm_name()
        xml = (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
               f"<devices>{devices}</devices></domain>")
        await client.call("VM.create", {"xml": xml, "start": False})
        root = await domain_xml(name, inactive=True)
        ports = root.findall("devices/controller[@model='pcie-root-port']")
        if expected is None:
            assert len(ports) == 1, "ports the author declared are left as they are"
        else:
            assert free_ports(root) == expected


@pytest.mark.parametrize("devices", [
    "",
    "<video><model type='virtio'/></video>",
    "<video><model type='vga'/></video><video><model type='virtio'/></video>",
    "<sound model='ich9'/><watchdog model='i6300esb'/>",
    "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
    "<controller type='scsi' model='virtio-scsi'/>",
    "<disk type='file' device='disk'><source file='/dev/null'/><target dev='sda' bus='scsi'/>"
    "</disk>",
    "<input type='keyboard' bus='virtio'/><input type='tablet' bus='usb'/>",
    "<interface type='user'><model type='e1000e'/></interface>",
])
async def test_the_port_estimate_covers_what_libvirt_places(libvirtd: None,
                                                            devices: str) -> None:
    """Transient VMs have only the estimate: it must not fall short of libvirt's placement."""
    from virtnode.vm import pcieports

    xml = (f"<domain type='kvm'><name>{vm_name()}</name><memory unit='MiB'>64</memory>"
           f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{devices}"
           "<memballoon model='virtio'/></devices></domain>")
    root = etree.fromstring(xml)
    pcieports.add_ports(root, 2)

    def define(conn: Any) -> str:
        dom = conn.defineXML(etree.tostring(root, encoding="unicode"))
        try:
            return str(dom.XMLDesc(2))
        finally:
            dom.undefine()

    assert pcieports.free_ports(etree.fromstring(await virt(define))) >= 2

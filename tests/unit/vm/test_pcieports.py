"""Spare PCIe root ports for hotplug on q35 VMs: the estimate, the count and the top-up."""

from __future__ import annotations

from lxml import etree

from tests.paths import DATA
from virtnode.vm import pcieports
from virtnode.vm.spec import check_spec, domain_xml

DEFINED = DATA / "q35_defined.xml"
ROOT_PORTS = "devices/controller[@model='pcie-root-port']"


def defined() -> etree._Element:
    """What libvirt stored for a spec with a virtio disk, a SATA disk and a NIC."""
    return etree.parse(str(DEFINED)).getroot()


def rendered(**spec: object) -> etree._Element:
    """The spec of the fixtures, by default without the guest agent's channel (as
    DEFINED was stored)."""
    raw = {"name": "vm1", "guest_agent": False,
           "disks": [{"path": "/var/lib/virtnode/images/vda.raw", "format": "raw"},
                     {"path": "/var/lib/virtnode/images/sda.raw", "format": "raw",
                      "bus": "sata"}],
           "nics": [{"bridge": "br0"}], **spec}
    return etree.fromstring(domain_xml(check_spec(raw, "kvm"), {"owner": "virtnode"}))


def used_ports(root: etree._Element) -> int:
    return len(root.findall(ROOT_PORTS)) - pcieports.free_ports(root)


def test_the_estimate_is_what_libvirt_placed() -> None:
    # The same spec, before libvirt: USB controller, virtio disk, NIC and balloon.
    assert pcieports.ports_needed(rendered()) == used_ports(defined()) == 4


def test_the_guest_agent_channel_takes_a_port_as_libvirt_placed_it() -> None:
    # libvirt adds a virtio-serial controller for the channel, behind a root port.
    stored = etree.parse(str(DATA / "q35_defined_agent.xml")).getroot()
    assert pcieports.ports_needed(rendered(guest_agent=True)) == used_ports(stored) == 5


def test_a_q35_spec_gets_the_root_bus_and_spare_ports() -> None:
    root = rendered()
    pcieports.add_ports(root, 8)
    buses = root.findall("devices/controller[@type='pci']")
    assert [(c.get("index"), c.get("model")) for c in buses[:1]] == [("0", "pcie-root")]
    assert len(root.findall(ROOT_PORTS)) == 4 + 8
    assert all(c.get("index") is None for c in root.findall(ROOT_PORTS)), "libvirt numbers them"


def test_zero_spares_leave_only_what_the_devices_need() -> None:
    root = rendered()
    pcieports.add_ports(root, 0)
    assert len(root.findall(ROOT_PORTS)) == 4


def test_pc_machines_and_hand_made_ports_are_left_alone() -> None:
    pc = rendered(machine="pc")
    before = etree.tostring(pc)
    pcieports.add_ports(pc, 8)
    assert etree.tostring(pc) == before
    assert not pcieports.manages_ports(pc)
    assert pcieports.top_up(pc, 8) == 0

    own = rendered(machine="pc-q35-7.2")
    devices = own.find("devices")
    assert devices is not None
    devices.append(etree.Element("controller", type="pci", model="pcie-root-port"))
    assert pcieports.is_q35(own) and not pcieports.manages_ports(own)
    pcieports.add_ports(own, 8)
    assert len(own.findall(ROOT_PORTS)) == 1, "the author chose the layout"


def test_a_root_bus_declared_by_the_author_is_not_added_twice() -> None:
    root = etree.fromstring(
        "<domain type='kvm'><os><type machine='q35'>hvm</type></os><devices>"
        "<controller type='pci' index='0' model='pcie-root'/>"
        "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")
    assert pcieports.ports_needed(root) == 0
    pcieports.add_ports(root, 2)
    assert len(root.findall("devices/controller[@index='0']")) == 1
    assert len(root.findall(ROOT_PORTS)) == 2


def test_free_ports_are_the_ones_no_device_sits_behind() -> None:
    root = defined()
    assert pcieports.free_ports(root) == 0
    devices = root.find("devices")
    assert devices is not None
    nic = devices.find("interface")
    assert nic is not None
    devices.remove(nic)  # it sat behind port 1 (bus='0x01')
    assert pcieports.free_ports(root) == 1
    memballoon = devices.find("memballoon/address")
    assert memballoon is not None
    memballoon.set("bus", "4")  # libvirt writes hex; a plain number is the same bus
    assert pcieports.free_ports(root) == 1


def test_top_up_adds_only_the_shortfall() -> None:
    root = defined()
    assert pcieports.top_up(root, 3) == 3
    assert len(root.findall(ROOT_PORTS)) == 4 + 3
    partly = defined()
    devices = partly.find("devices")
    assert devices is not None
    nic = devices.find("interface")
    assert nic is not None
    devices.remove(nic)
    assert pcieports.top_up(partly, 3) == 2
    assert pcieports.top_up(defined(), 0) == 0


def test_devices_that_need_their_own_controller_count_it() -> None:
    def needed(devices: str) -> int:
        return pcieports.ports_needed(etree.fromstring(
            "<domain type='kvm'><os><type machine='q35'>hvm</type></os><devices>"
            f"{devices}<memballoon model='none'/></devices></domain>"))

    assert needed("") == 1  # the USB controller libvirt adds
    assert needed("<controller type='usb' model='none'/>") == 0
    assert needed("<disk device='disk'><target dev='sda' bus='scsi'/></disk>") == 2
    assert needed("<channel type='unix'><target type='virtio' name='x'/></channel>") == 2
    assert needed("<disk device='disk'><target dev='sda' bus='sata'/></disk>") == 1
    assert needed("<video/><video/>") == 2  # the second video needs a port
    assert needed("<interface type='user'><address type='pci' bus='0x05'/></interface>") == 1

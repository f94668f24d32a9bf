"""Spare PCIe root ports on q35 VMs, so that disks and NICs can be hot-plugged.

On a q35 machine every PCIe device sits behind its own ``pcie-root-port``, and ports
cannot be hot-plugged themselves: a VM has, for its whole life, the ports it was defined
with. libvirt adds one port per device that needs one and a single spare, so a default
VM takes one hotplug. The agent gives q35 VMs ``vm.hotplug_ports`` spare ports, as oVirt
and virt-manager do: :func:`add_ports` before the domain is defined (ports for the
devices it will place, counted by :func:`ports_needed`, plus the spares), and
:func:`top_up` on the definition libvirt stored, where every device has its address, in
case the count was short. Plain functions over lxml trees, no libvirt.

A domain XML that declares ``pcie-root-port`` controllers of its own keeps exactly those:
its author chose the layout.
"""

from __future__ import annotations

import re

from lxml import etree

Q35_RE = re.compile(r"^(q35|pc-q35-[0-9.]+)\Z")

#: Device elements that take a PCIe slot of their own when they have no address.
_ALWAYS = frozenset({"interface", "rng", "filesystem", "shmem", "vsock", "crypto"})
#: Models of these that do not: on the root bus (ich9 sound), ISA or built in. Watchdogs
#: (i6300esb, itco) are all on the root bus.
_ROOT_BUS_MODELS = {"memballoon": ("none",), "sound": ("ich9", "sb16", "pcspk")}
_PCI_ADDRESS = "address[@type='pci']"


def is_q35(root: etree._Element) -> bool:
    """Whether a ``<domain>`` runs a q35 machine (libvirt's default on x86 is i440fx)."""
    type_el = root.find("os/type")
    return type_el is not None and bool(Q35_RE.match(type_el.get("machine", "")))


def manages_ports(root: etree._Element) -> bool:
    """Whether the agent chooses this domain's root ports: q35, none declared by hand."""
    return is_q35(root) and root.find("devices/controller[@model='pcie-root-port']") is None


def ports_needed(root: etree._Element) -> int:
    """How many root ports libvirt will use for the domain's unplaced devices.

    An estimate, made before libvirt assigns addresses (checked against libvirt 9.0's
    placement by the tests): devices with a PCI address already are where they say;
    SATA disks, the primary video and the watchdog sit on the root bus; controllers
    libvirt adds by itself (USB, SCSI, virtio-serial) count when a device will need
    them. Conventional PCI devices share a bridge and are counted one port each, which
    over-counts. :func:`top_up` corrects a short count for defined domains.
    """
    devices = root.find("devices")
    if devices is None:
        return 1  # the USB controller libvirt adds
    count = 0
    videos = 0
    for dev in devices:
        if not isinstance(dev.tag, str) or dev.find(_PCI_ADDRESS) is not None:
            continue
        tag = dev.tag
        if tag == "disk":
            target = dev.find("target")
            count += target is not None and target.get("bus") == "virtio"
        elif tag in _ALWAYS:
            count += 1
        elif tag in _ROOT_BUS_MODELS:
            count += dev.get("model", "") not in _ROOT_BUS_MODELS[tag]
        elif tag == "controller":
            count += _controller_needs_port(dev)
        elif tag == "video":
            videos += 1
            count += videos > 1  # the primary video is on the root bus
        elif tag == "hostdev":
            count += dev.get("type") == "pci"
        elif tag == "input":
            count += dev.get("bus") == "virtio"
        elif tag == "memory":
            count += dev.get("model", "") in ("virtio-mem", "virtio-pmem")
    kinds = {c.get("type") for c in devices.iterfind("controller")}
    if "usb" not in kinds:
        count += 1  # libvirt adds qemu-xhci on q35
    if "scsi" not in kinds and devices.find("disk/target[@bus='scsi']") is not None:
        count += 1
    if "virtio-serial" not in kinds and (
            devices.find("channel/target[@type='virtio']") is not None
            or devices.find("console/target[@type='virtio']") is not None):
        count += 1
    return count


def _controller_needs_port(ctl: etree._Element) -> int:
    kind, model = ctl.get("type"), ctl.get("model", "")
    if kind == "usb":
        return int(model != "none")
    if kind in ("scsi", "virtio-serial"):
        return 1
    return int(kind == "pci" and model in ("pcie-to-pci-bridge", "pcie-switch-upstream-port"))


def add_ports(root: etree._Element, spare: int) -> None:
    """Give a q35 ``<domain>`` root ports for its devices and ``spare`` more.

    Leaves alone a domain that is not q35 or declares root ports itself. libvirt wants
    the root bus declared when ports are, so ``pcie-root`` is added if missing.
    """
    if not manages_ports(root):
        return
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    if devices.find("controller[@type='pci'][@index='0']") is None:
        devices.append(etree.Element("controller", type="pci", index="0", model="pcie-root"))
    _append_ports(devices, ports_needed(root) + spare)


def free_ports(root: etree._Element) -> int:
    """Root ports of a defined ``<domain>`` that no device has taken.

    Needs the addresses libvirt assigns: count on the XML of a defined domain.
    """
    devices = root.find("devices")
    if devices is None:
        return 0
    ports = {_number(c.get("index")) for c in
             devices.iterfind("controller[@type='pci'][@model='pcie-root-port']")}
    used = {_number(a.get("bus")) for a in devices.iterfind(f"*/{_PCI_ADDRESS}")}
    return len(ports - used - {None})


def top_up(root: etree._Element, spare: int) -> int:
    """Add root ports to a defined ``<domain>`` until ``spare`` are free; how many added."""
    if not is_q35(root):
        return 0
    devices = root.find("devices")
    missing = spare - free_ports(root)
    if devices is None or missing <= 0:
        return 0
    _append_ports(devices, missing)
    return missing


def _append_ports(devices: etree._Element, count: int) -> None:
    for _ in range(count):
        devices.append(etree.Element("controller", type="pci", model="pcie-root-port"))


def _number(text: str | None) -> int | None:
    """An index or bus number as libvirt writes it (``3`` or ``0x03``)."""
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None

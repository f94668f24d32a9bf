"""The DMTF OVF descriptor of an OVA (DSP0243, the 1.x envelope VirtualBox and VMware
read and write): what a VM is, read from its domain XML, written as OVF.

Only what every OVF reader understands goes in: the virtual system's name, vCPUs,
memory, disk controllers and disks (each a file of the package with its capacity),
NICs (their model, MAC address and network name), and the firmware, both as VMware's
``vmw:Config firmware`` and in virtnode's own optional section (with the machine type),
which readers that do not know it skip (``ovf:required="false"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

from virtnode.util.safexml import parse_xml

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
VIRTNODE = "https://virtnode.dev/xmlns/ovf/1"
NSMAP = {"ovf": OVF, "rasd": RASD, "vssd": VSSD, "vmw": VMW, "virtnode": VIRTNODE}

#: ovf:format of each disk format in the package.
DISK_FORMATS = {
    "vmdk": "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    "qcow2": "http://www.gnome.org/~markmc/qcow-image-format.html",
}
#: CIM ResourceType values.
CPU, MEMORY, IDE, SCSI, NIC, DISK, OTHER_STORAGE = 3, 4, 5, 6, 10, 17, 20
#: The controller of each disk bus: CIM ResourceType and ResourceSubType.
CONTROLLERS = {"ide": (IDE, "PIIX4"), "scsi": (SCSI, "VirtualSCSI"),
               "sata": (OTHER_STORAGE, "AHCI"), "virtio": (OTHER_STORAGE, "virtio")}
#: ResourceSubType of each NIC model.
NIC_MODELS = {"virtio": "virtio", "e1000": "E1000", "e1000e": "E1000e",
              "rtl8139": "PCNet32"}


@dataclass
class OvfDisk:
    target: str
    bus: str
    capacity: int  # bytes
    file: str  # its name in the package
    size: int  # the file's size in bytes


@dataclass
class OvfNic:
    model: str
    mac: str | None
    network: str


@dataclass
class OvfSystem:
    name: str
    vcpus: int
    memory_mib: int
    firmware: str  # bios | efi
    machine: str
    disks: list[OvfDisk] = field(default_factory=list)
    nics: list[OvfNic] = field(default_factory=list)


def system_of(xml: str) -> OvfSystem:
    """The parts of a domain's XML an OVF descriptor tells (disks without their files)."""
    root = parse_xml(xml)
    memory = root.find("memory")
    kib = int(memory.text or 0) if memory is not None else 0
    unit = memory.get("unit", "KiB") if memory is not None else "KiB"
    mib = kib // 1024 if unit == "KiB" else kib if unit == "MiB" else kib * 1024
    os_element = root.find("os")
    efi = os_element is not None and (os_element.get("firmware") == "efi"
                                      or os_element.find("loader") is not None)
    machine = root.find("os/type")
    nics = []
    for interface in root.iterfind("devices/interface"):
        source, model, mac = (interface.find("source"), interface.find("model"),
                              interface.find("mac"))
        network = ("" if source is None
                   else source.get("network") or source.get("bridge") or "")
        nics.append(OvfNic(model="virtio" if model is None else model.get("type", "virtio"),
                           mac=None if mac is None else mac.get("address"),
                           network=network or "default"))
    vcpu = root.find("vcpu")
    return OvfSystem(name=root.findtext("name") or "vm",
                     vcpus=int(vcpu.text or 1) if vcpu is not None else 1,
                     memory_mib=mib, firmware="efi" if efi else "bios",
                     machine="" if machine is None else machine.get("machine", ""),
                     nics=nics)


def descriptor(system: OvfSystem, disk_format: str) -> bytes:
    """The OVF descriptor of ``system``, its disks files in ``disk_format``."""
    envelope = etree.Element(f"{{{OVF}}}Envelope", nsmap=NSMAP)
    envelope.set(f"{{{OVF}}}version", "1.0")
    references = _sub(envelope, OVF, "References")
    disk_section = _sub(envelope, OVF, "DiskSection")
    _sub(disk_section, OVF, "Info", "Virtual disk information")
    for index, disk in enumerate(system.disks, 1):
        _sub(references, OVF, "File", href=disk.file, id=f"file{index}", size=str(disk.size))
        _sub(disk_section, OVF, "Disk", diskId=f"vmdisk{index}", fileRef=f"file{index}",
             capacity=str(disk.capacity), capacityAllocationUnits="byte",
             format=DISK_FORMATS[disk_format])
    networks = _sub(envelope, OVF, "NetworkSection")
    _sub(networks, OVF, "Info", "The logical networks used")
    for name in dict.fromkeys(n.network for n in system.nics):
        network = _sub(networks, OVF, "Network", name=name)
        _sub(network, OVF, "Description", f"The {name} network")
    vs = _sub(envelope, OVF, "VirtualSystem", id=system.name)
    _sub(vs, OVF, "Info", "A virtual machine")
    _sub(vs, OVF, "Name", system.name)
    os_section = _sub(vs, OVF, "OperatingSystemSection", id="0")
    _sub(os_section, OVF, "Info", "The operating system (not known)")
    hardware = _sub(vs, OVF, "VirtualHardwareSection")
    _sub(hardware, OVF, "Info", "Virtual hardware requirements")
    vsys = _sub(hardware, OVF, "System")
    _sub(vsys, VSSD, "ElementName", "Virtual Hardware Family")
    _sub(vsys, VSSD, "InstanceID", "0")
    _sub(vsys, VSSD, "VirtualSystemIdentifier", system.name)
    _sub(vsys, VSSD, "VirtualSystemType", "virtnode-0.2")
    ids = iter(range(1, 10_000))
    _item(hardware, next(ids), CPU, f"{system.vcpus} virtual CPU(s)",
          AllocationUnits="hertz * 10^6", VirtualQuantity=str(system.vcpus))
    _item(hardware, next(ids), MEMORY, f"{system.memory_mib} MB of memory",
          AllocationUnits="byte * 2^20", VirtualQuantity=str(system.memory_mib))
    controllers: dict[str, int] = {}
    for index, disk in enumerate(system.disks, 1):
        if disk.bus not in controllers:
            kind, subtype = CONTROLLERS.get(disk.bus, CONTROLLERS["virtio"])
            controllers[disk.bus] = next(ids)
            _item(hardware, controllers[disk.bus], kind, f"{disk.bus} controller",
                  ResourceSubType=subtype, Address=str(len(controllers) - 1))
        position = sum(1 for d in system.disks[:index - 1] if d.bus == disk.bus)
        _item(hardware, next(ids), DISK, f"disk {disk.target}",
              HostResource=f"ovf:/disk/vmdisk{index}", Parent=str(controllers[disk.bus]),
              AddressOnParent=str(position))
    for index, nic in enumerate(system.nics):
        values = {"AutomaticAllocation": "true", "Connection": nic.network,
                  "ResourceSubType": NIC_MODELS.get(nic.model, nic.model)}
        if nic.mac:
            values["Address"] = nic.mac
        _item(hardware, next(ids), NIC, f"ethernet{index}", **values)
    config = _sub(hardware, VMW, "Config")
    config.set(f"{{{OVF}}}required", "false")
    config.set(f"{{{VMW}}}key", "firmware")
    config.set(f"{{{VMW}}}value", system.firmware)
    own = _sub(vs, VIRTNODE, "PlatformSection")
    own.set(f"{{{OVF}}}required", "false")
    _sub(own, OVF, "Info", "How virtnode ran the VM")
    _sub(own, VIRTNODE, "Firmware", system.firmware)
    if system.machine:
        _sub(own, VIRTNODE, "Machine", system.machine)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8",
                          pretty_print=True)


def manifest(files: Sequence[tuple[str, str]]) -> bytes:
    """The ``.mf`` of an OVA: ``SHA256(name)= digest`` per file."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in files).encode()


def _sub(parent: etree._Element, ns: str, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, f"{{{ns}}}{tag}")
    for key, value in attrs.items():
        element.set(f"{{{OVF}}}{key}", value)
    if text is not None:
        element.text = text
    return element


def _item(hardware: etree._Element, instance: int, kind: int, name: str,
          **values: str) -> None:
    """One ``Item`` of the hardware section; its ``rasd:`` elements in schema order."""
    item = _sub(hardware, OVF, "Item")
    fields = {**values, "ElementName": name, "InstanceID": str(instance),
              "ResourceType": str(kind)}
    for key in sorted(fields):
        _sub(item, RASD, key, fields[key])

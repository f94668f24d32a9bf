"""The DMTF OVF descriptor of an OVA (DSP0243, the 1.x envelope VirtualBox and VMware
read and write): what a VM is, read from its domain XML, written as OVF.

Only what every OVF reader understands goes in: the virtual system's name, vCPUs,
memory, disk controllers and disks (each a file of the package with its capacity),
NICs (their model, MAC address and network name), and the firmware, both as VMware's
``vmw:Config firmware`` and in virtnode's own optional section (with the machine type),
which readers that do not know it skip (``ovf:required="false"``).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

from virtnode.errors import InvalidArgument
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
    #: Direct kernel boot (virtnode's section only): host paths, which an import checks
    #: as VM.create does.
    kernel: dict[str, str] = field(default_factory=dict)
    #: libvirt's domain type (kvm, qemu) the VM ran with; virtnode's section only.
    domain_type: str = ""


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
    kernel = {key: text for key in ("kernel", "initrd", "cmdline")
              if (text := root.findtext(f"os/{key}"))}
    return OvfSystem(name=root.findtext("name") or "vm",
                     vcpus=int(vcpu.text or 1) if vcpu is not None else 1,
                     memory_mib=mib, firmware="efi" if efi else "bios",
                     machine="" if machine is None else machine.get("machine", ""),
                     nics=nics, kernel=kernel, domain_type=root.get("type", ""))


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
    _platform(vs, system)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8",
                          pretty_print=True)


def _platform(vs: etree._Element, system: OvfSystem) -> None:
    """virtnode's own section: how it ran the VM."""
    own = _sub(vs, VIRTNODE, "PlatformSection")
    own.set(f"{{{OVF}}}required", "false")
    _sub(own, OVF, "Info", "How virtnode ran the VM")
    _sub(own, VIRTNODE, "Firmware", system.firmware)
    if system.machine:
        _sub(own, VIRTNODE, "Machine", system.machine)
    if system.domain_type:
        _sub(own, VIRTNODE, "DomainType", system.domain_type)
    for key, text in sorted(system.kernel.items()):
        _sub(own, VIRTNODE, key.capitalize(), text)


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


# --- reading an OVA someone else may have made ----------------------------------------------

#: Bounds on what an OVA may hold; beyond them it is refused before anything is made.
MAX_MEMBERS = 256
MAX_DESCRIPTOR = 4 * 1024 * 1024
MAX_MANIFEST = 64 * 1024
MAX_DISKS = 64
MAX_NICS = 32
MAX_CAPACITY = 2 ** 56
MAX_VCPUS = 256
MAX_MEMORY_MIB = 16 * 1024 * 1024
#: Allocation units OVF writers use, as multipliers of a byte.
_UNITS = {"byte": 1, "kilobytes": 2 ** 10, "megabytes": 2 ** 20, "gigabytes": 2 ** 30,
          "terabytes": 2 ** 40}
_NIC_MODELS = {"virtio": "virtio", "e1000": "e1000", "e1000e": "e1000e",
               "vmxnet3": "virtio", "pcnet32": "rtl8139", "pcnet": "rtl8139"}
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


class Refused(ValueError):
    """An OVA that cannot be imported; ``reason`` names why."""

    def __init__(self, message: str, reason: str = "invalid_ova") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Member:
    offset: int
    size: int


@dataclass
class Package:
    descriptor: bytes
    digests: dict[str, tuple[str, str]]  # file -> (algorithm, hex digest)
    members: dict[str, Member]


def read_package(path: str) -> Package:
    """The index of an OVA (an uncompressed tar): the descriptor (its first member), the
    manifest if any, and where each member's bytes lie. Nothing is extracted: the
    members' names are only matched against the descriptor's. Blocking."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return _index(tar)
    except (tarfile.TarError, OSError) as exc:
        raise Refused(f"not an OVA (an uncompressed tar): {exc}") from None


def _index(tar: tarfile.TarFile) -> Package:
    """The members of an OVA, its descriptor and manifest read; Refused otherwise."""
    members: dict[str, Member] = {}
    descriptor = b""
    manifest = b""
    for count, info in enumerate(tar):
        if count >= MAX_MEMBERS:
            raise Refused(f"more than {MAX_MEMBERS} files in the package")
        if not info.isreg():
            raise Refused(f"{info.name!r} is not a regular file", "unsafe_member")
        if not _MEMBER_NAME.fullmatch(info.name):
            raise Refused(f"{info.name!r} is not a plain file name", "unsafe_member")
        if info.name in members:
            raise Refused(f"{info.name!r} is in the package twice", "unsafe_member")
        members[info.name] = Member(info.offset_data, info.size)
        if count == 0:
            if not info.name.endswith(".ovf"):
                raise Refused("the first file of an OVA is its .ovf descriptor")
            if info.size > MAX_DESCRIPTOR:
                raise Refused(f"the descriptor is over {MAX_DESCRIPTOR} bytes", "too_big")
            descriptor = _read(tar, info)
        elif info.name.endswith(".mf"):
            if info.size > MAX_MANIFEST:
                raise Refused(f"the manifest is over {MAX_MANIFEST} bytes", "too_big")
            manifest = _read(tar, info)
    if not descriptor:
        raise Refused("the package has no descriptor")
    return Package(descriptor, _digests(manifest), members)


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(info)
    assert stream is not None
    return stream.read()


def _digests(manifest: bytes) -> dict[str, tuple[str, str]]:
    digests = {}
    for line in manifest.decode(errors="replace").splitlines():
        found = re.fullmatch(r"\s*(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*", line)
        if found:
            digests[found[2]] = (found[1].lower(), found[3].lower())
    return digests


def verify_member(path: str, name: str, member: Member, digest: tuple[str, str]) -> None:
    """Check a member's bytes against the manifest's digest. Blocking."""
    algorithm, expected = digest
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as data:
        data.seek(member.offset)
        left = member.size
        while left:
            chunk = data.read(min(left, 1 << 20))
            if not chunk:
                raise Refused("the package ends inside a file", "truncated_package")
            hasher.update(chunk)
            left -= len(chunk)
    if hasher.hexdigest() != expected:
        raise Refused(f"{name} does not match the manifest's {algorithm.upper()}",
                      "manifest_mismatch")


@dataclass
class ImportedDisk:
    file: str
    capacity: int
    bus: str


def read_system(descriptor: bytes) -> tuple[OvfSystem, list[ImportedDisk]]:
    """What an OVF descriptor says of its (first) virtual system. Raises Refused."""
    if b"<!DOCTYPE" in descriptor or b"<!ENTITY" in descriptor:
        raise Refused("the descriptor declares a DTD or entities", "xml_entities")
    try:
        root = parse_xml(descriptor, what="the OVF descriptor")
    except InvalidArgument as exc:
        raise Refused(exc.message, "bad_xml") from None
    if etree.QName(root).localname != "Envelope":
        raise Refused("the descriptor is not an OVF Envelope")
    ns = etree.QName(root).namespace or OVF
    names = {"ovf": ns, "rasd": RASD}
    files = {f.get(f"{{{ns}}}id"): f.get(f"{{{ns}}}href", "")
             for f in root.iterfind("ovf:References/ovf:File", names)}
    disks = {}
    for disk in root.iterfind("ovf:DiskSection/ovf:Disk", names):
        capacity = _bytes(disk.get(f"{{{ns}}}capacity", ""),
                          disk.get(f"{{{ns}}}capacityAllocationUnits", "byte"))
        disks[disk.get(f"{{{ns}}}diskId")] = (files.get(disk.get(f"{{{ns}}}fileRef")),
                                              capacity)
    systems = list(root.iterfind(".//ovf:VirtualSystem", names))
    if len(systems) != 1:
        raise Refused(f"the descriptor has {len(systems)} virtual systems; an import takes "
                      "one VM")
    vs = systems[0]
    name = vs.findtext("ovf:Name", namespaces=names) or vs.get(f"{{{ns}}}id") or "imported"
    items = list(vs.iterfind("ovf:VirtualHardwareSection/ovf:Item", names))
    items += list(vs.iterfind("ovf:VirtualHardwareSection/ovf:StorageItem", names))
    items += list(vs.iterfind("ovf:VirtualHardwareSection/ovf:EthernetPortItem", names))
    system = OvfSystem(name=name, vcpus=1, memory_mib=0, firmware="bios", machine="")
    imported = _hardware(items, disks, names, system)
    if not system.memory_mib:
        raise Refused("the descriptor gives no memory")
    if len(imported) > MAX_DISKS or len(system.nics) > MAX_NICS:
        raise Refused(f"more than {MAX_DISKS} disks or {MAX_NICS} NICs", "too_big")
    for config in vs.iterfind(f".//{{{VMW}}}Config"):
        if config.get(f"{{{VMW}}}key") == "firmware":
            system.firmware = "efi" if config.get(f"{{{VMW}}}value") == "efi" else "bios"
    own = vs.find(f"{{{VIRTNODE}}}PlatformSection")
    if own is not None:
        system.firmware = "efi" if own.findtext(f"{{{VIRTNODE}}}Firmware") == "efi" \
            else system.firmware
        system.machine = own.findtext(f"{{{VIRTNODE}}}Machine") or ""
        system.domain_type = own.findtext(f"{{{VIRTNODE}}}DomainType") or ""
        system.kernel = {key: text for key in ("kernel", "initrd", "cmdline")
                         if (text := own.findtext(f"{{{VIRTNODE}}}{key.capitalize()}"))}
    return system, imported


def _hardware(items: Sequence[etree._Element], disks: dict[str | None, tuple[str | None, int]],
              names: dict[str, str], system: OvfSystem) -> list[ImportedDisk]:
    """Read the hardware items into ``system``; the disks that have files."""
    by_id = {i.findtext("rasd:InstanceID", namespaces=names): i for i in items}

    def value(item: etree._Element, key: str) -> str:
        return (item.findtext(f"rasd:{key}", namespaces=names) or "").strip()

    imported = []
    for item in items:
        kind = value(item, "ResourceType")
        if kind == str(CPU):
            system.vcpus = _count(value(item, "VirtualQuantity"), 1, MAX_VCPUS, "vCPUs")
        elif kind == str(MEMORY):
            quantity = _count(value(item, "VirtualQuantity"), 1, 2 ** 50, "memory")
            mib = _bytes(str(quantity), value(item, "AllocationUnits") or "byte * 2^20") // 2 ** 20
            system.memory_mib = _count(str(mib), 16, MAX_MEMORY_MIB, "memory (MiB)")
        elif kind == str(DISK):
            host = value(item, "HostResource")
            disk_id = host.removeprefix("ovf:").removeprefix("/disk/")
            if disk_id not in disks:
                raise Refused(f"a disk names {host!r}, which the DiskSection does not have")
            file, capacity = disks[disk_id]
            if not file:
                continue  # a disk without a file: an empty one, left out
            parent = by_id.get(value(item, "Parent"))
            bus = _bus(parent, names) if parent is not None else "virtio"
            imported.append(ImportedDisk(file, capacity, bus))
        elif kind == str(NIC):
            model = value(item, "ResourceSubType").lower()
            mac = value(item, "Address") or None
            if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
                mac = None
            system.nics.append(OvfNic(_NIC_MODELS.get(model, "e1000"), mac,
                                      value(item, "Connection") or "default"))
    return imported


def _count(text: str, low: int, high: int, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise Refused(f"{what}: {text!r} is not a number") from None
    if not low <= number <= high:
        raise Refused(f"{what}: {number} is not within {low} and {high}", "absurd_size")
    return number


def _bytes(amount: str, units: str) -> int:
    """``amount`` of ``units`` (``byte``, ``byte * 2^30``, ``GigaBytes``...) in bytes."""
    number = _count(amount.strip() or "0", 0, MAX_CAPACITY, "a capacity")
    found = re.fullmatch(r"\s*(\w+)\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*", units)
    if found is None or found[1].lower() not in _UNITS:
        raise Refused(f"unknown allocation units {units!r}")
    scale = _UNITS[found[1].lower()]
    if found[2] is not None:
        if int(found[2]) != 2 or int(found[3]) > 60:
            raise Refused(f"unknown allocation units {units!r}")
        scale *= 2 ** int(found[3])
    total = number * scale
    if total > MAX_CAPACITY:
        raise Refused(f"a capacity of {total} bytes", "absurd_size")
    return total


def _bus(controller: etree._Element, names: dict[str, str]) -> str:
    kind = controller.findtext("rasd:ResourceType", namespaces=names) or ""
    subtype = (controller.findtext("rasd:ResourceSubType", namespaces=names) or "").lower()
    if kind == str(IDE):
        return "ide"
    if kind == str(SCSI):
        return "scsi"
    if subtype == "ahci":
        return "sata"
    return "virtio"

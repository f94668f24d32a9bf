"""VM specs and domain XML: plain functions, no libvirt.

:func:`check_spec` checks a typed spec (already shaped by the schema) for what a schema
cannot say; :func:`domain_xml` turns it into libvirt domain XML; :func:`check_domain_xml`
checks the shape of XML given by a client (:mod:`virtnode.vm.policy` checks what either
may reach on the host); :func:`set_metadata` and :func:`read_metadata` keep the
agent's own data about a VM in the domain's ``<metadata>``.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lxml import etree

from virtnode.errors import InvalidArgument
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm.cloudinit import CloudInit, check_cloud_init

#: The XML namespace of the agent's metadata inside a domain.
NAMESPACE = "https://virtnode.dev/xmlns/vm/1"
PREFIX = "virtnode"

# \Z, not $: $ also matches before a trailing newline.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}\Z")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}\Z")
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
SOURCE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}\Z")
#: Characters XML 1.0 cannot carry (lxml refuses them with a ValueError): all but tab,
#: newline, return, U+0020-U+D7FF, U+E000-U+FFFD and U+10000-U+10FFFF. Spelled as the few
#: ranges outside those: the negated class of the ranges inside takes 15 ms to compile.
NOT_XML_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

DOMAIN_TYPES = ("kvm", "qemu", "test")
MACHINES = re.compile(r"^(pc|q35|pc-i440fx-[0-9.]+|pc-q35-[0-9.]+)\Z")
DISK_BUSES = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}
CDROM_BUSES = ("sata", "scsi", "ide")
DISK_FORMATS = ("raw", "qcow2")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
GRAPHICS = ("vnc", "spice")
#: The virtio-serial port qemu-guest-agent listens on, by the name every guest looks for.
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
BOOT_DEVICES = ("hd", "network", "cdrom")
MAX_VCPUS = 256
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 16 * 1024 * 1024


def invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", reason="invalid_spec", field=field)


def check_name(name: str, field: str = "name") -> None:
    """Raise :class:`InvalidArgument` unless ``name`` is a safe VM name."""
    if not NAME_RE.match(name):
        raise invalid(field, "must be 1-64 letters, digits or . _ + -, starting with a "
                             "letter or digit")


def _check_path(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise invalid(field, "must be an absolute path")
    if any(part == ".." for part in value.split("/")):
        raise invalid(field, "must not contain ..")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or NOT_XML_RE.search(value):
        raise invalid(field, "must be a string without NUL bytes or control characters")
    return value


def _choice(value: Any, choices: tuple[str, ...] | Mapping[str, str], field: str) -> str:
    if value not in choices:
        raise invalid(field, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)


def _int_range(value: Any, low: int, high: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(field, f"must be an integer from {low} to {high}")
    return value


@dataclass(frozen=True)
class Disk:
    path: str
    format: str
    bus: str
    target: str
    readonly: bool
    boot_order: int | None
    #: The images below ``path``, nearest first, as ``(path, format)``: a volume's chain.
    backing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Cdrom:
    """A CD-ROM drive; ``path`` is its media, None for an empty drive."""

    path: str | None
    bus: str
    target: str
    boot_order: int | None


@dataclass(frozen=True)
class Nic:
    source_type: str  # "bridge" or "network"
    source: str
    model: str
    mac: str | None


def _target(raw: Mapping[str, Any], bus: str, field: str, target: str | None) -> str:
    given = raw.get("target")
    if given is not None and (not TARGET_RE.match(given) or
                              not given.startswith(DISK_BUSES[bus])):
        raise invalid(f"{field}.target", f"{given!r} is not a {bus} device name "
                                         f"({DISK_BUSES[bus]}a, {DISK_BUSES[bus]}b...)")
    name = given or target
    if name is None:
        raise invalid(f"{field}.target", "is required")
    return str(name)


def _boot_order(raw: Mapping[str, Any], field: str) -> int | None:
    boot = raw.get("boot_order")
    return None if boot is None else _int_range(boot, 1, 64, f"{field}.boot_order")


def check_disk(raw: Mapping[str, Any], field: str, target: str | None = None) -> Disk:
    """Check one disk of a spec; ``target`` is the device name to use if none is given."""
    bus = _choice(raw.get("bus", "virtio"), DISK_BUSES, f"{field}.bus")
    name = _target(raw, bus, field, target)
    backing = tuple((_check_path(p, f"{field}.volume"), _choice(f, DISK_FORMATS, f"{field}.volume"))
                    for p, f in raw.get(CHAIN_KEY, ()))
    if "volume" in raw:
        raise invalid(f"{field}.volume", "must be resolved to paths first")
    return Disk(
        path=_check_path(raw.get("path"), f"{field}.path"),
        format=_choice(raw.get("format", "raw"), DISK_FORMATS, f"{field}.format"),
        bus=bus,
        target=name,
        readonly=bool(raw.get("readonly", False)),
        boot_order=_boot_order(raw, f"{field}"),
        backing=backing,
    )


def check_cdrom(raw: Mapping[str, Any], field: str, target: str | None = None) -> Cdrom:
    """Check one CD-ROM drive of a spec (media given as a volume must have been resolved
    to its path first, :func:`with_media`)."""
    bus = _choice(raw.get("bus", "sata"), CDROM_BUSES, f"{field}.bus")
    if "volume" in raw:
        raise invalid(f"{field}.volume", "must be resolved to a path first")
    path = raw.get("path")
    return Cdrom(
        path=None if path is None else _check_path(path, f"{field}.path"),
        bus=bus,
        target=_target(raw, bus, field, target),
        boot_order=_boot_order(raw, field),
    )


def with_media(raw: Mapping[str, Any], chain: Sequence[tuple[str, str]],
               field: str) -> dict[str, Any]:
    """A CD-ROM (or media) given as ``{"volume": ...}`` rewritten with the volume's path:
    media is one raw image, never a chain."""
    if len(chain) != 1 or chain[0][1] != "raw":
        raise InvalidArgument(f"{field}.volume: CD-ROM media is a raw image without "
                              "layers (an ISO image)", reason="invalid_media",
                              field=f"{field}.volume")
    media = {k: v for k, v in raw.items() if k != "volume"}
    media["path"] = chain[0][0]
    return media


#: Where a disk resolved from a volume carries its backing chain. Not in the API schema,
#: so a caller cannot pass it; :func:`with_chain` puts it there.
CHAIN_KEY = "_backing_chain"


def with_chain(raw: Mapping[str, Any], chain: list[tuple[str, str]]) -> dict[str, Any]:
    """A disk given as ``{"volume": ...}`` rewritten with its chain (leaf first) as paths."""
    disk = {k: v for k, v in raw.items() if k != "volume"}
    disk["path"], disk["format"] = chain[0]
    disk[CHAIN_KEY] = chain[1:]
    return disk


def check_nic(raw: Mapping[str, Any], field: str) -> Nic:
    """Check one NIC of a spec. A NIC on a managed network (``network``) must have been
    rewritten to its bridge first (:meth:`VmService.resolve_nic`)."""
    if "network" in raw:
        raise invalid(f"{field}.network", "must be resolved to a bridge first")
    given = [key for key in ("bridge", "libvirt_network") if raw.get(key) is not None]
    if len(given) != 1:
        raise invalid(field, "needs exactly one of bridge, network or libvirt_network")
    key = given[0]
    source = raw[key]
    if not isinstance(source, str) or not SOURCE_RE.match(source):
        raise invalid(f"{field}.{key}", "is not a valid interface or network name")
    mac = raw.get("mac")
    if mac is not None:
        mac = str(mac).lower()
        if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
            raise invalid(f"{field}.mac", "must be a unicast MAC address like 52:54:00:12:34:56")
    return Nic(
        source_type="bridge" if key == "bridge" else "network",
        source=source,
        model=_choice(raw.get("model", "virtio"), NIC_MODELS, f"{field}.model"),
        mac=mac,
    )


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Device name suffixes in libvirt's order: a..z, then aa..zz.
_SUFFIXES = (*_LETTERS, *(a + b for a in _LETTERS for b in _LETTERS))


def _targets(disks: list[Mapping[str, Any]]) -> list[str]:
    """Give each disk without a target the next free name on its bus."""
    taken = {d["target"] for d in disks if d.get("target")}
    names = []
    for disk in disks:
        if disk.get("target"):
            names.append(disk["target"])
            continue
        prefix = DISK_BUSES.get(disk.get("bus", "virtio"), "vd")
        name = next((prefix + s for s in _SUFFIXES if prefix + s not in taken), None)
        if name is None:
            raise invalid("spec.disks", f"no free device name left on {prefix}")
        taken.add(name)
        names.append(name)
    return names


@dataclass(frozen=True)
class Spec:
    """A checked VM spec."""

    name: str
    uuid: str
    domain_type: str
    memory_mib: int
    max_memory_mib: int
    vcpus: int
    max_vcpus: int
    cpu_model: str | None
    machine: str
    firmware: str
    disks: tuple[Disk, ...]
    cdroms: tuple[Cdrom, ...]
    nics: tuple[Nic, ...]
    graphics: str | None
    serial: bool
    guest_agent: bool
    boot: tuple[str, ...]
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    labels: Mapping[str, str]
    cloud_init: CloudInit | None = None


def check_spec(raw: Mapping[str, Any], default_domain_type: str) -> Spec:
    """Check a spec for what its schema cannot express; raises :class:`InvalidArgument`."""
    name = raw.get("name", "")
    check_name(name, "spec.name")
    vm_uuid = raw.get("uuid")
    try:
        vm_uuid = str(uuid.uuid4() if vm_uuid is None else uuid.UUID(vm_uuid))
    except (ValueError, TypeError, AttributeError):
        raise invalid("spec.uuid", "is not a UUID") from None
    memory = _int_range(raw.get("memory_mib", 512), MIN_MEMORY_MIB, MAX_MEMORY_MIB,
                        "spec.memory_mib")
    max_memory = _int_range(raw.get("max_memory_mib", memory), memory, MAX_MEMORY_MIB,
                            "spec.max_memory_mib")
    vcpus = _int_range(raw.get("vcpus", 1), 1, MAX_VCPUS, "spec.vcpus")
    max_vcpus = _int_range(raw.get("max_vcpus", vcpus), vcpus, MAX_VCPUS, "spec.max_vcpus")
    cpu_model = raw.get("cpu_model")
    if cpu_model is not None and not CPU_MODEL_RE.match(cpu_model):
        raise invalid("spec.cpu_model", "is not a CPU model name")
    machine = raw.get("machine", "q35")
    if not MACHINES.match(machine):
        raise invalid("spec.machine", f"{machine!r} is not pc, q35 or a versioned variant")
    disks_raw = list(raw.get("disks", []))
    cdroms_raw = [{"bus": "sata", **c} for c in raw.get("cdroms", [])]
    seed_raw = raw.get("cloud_init")
    seed_bus = "sata"
    if seed_raw is not None:
        seed_bus = _choice(seed_raw.get("bus", cdroms_raw[0]["bus"] if cdroms_raw else "sata"),
                           CDROM_BUSES, "spec.cloud_init.bus")
    # The seed's drive gets a name too (the last), so that no other device takes it.
    targets = _targets([*disks_raw, *cdroms_raw, *([{"bus": seed_bus}] if seed_raw else [])])
    disks = tuple(check_disk(d, f"spec.disks.{i}", targets[i]) for i, d in enumerate(disks_raw))
    cdroms = tuple(check_cdrom(c, f"spec.cdroms.{i}", targets[len(disks) + i])
                   for i, c in enumerate(cdroms_raw))
    drives: tuple[Disk | Cdrom, ...] = (*disks, *cdroms)
    if len({d.target for d in drives}) != len(drives):
        raise invalid("spec.disks", "two disks or CD-ROMs have the same target")
    nics = tuple(check_nic(n, f"spec.nics.{i}") for i, n in enumerate(raw.get("nics", [])))
    macs = [n.mac for n in nics if n.mac]
    if len(set(macs)) != len(macs):
        raise invalid("spec.nics", "two NICs have the same MAC address")
    graphics = raw.get("graphics")
    labels = dict(raw.get("labels", {}))
    for key, value in labels.items():
        if (not LABEL_KEY_RE.match(key) or not isinstance(value, str) or len(value) > 256
                or NOT_XML_RE.search(value)):
            raise invalid(f"spec.labels.{key}", "keys are 1-63 of A-Z a-z 0-9 _ . - /; "
                                                "values are strings of up to 256 characters, "
                                                "without control characters")
    kernel = raw.get("kernel")
    if kernel is None and (raw.get("initrd") is not None or raw.get("cmdline") is not None):
        raise invalid("spec.kernel", "initrd and cmdline need a kernel")
    orders = [d.boot_order for d in drives if d.boot_order is not None]
    if len(set(orders)) != len(orders):
        raise invalid("spec.disks", "two disks or CD-ROMs have the same boot_order")
    if orders and "boot" in raw:
        raise invalid("spec.boot", "give either boot or per-device boot_order, not both")
    cloud_init = None
    if seed_raw is not None:
        cloud_init = check_cloud_init(seed_raw, name, vm_uuid, bus=seed_bus,
                                      target=targets[-1])
    return Spec(
        name=name,
        uuid=vm_uuid,
        domain_type=_choice(raw.get("domain_type", default_domain_type), DOMAIN_TYPES,
                            "spec.domain_type"),
        memory_mib=memory,
        max_memory_mib=max_memory,
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        cpu_model=cpu_model,
        machine=machine,
        firmware=_choice(raw.get("firmware", "bios"), ("bios", "uefi"), "spec.firmware"),
        disks=disks,
        cdroms=cdroms,
        nics=nics,
        graphics=None if graphics is None else _choice(graphics, GRAPHICS, "spec.graphics"),
        serial=bool(raw.get("serial", True)),
        guest_agent=bool(raw.get("guest_agent", True)),
        boot=tuple(_choice(b, BOOT_DEVICES, f"spec.boot.{i}")
                   for i, b in enumerate(raw.get("boot", ["hd"]))),
        kernel=None if kernel is None else _check_path(kernel, "spec.kernel"),
        initrd=None if raw.get("initrd") is None else _check_path(raw["initrd"], "spec.initrd"),
        cmdline=None if raw.get("cmdline") is None else _text(raw["cmdline"], "spec.cmdline"),
        labels=labels,
        cloud_init=cloud_init,
    )


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def disk_element(disk: Disk) -> etree._Element:
    """The ``<disk>`` element of a file-backed disk.

    Its backing chain is spelled out and ends with an empty ``<backingStore/>``, so
    libvirt never follows a backing file named inside an image: a disk given by path is
    used alone, a volume with the chain its metadata gives.
    """
    element = etree.Element("disk", type="file", device="disk")
    _sub(element, "driver", name="qemu", type=disk.format, cache="none", io="native")
    _sub(element, "source", file=disk.path)
    below = element
    for path, fmt in disk.backing:
        below = _sub(below, "backingStore", type="file")
        _sub(below, "format", type=fmt)
        _sub(below, "source", file=path)
    _sub(below, "backingStore")  # the chain ends here: libvirt is not to probe further
    _sub(element, "target", dev=disk.target, bus=disk.bus)
    if disk.readonly:
        _sub(element, "readonly")
    if disk.boot_order is not None:
        _sub(element, "boot", order=str(disk.boot_order))
    return element


def cdrom_element(cdrom: Cdrom) -> etree._Element:
    """The ``<disk device='cdrom'>`` element of a CD-ROM drive, empty or with media."""
    element = etree.Element("disk", type="file", device="cdrom")
    _sub(element, "driver", name="qemu", type="raw")
    if cdrom.path is not None:
        _sub(element, "source", file=cdrom.path)
    _sub(element, "target", dev=cdrom.target, bus=cdrom.bus)
    _sub(element, "readonly")
    if cdrom.boot_order is not None:
        _sub(element, "boot", order=str(cdrom.boot_order))
    return element


def seed_element(spec: Spec, path: str) -> etree._Element:
    """The read-only CD-ROM drive of a spec's cloud-init seed at ``path``."""
    assert spec.cloud_init is not None
    return cdrom_element(Cdrom(path=path, bus=spec.cloud_init.bus,
                               target=spec.cloud_init.target, boot_order=None))


def nic_element(nic: Nic) -> etree._Element:
    """The ``<interface>`` element of a NIC on a bridge or a libvirt network."""
    element = etree.Element("interface", type=nic.source_type)
    _sub(element, "source", **{nic.source_type: nic.source})
    if nic.mac:
        _sub(element, "mac", address=nic.mac)
    _sub(element, "model", type=nic.model)
    return element


def _os(root: etree._Element, spec: Spec) -> None:
    os_el = _sub(root, "os", **({"firmware": "efi"} if spec.firmware == "uefi" else {}))
    if spec.firmware == "uefi":
        # Secure-boot builds need SMM, which nested or TCG hosts may lack: plain UEFI.
        _sub(_sub(os_el, "firmware"), "feature", enabled="no", name="secure-boot")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_el, "initrd", spec.initrd)
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.cmdline)
    drives: tuple[Disk | Cdrom, ...] = (*spec.disks, *spec.cdroms)
    if not any(d.boot_order for d in drives):
        for dev in spec.boot:
            _sub(os_el, "boot", dev=dev)


def domain_xml(spec: Spec, metadata: Mapping[str, Any]) -> str:
    """Render a checked spec as libvirt domain XML with the agent's metadata. A
    cloud-init seed's drive is added once the seed exists (:func:`seed_element`)."""
    root = etree.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    _sub(root, "memory", str(spec.max_memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.max_vcpus), placement="static",
         **({"current": str(spec.vcpus)} if spec.max_vcpus != spec.vcpus else {}))
    _os(root, spec)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.cpu_model in ("host-passthrough", "host-model"):
        _sub(root, "cpu", mode=spec.cpu_model)
    elif spec.cpu_model:
        cpu = _sub(root, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", spec.cpu_model, fallback="forbid")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    for disk in spec.disks:
        devices.append(disk_element(disk))
    for cdrom in spec.cdroms:
        devices.append(cdrom_element(cdrom))
    drives: tuple[Disk | Cdrom, ...] = (*spec.disks, *spec.cdroms)
    buses = {d.bus for d in drives}
    if spec.cloud_init is not None:
        buses.add(spec.cloud_init.bus)
    if "scsi" in buses:
        # libvirt would pick an emulated LSI controller; virtio-scsi is what guests expect.
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for nic in spec.nics:
        devices.append(nic_element(nic))
    if spec.serial:
        _sub(_sub(devices, "serial", type="pty"), "target", port="0")
        _sub(_sub(devices, "console", type="pty"), "target", type="serial", port="0")
    if spec.graphics:
        # A password that has already expired: QEMU then requires one, and the console
        # stays locked until VM.setTicket sets a real one.
        graphics = _sub(devices, "graphics", type=spec.graphics, autoport="yes",
                        passwd=secrets.token_hex(4), passwdValidTo="1970-01-01T00:00:01")
        _sub(graphics, "listen", type="address", address="127.0.0.1")
    if spec.guest_agent:
        # libvirt picks the socket's path and follows the guest agent's connection.
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(devices, "memballoon", model="virtio" if spec.domain_type != "test" else "none")
    root.append(metadata_element(metadata))
    return etree.tostring(root, encoding="unicode")


def written_files(root: etree._Element) -> list[str]:
    """The files a ``<domain>`` (or one ``<disk>``) writes: its file disks that are not
    read-only (CD-ROMs are)."""
    disks = [root] if root.tag == "disk" else root.iterfind("devices/disk")
    return [str(source.get("file")) for disk in disks
            if disk.get("device", "disk") != "cdrom" and disk.find("readonly") is None
            and (source := disk.find("source")) is not None and source.get("file")]


def metadata_element(metadata: Mapping[str, Any]) -> etree._Element:
    """``<metadata><virtnode:vm ...>`` holding the agent's data as attributes and labels."""
    wrapper = etree.Element("metadata")
    wrapper.append(metadata_body(metadata))
    return wrapper


def metadata_body(metadata: Mapping[str, Any], *, namespaced: bool = True) -> etree._Element:
    """The ``<virtnode:vm>`` element itself.

    virDomainSetMetadata wants it without the namespace (it adds its own):
    ``namespaced=False``.
    """
    ns = f"{{{NAMESPACE}}}" if namespaced else ""
    vm = etree.Element(f"{ns}vm", nsmap={PREFIX: NAMESPACE} if namespaced else None)
    for key, value in metadata.items():
        if key == "labels":
            labels = etree.SubElement(vm, f"{ns}labels")
            for label, text in sorted(value.items()):
                etree.SubElement(labels, f"{ns}label", key=label).text = text
        elif value is not None:
            vm.set(key, str(value))
    return vm


def read_metadata(xml: str) -> JsonObject | None:
    """The agent's metadata from a domain XML, or None if the agent did not create it."""
    root = parse_xml(xml, what="domain XML")
    vm = root.find(f"metadata/{{{NAMESPACE}}}vm")
    return None if vm is None else _metadata_of(vm)


def read_metadata_body(xml: str) -> JsonObject:
    """Parse what virDomainGetMetadata returns for the agent's namespace."""
    return _metadata_of(parse_xml(xml, what="VM metadata"))


def _metadata_of(vm: etree._Element) -> JsonObject:
    data: JsonObject = {str(k): str(v) for k, v in vm.attrib.items()}
    labels = vm.find(f"{{{NAMESPACE}}}labels")
    data["labels"] = {} if labels is None else {
        label.get("key", ""): label.text or "" for label in labels
    }
    return data


def check_domain_xml(xml: str, metadata: Mapping[str, Any]) -> tuple[str, str, str]:
    """Check the shape of a client's domain XML and add the agent's metadata.

    Returns ``(name, uuid, xml)``; a missing uuid is added. Raises
    :class:`InvalidArgument` for XML that is not a domain or has an unsafe name. What
    the XML may reach on the host is :mod:`virtnode.vm.policy`'s to check.
    """
    root = parse_xml(xml, what="domain XML")
    if root.getroottree().docinfo.internalDTD is not None:
        # Entities are not expanded here, but a DTD has no place in domain XML: refuse it
        # rather than hand libvirt references to entities it would have to resolve.
        raise InvalidArgument("xml: a DOCTYPE (DTD, entities) is not allowed",
                              reason="bad_xml", field="xml")
    if root.tag != "domain":
        raise InvalidArgument("xml: the root element must be <domain>", reason="bad_xml",
                              field="xml")
    name = root.findtext("name") or ""
    check_name(name, "xml.name")
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = etree.SubElement(root, "uuid")
        uuid_el.text = str(uuid.uuid4())
    try:
        vm_uuid = str(uuid.UUID(uuid_el.text or ""))
    except ValueError:
        raise InvalidArgument("xml.uuid: not a UUID", reason="invalid_spec",
                              field="xml.uuid") from None
    uuid_el.text = vm_uuid
    wrapper = root.find("metadata")
    if wrapper is None:
        wrapper = etree.SubElement(root, "metadata")
    for old in wrapper.findall(f"{{{NAMESPACE}}}vm"):
        wrapper.remove(old)
    wrapper.append(metadata_body(metadata))
    return name, vm_uuid, etree.tostring(root, encoding="unicode")


def image_files(root: etree._Element, prefix: str) -> list[tuple[str, str, bool]]:
    """``(path, field, alone)`` of the image files a domain (or one ``<disk>``) names:
    its disks and their chains, kernel and initrd. ``alone``: a qcow2 disk whose chain
    the XML ends at once (``<backingStore/>``)."""
    found: list[tuple[str, str, bool]] = []
    disks = ([(prefix, root)] if root.tag == "disk" else
             [(f"{prefix}.devices.disk[{i}]", d)
              for i, d in enumerate(root.iterfind("devices/disk"), 1)])
    for where, disk in disks:
        driver, below = disk.find("driver"), disk.find("backingStore")
        alone = (driver is not None and driver.get("type") == "qcow2" and below is not None
                 and len(below) == 0 and not below.attrib)
        for source in disk.iter("source"):
            if source.get("file"):
                found.append((source.get("file", ""), f"{where}.source", alone))
                alone = False
    for tag in ("kernel", "initrd"):
        path = root.findtext(f"os/{tag}")
        if path:
            found.append((path, f"{prefix}.os.{tag}", False))
    return found


_DISK_FIELD = re.compile(r"^xml\.devices\.disk\[(\d+)\]")
_OS_FIELDS = {"xml.os.kernel": "spec.kernel", "xml.os.initrd": "spec.initrd"}


def spec_field(field: str, disks: Sequence[Mapping[str, Any]],
               cdroms: Sequence[Mapping[str, Any]] = ()) -> str:
    """The spec field behind an element of the XML :func:`domain_xml` built: disks come
    first among the devices, then CD-ROMs, in the spec's order (as the caller gave them)."""
    if field in _OS_FIELDS:
        return _OS_FIELDS[field]
    found = _DISK_FIELD.match(field)
    if found is None:
        return field
    index = int(found[1]) - 1
    if index < len(disks):
        return f"spec.disks.{index}.{'volume' if 'volume' in disks[index] else 'path'}"
    index -= len(disks)
    if index < len(cdroms):
        return f"spec.cdroms.{index}.{'volume' if 'volume' in cdroms[index] else 'path'}"
    return field


def disk_field(field: str, disk: Mapping[str, Any]) -> str:
    """The field of a hotplugged disk spec behind an element of its ``<disk>``."""
    if not field.startswith("disk"):
        return field
    return f"disk.{'volume' if 'volume' in disk else 'path'}"


def device_summary(xml: str) -> JsonObject:
    """Disks, NICs and graphics of a domain XML, as ``VM.getInfo`` reports them."""
    root = parse_xml(xml, what="domain XML")
    disks = []
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append({
            "target": target.get("dev", "") if target is not None else "",
            "bus": target.get("bus", "") if target is not None else "",
            "device": disk.get("device", "disk"),
            "path": (source.get("file") or source.get("dev") or "") if source is not None else "",
            "format": driver.get("type", "") if driver is not None else "",
        })
    nics = []
    for nic in root.iterfind("devices/interface"):
        mac = nic.find("mac")
        model = nic.find("model")
        source = nic.find("source")
        target = nic.find("target")
        nics.append({
            "mac": mac.get("address", "") if mac is not None else "",
            "model": model.get("type", "") if model is not None else "",
            "type": nic.get("type", ""),
            # A NIC on a network has both network= and (live) bridge=: name the one of its type.
            "source": (source.get(nic.get("type", "")) or source.get("bridge")
                       or source.get("network") or "") if source is not None else "",
            "device": target.get("dev", "") if target is not None else "",
        })
    graphics = []
    for item in root.iterfind("devices/graphics"):
        port = item.get("port", "-1")
        graphics.append({
            "type": item.get("type", ""),
            "port": int(port) if port.lstrip("-").isdigit() else -1,
            "listen": item.get("listen", ""),
        })
    return {"disks": disks, "nics": nics, "graphics": graphics}

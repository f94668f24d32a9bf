"""The VM host-access policy: what a domain XML may make libvirt do on the host.

libvirtd runs as root and does what a domain XML says: it opens the files named as disks,
kernels, firmware or console logs (and relabels them so QEMU can use them), runs the
scripts an interface names, hands host devices to the guest and connects to the hosts a
network disk names. Whoever may create a VM must not get the host that way, so every
domain XML the agent hands to libvirt passes :func:`check_domain` first, the XML built
from a typed spec as much as a client's; a device plugged in later passes
:func:`check_device`.

Host paths must resolve (``..`` and symlinks followed, :attr:`Policy.resolve`) into a
directory the :class:`Policy` allows for that use; the resolved path replaces the given
one in the XML, so libvirt opens what was checked even if a symlink changes later.
Refused:

- ``InvalidArgument``, reason ``invalid_path``: a host path that is relative or has a NUL.
- ``PermissionDenied`` with ``field`` naming the element (``xml.devices.disk[1].source``;
  ``[n]`` counts elements of that name from 1) and one of the reasons:

  - ``path_not_allowed`` — a host path outside the allowed directories, or one the policy
    cannot check (a libvirt storage-pool volume, an LXC template);
  - ``script_refused`` — a program the host would run (interface scripts, a virtiofsd
    binary, a boot loader);
  - ``seclabel_refused`` — a security label other than the default (``dynamic``, relabel);
  - ``hostdev_refused`` — a host device, unless ``vm.allow_host_devices``;
  - ``network_disk_refused`` — storage the host reaches over the network, unless
    ``vm.allow_network_disks``;
  - ``backing_chain_required`` — an image that is not raw without its backing chain spelled
    out (libvirt would follow the backing file the image itself names);
  - ``writable_share_refused`` — a host directory shared writable (the guest could plant
    symlinks where the policy looks);
  - ``chardev_refused`` — a character device the host would connect out for, listen off
    loopback for, or open as a pipe;
  - ``interface_refused`` — a NIC that tunnels to other hosts or sets host addresses and
    routes;
  - ``device_refused`` — a device kind the policy does not know;
  - ``domain_type_refused``, ``passthrough_refused``, ``emulator_refused`` — a domain type
    other than kvm, qemu or test, hypervisor passthrough namespaces (``qemu:commandline``),
    an emulator other than ``/usr/bin/qemu-system-*``.

Plain code: no libvirt. Resolving paths reads the filesystem, so run it off the event loop.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lxml import etree

from virtnode.config import VmConfig
from virtnode.errors import InvalidArgument, PermissionDenied

DOMAIN_TYPES = ("kvm", "qemu", "test")
EMULATOR_RE = re.compile(r"^/usr/bin/qemu-system-[a-z0-9_]+\Z")
HOST_DEVICE_DIR = "/dev"
#: Entropy sources any guest may read.
RNG_SOURCES = ("/dev/urandom", "/dev/random")
#: The tap and vhost devices libvirt opens by default for a NIC.
NET_DEVICES = {"tap": "/dev/net/tun", "vhost": "/dev/vhost-net"}
#: Elements whose content is not the domain's: nothing in them reaches the host.
_OPAQUE = ("metadata", "description", "title")
#: Guest-side elements: their paths and names are the guest's, not the host's.
_GUEST_SIDE = ("target", "alias", "address")
#: Attributes that name a host path wherever they appear.
_PATH_ATTRS = frozenset({"file", "path", "dir", "socket", "logFile", "evdev", "template",
                         "xauth"})
#: Devices with nothing of the host in them beyond what the generic rules check.
_PLAIN_DEVICES = frozenset({"controller", "watchdog", "memballoon", "panic", "iommu", "vsock",
                            "hub", "crypto", "sound", "redirfilter", "video", "graphics",
                            "memory", "pstore", "lease", "nvram"})
_CHARDEVS = ("serial", "parallel", "console", "channel")
#: Character device types that stay inside QEMU or a display protocol.
_LOCAL_CHARDEVS = frozenset({"pty", "vc", "null", "spicevmc", "spiceport", "qemu-vdagent",
                             "dbus"})
_NIC_TYPES = frozenset({"network", "bridge", "ethernet", "direct", "user", "vhostuser"})
_AUDIO_TYPES = frozenset({"none", "spice", "dbus", "file"})


class Use(enum.Enum):
    """What a host path is for, which decides where it may be."""

    DATA = "data"  # disks, kernels, logs, sockets: vm.allowed_paths and storage domains
    FIRMWARE = "firmware"  # read-only firmware and ROMs: also vm.firmware_paths
    NVRAM = "nvram"  # a UEFI variable store: also vm.nvram_paths
    DEVICE = "device"  # a host device node: also /dev with vm.allow_host_devices


def is_device_node(path: str) -> bool:
    """Whether ``path`` is a block or character device (False if it does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


@dataclass(frozen=True)
class Policy:
    """Where VMs may reach on the host. Directories are resolved (:meth:`of` does it)."""

    data_dirs: tuple[str, ...] = ()
    firmware_dirs: tuple[str, ...] = ()
    nvram_dirs: tuple[str, ...] = ()
    allow_host_devices: bool = False
    allow_network_disks: bool = False
    resolve: Callable[[str], str] = field(default=os.path.realpath, compare=False, repr=False)
    is_device: Callable[[str], bool] = field(default=is_device_node, compare=False, repr=False)

    @classmethod
    def of(cls, config: VmConfig, storage_dirs: Iterable[str] = (), *,
           resolve: Callable[[str], str] = os.path.realpath) -> Policy:
        """The policy of ``config`` plus the attached storage domains' image directories.

        A storage directory reached through a symlink is left out: the filesystem of a
        posixfs domain is whoever made it's, and a link there could point anywhere.
        """
        def dirs(paths: Iterable[str]) -> tuple[str, ...]:
            return tuple(dict.fromkeys(resolve(p) for p in paths))

        storage = [p for p in storage_dirs if resolve(p) == os.path.normpath(p)]
        return cls(data_dirs=dirs((*config.allowed_paths, *storage)),
                   firmware_dirs=dirs(config.firmware_paths),
                   nvram_dirs=dirs(config.nvram_paths),
                   allow_host_devices=config.allow_host_devices,
                   allow_network_disks=config.allow_network_disks, resolve=resolve)

    def dirs(self, use: Use) -> tuple[str, ...]:
        """The directories a path for ``use`` may resolve into."""
        extra = {
            Use.DATA: (),
            Use.FIRMWARE: self.firmware_dirs,
            Use.NVRAM: self.nvram_dirs,
            Use.DEVICE: (HOST_DEVICE_DIR,) if self.allow_host_devices else (),
        }[use]
        return (*self.data_dirs, *extra)

    def allows(self, resolved: str, use: Use) -> bool:
        return any(resolved == d or resolved.startswith(d.rstrip("/") + "/")
                   for d in self.dirs(use))


def check_domain(root: etree._Element, policy: Policy, prefix: str = "xml") -> None:
    """Check a ``<domain>`` against ``policy``; host paths in it are replaced resolved.

    Raises :class:`PermissionDenied` or :class:`InvalidArgument` as the module says.
    """
    check = _Check(policy, root, prefix)
    check.domain()
    check.generic()


def check_device(element: etree._Element, policy: Policy, prefix: str) -> None:
    """Check one device element (a hotplugged ``<disk>``...) the way :func:`check_domain`
    checks the devices of a domain; ``prefix`` names it in errors."""
    check = _Check(policy, element, prefix)
    check.device(element)
    check.generic()


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False  # QEMU listens on every address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Check:
    """One pass over one XML tree. Rules for known elements run first and mark what they
    checked; :meth:`generic` then checks every host path and hazard they left."""

    def __init__(self, policy: Policy, top: etree._Element, prefix: str) -> None:
        self.policy = policy
        self.top = top
        self.prefix = prefix
        self.done: set[tuple[etree._Element, str]] = set()
        #: Host devices the policy allows: paths in them may be device nodes.
        self.host_devices: list[etree._Element] = []

    # --- naming and refusing ---------------------------------------------------------------

    def field(self, element: etree._Element) -> str:
        parts: list[str] = []
        while element is not self.top:
            parent = element.getparent()
            if parent is None:
                break
            same = [c for c in parent if c.tag == element.tag]
            index = (f"[{same.index(element) + 1}]"
                     if parent.tag == "devices" or len(same) > 1 else "")
            parts.append(f"{_local(element)}{index}")
            element = parent
        return ".".join([self.prefix, *reversed(parts)])

    def deny(self, element: etree._Element, reason: str, message: str) -> PermissionDenied:
        where = self.field(element)
        return PermissionDenied(f"{where}: {message}", reason=reason, field=where)

    def host_device(self, element: etree._Element, what: str) -> None:
        if not self.policy.allow_host_devices:
            raise self.deny(element, "hostdev_refused",
                            f"{what} is a host device; vm.allow_host_devices is off")
        self.host_devices.append(element)

    # --- paths -----------------------------------------------------------------------------

    def path(self, element: etree._Element, attr: str | None, use: Use) -> None:
        """Check the path in ``attr`` (None: the text) of ``element``; write it resolved."""
        if attr is not None:
            self.done.add((element, attr))
        value = element.get(attr) if attr is not None else element.text
        if value is None or not value.strip():
            return
        if not value.startswith("/") or "\0" in value:
            where = self.field(element)
            raise InvalidArgument(f"{where}: {value!r} is not an absolute path",
                                  reason="invalid_path", field=where)
        resolved = self.policy.resolve(value)
        if not self.policy.allows(resolved, use):
            where = {Use.DATA: "vm.allowed_paths or a storage domain",
                     Use.FIRMWARE: "vm.allowed_paths, vm.firmware_paths or a storage domain",
                     Use.NVRAM: "vm.allowed_paths, vm.nvram_paths or a storage domain",
                     Use.DEVICE: "vm.allowed_paths or a storage domain"
                     + (" or /dev" if self.policy.allow_host_devices else ""),
                     }[use]
            raise self.deny(element, "path_not_allowed", f"{value} is not inside {where}")
        if use is not Use.DEVICE and self.policy.is_device(resolved):
            raise self.deny(element, "path_not_allowed",
                            f"{value} is a device node; host devices are not files")
        if attr is None:
            element.text = resolved
        else:
            element.set(attr, resolved)

    def use_of(self, element: etree._Element) -> Use:
        """DEVICE inside an allowed host device, DATA elsewhere."""
        inside = any(element is d or any(a is d for a in element.iterancestors())
                     for d in self.host_devices)
        return Use.DEVICE if inside else Use.DATA

    # --- the domain ------------------------------------------------------------------------

    def domain(self) -> None:
        root = self.top
        if root.get("type") not in DOMAIN_TYPES:
            raise self.deny(root, "domain_type_refused",
                            f"domain type {root.get('type')!r} is not one of "
                            f"{', '.join(DOMAIN_TYPES)}")
        # libvirt reads devices/disk and os/kernel across every <devices> and <os> given.
        for os_el in root.iterfind("os"):
            self.os(os_el)
        for element in root.iterfind("bootloader"):
            if (element.text or "").strip():
                raise self.deny(element, "script_refused",
                                "a host boot loader program is not allowed")
        for devices in root.iterfind("devices"):
            for device in devices:
                if isinstance(device.tag, str):
                    self.device(device)

    def os(self, os_el: etree._Element) -> None:
        for tag in ("kernel", "initrd", "dtb", "shim"):
            for element in os_el.iterfind(tag):
                self.path(element, None, Use.DATA)
        for element in os_el.iterfind("acpi/table"):
            self.path(element, None, Use.DATA)
        for loader in os_el.iterfind("loader"):
            read_only = loader.get("readonly") == "yes" or loader.get("type") == "rom"
            self.path(loader, None, Use.FIRMWARE if read_only else Use.DATA)
        for nvram in os_el.iterfind("nvram"):
            self.path(nvram, "template", Use.FIRMWARE)
            if nvram.get("type") is not None:
                self.storage(nvram, Use.NVRAM, chain=False)
            else:
                self.path(nvram, None, Use.NVRAM)

    # --- devices ---------------------------------------------------------------------------

    def device(self, device: etree._Element) -> None:
        tag = device.tag
        if tag.startswith("{"):
            raise self.deny(device, "passthrough_refused",
                            "hypervisor passthrough elements are not allowed")
        if tag == "emulator":
            if not EMULATOR_RE.match((device.text or "").strip()):
                raise self.deny(device, "emulator_refused",
                                "only /usr/bin/qemu-system-* emulators are allowed")
        elif tag == "disk":
            self.disk(device)
        elif tag == "filesystem":
            self.filesystem(device)
        elif tag == "interface":
            self.interface(device)
        elif tag in _CHARDEVS:
            self.chardev(device)
        elif tag in ("hostdev", "shmem"):
            self.host_device(device, f"<{tag}>")
            for element in (*device.iterfind("source/block"), *device.iterfind("source/char")):
                self.path(element, None, Use.DEVICE)
        elif tag in ("redirdev", "smartcard"):
            self.host_device(device, f"<{tag}>")
            for element in device.iterfind("database"):
                self.path(element, None, Use.DEVICE)
            if device.get("type") is not None:
                self.chardev(device)
        elif tag == "input":
            if device.get("type") in ("passthrough", "evdev"):
                self.host_device(device, f"<input type='{device.get('type')}'>")
        elif tag == "tpm":
            backend = device.find("backend")
            if backend is not None and backend.get("type") == "passthrough":
                self.host_device(backend, "a host TPM")
        elif tag == "rng":
            self.rng(device)
        elif tag == "audio":
            if device.get("type") not in _AUDIO_TYPES:
                self.host_device(device, f"<audio type='{device.get('type')}'> (host sound)")
        elif tag in _PLAIN_DEVICES:
            self.plain_device(device)
        else:
            raise self.deny(device, "device_refused", f"<{_local(device)}> devices are not "
                                                       "known to the VM policy")

    def plain_device(self, device: etree._Element) -> None:
        if device.tag == "graphics":
            if device.get("type") in ("sdl", "desktop"):
                self.host_device(device, f"a {device.get('type')} window on the host's display")
            if device.get("address") is not None:
                raise self.deny(device, "path_not_allowed",
                                "a D-Bus address on the host is not allowed")
        elif device.tag == "memory":
            for element in device.iterfind("source/path"):
                self.path(element, None, Use.DATA)
        elif device.tag == "pstore":
            for element in device.iterfind("path"):
                self.path(element, None, Use.DATA)
        elif device.tag == "lease":
            for element in device.iterfind("target"):
                self.path(element, "path", Use.DATA)

    def rng(self, device: etree._Element) -> None:
        backend = device.find("backend")
        if backend is None:
            return
        if backend.get("model") == "egd":
            self.chardev(backend)
        elif (backend.text or "").strip() not in ("", *RNG_SOURCES):
            self.path(backend, None, Use.DEVICE)

    def disk(self, disk: etree._Element) -> None:
        if (disk.get("device") == "lun" or disk.get("rawio") == "yes"
                or disk.get("sgio") == "unfiltered"):
            self.host_device(disk, "a SCSI LUN passed through")
        driver = disk.find("driver")
        self.storage(disk, Use.DATA, fmt=driver.get("type") if driver is not None else None)

    def storage(self, element: etree._Element, use: Use, *, fmt: str | None = None,
                chain: bool = True) -> None:
        """A storage source: ``<disk>``, a ``<backingStore>`` layer, a typed ``<nvram>``."""
        kind = element.get("type", "file")
        source = element.find("source")
        if kind == "network" or (source is not None and source.get("protocol")):
            if not self.policy.allow_network_disks:
                raise self.deny(element, "network_disk_refused",
                                "storage the host reaches over the network is not allowed "
                                "(vm.allow_network_disks is off)")
            if source is not None:
                self.done.add((source, "protocol"))
        elif kind in ("nvme", "vhostvdpa"):
            self.host_device(element, f"a {kind} host device")
        elif kind == "volume":
            raise self.deny(source if source is not None else element, "path_not_allowed",
                            "libvirt storage pool volumes are not checked by the VM policy; "
                            "give a virtnode volume or a path")
        elif source is not None and kind in ("file", "block", "dir"):
            attr = {"file": "file", "block": "dev", "dir": "dir"}[kind]
            self.path(source, attr, Use.DEVICE if kind == "block" else use)
        if (chain and kind != "dir" and source is not None and fmt != "raw"
                and element.find("backingStore") is None):
            raise self.deny(source, "backing_chain_required",
                            f"a {fmt or 'unnamed'}-format image needs its backing chain "
                            "given (<backingStore/> when it has none): libvirt would follow "
                            "the backing file the image itself names")
        below = element.find("backingStore")
        if below is not None and (len(below) or below.attrib):
            fmt_el = below.find("format")
            self.storage(below, use, fmt=fmt_el.get("type") if fmt_el is not None else None)

    def filesystem(self, share: etree._Element) -> None:
        kind = share.get("type", "mount")
        source = share.find("source")
        if kind in ("template", "bind", "volume"):
            raise self.deny(source if source is not None else share, "path_not_allowed",
                            f"<filesystem type='{kind}'> is not checked by the VM policy")
        if source is None:
            return
        attr = {"mount": "dir", "block": "dev", "file": "file"}.get(kind)
        if attr is None or source.get(attr) is None:
            return
        self.path(source, attr, Use.DEVICE if kind == "block" else Use.DATA)
        if share.find("readonly") is None:
            raise self.deny(share, "writable_share_refused",
                            "a host directory or image shared with a guest must be "
                            "<readonly/>: a guest that can write there can plant symlinks")

    def interface(self, nic: etree._Element) -> None:
        kind = nic.get("type")
        if kind in ("hostdev", "vdpa"):
            self.host_device(nic, f"<interface type='{kind}'>")
        elif kind not in _NIC_TYPES:
            raise self.deny(nic, "interface_refused",
                            f"<interface type='{kind}'> is not allowed: only network, bridge, "
                            "ethernet, direct, user and vhostuser")
        host_side = [*nic.iterfind("ip"), *nic.iterfind("route")] if kind != "user" else []
        if host_side:
            raise self.deny(host_side[0], "interface_refused",
                            "host-side addresses and routes are not allowed")
        for backend in nic.iterfind("backend"):
            for attr, default in NET_DEVICES.items():
                if backend.get(attr) not in (None, default):
                    self.path(backend, attr, Use.DEVICE)
                self.done.add((backend, attr))

    def chardev(self, device: etree._Element) -> None:
        """A character device (or another element with a chardev ``type`` and sources)."""
        kind = device.get("type", "pty")
        sources = device.findall("source")
        if kind in _LOCAL_CHARDEVS:
            # A pty's source path is the live side libvirt fills in; it is never opened.
            self.done.update((source, "path") for source in sources)
        elif kind in ("file", "unix"):
            for source in sources:
                self.path(source, "path", Use.DATA)
        elif kind == "tcp":
            for source in sources:
                if source.get("mode", "connect") != "bind":
                    raise self.deny(source, "chardev_refused",
                                    "a TCP character device may not connect out from the host")
                if not _is_loopback(source.get("host")):
                    raise self.deny(source, "chardev_refused",
                                    "a TCP character device may listen on loopback only")
        elif kind == "dev":
            self.host_device(device, "a host character device")
            for source in sources:
                self.path(source, "path", Use.DEVICE)
        else:
            raise self.deny(device, "chardev_refused",
                            f"character devices of type {kind!r} are not allowed")

    # --- what the rules above left -----------------------------------------------------------

    def generic(self) -> None:
        """Passthrough namespaces, security labels, scripts, and every host path left."""
        for element in _walk(self.top):
            tag = element.tag
            if not tag.startswith("{") and (tag in _GUEST_SIDE):
                continue
            if tag.startswith("{"):
                raise self.deny(element, "passthrough_refused",
                                "hypervisor passthrough (qemu:commandline and other "
                                "namespaced elements) is not allowed")
            if tag == "seclabel":
                self.seclabel(element)
            elif tag in ("script", "downscript") or (tag == "binary" and element.get("path")):
                raise self.deny(element, "script_refused",
                                "host programs run for a VM are not allowed")
            for attr, value in element.attrib.items():
                if (element, attr) in self.done:
                    continue
                if attr == "rendernode":
                    self.host_device(element, "a GPU render node")
                    self.path(element, attr, Use.DEVICE)
                elif attr == "protocol" and tag == "source":
                    if not self.policy.allow_network_disks:
                        parent = element.getparent()
                        raise self.deny(element if parent is None else parent,
                                        "network_disk_refused",
                                        "storage the host reaches over the network is not "
                                        "allowed (vm.allow_network_disks is off)")
                elif tag == "rom" and attr == "file":
                    self.path(element, attr, Use.FIRMWARE)
                elif attr in _PATH_ATTRS or (attr == "dev" and "/" in value):
                    self.path(element, attr, self.use_of(element))

    def seclabel(self, label: etree._Element) -> None:
        """Only the default survives: a dynamic label libvirt makes, relabelling on."""
        default = (label.getparent() is self.top and self.top.tag == "domain"
                   and label.get("type", "dynamic") == "dynamic"
                   and label.get("relabel", "yes") == "yes"
                   and label.get("model") != "none" and len(label) == 0)
        if not default:
            raise self.deny(label, "seclabel_refused",
                            "security labels other than the default (type 'dynamic', "
                            "relabel) are not allowed")


def _local(element: etree._Element) -> str:
    return etree.QName(element).localname


def _walk(top: etree._Element) -> Iterable[etree._Element]:
    """Every element of ``top`` except comments and the content of opaque elements."""
    pending = [top]
    while pending:
        element = pending.pop()
        if not isinstance(element.tag, str):
            continue
        yield element
        if element.tag in _OPAQUE and element.getparent() is top:
            continue
        pending.extend(reversed(list(element)))

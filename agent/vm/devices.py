"""Live changes to running VMs: disk and NIC hotplug, console tickets, memory, vCPUs.

Every change applies to the running guest and, for a persistent VM, to its definition
too. Unplugging waits for the guest to release the device (libvirt's device-removed
event) up to a timeout: a guest that never answers the eject request leaves the device
in place, and the caller learns so.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import time
from collections.abc import Callable

from lxml import etree

from virtnode.api_schema.params import (
    VmChangeMediaParams,
    VmHotplugDiskParams,
    VmHotplugNicParams,
    VmHotunplugDiskParams,
    VmHotunplugNicParams,
    VmSetMemoryParams,
    VmSetTicketParams,
    VmSetVcpusParams,
)
from virtnode.errors import (
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.handles import Domain
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import ops as vmops
from virtnode.vm.core import VmCore
from virtnode.vm.spec import (
    DISK_BUSES,
    Cdrom,
    cdrom_element,
    check_cdrom,
    check_disk,
    check_nic,
    disk_element,
    disk_field,
    nic_element,
    written_files,
)


def _flags(dom: Domain) -> int:
    return vc.DOMAIN_AFFECT_LIVE | (vc.DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0)


def _live_root(dom: Domain) -> etree._Element:
    return parse_xml(dom.XMLDesc(0), what="domain XML")


def _elements(root: etree._Element, xpath: str, **variables: str) -> list[etree._Element]:
    found = root.xpath(xpath, **variables)  # type: ignore[arg-type]
    return [e for e in found if isinstance(e, etree._Element)] if isinstance(found, list) else []


def _next_target(root: etree._Element, bus: str) -> str:
    taken = {t.get("dev") for t in root.iterfind("devices/disk/target")}
    prefix = DISK_BUSES.get(bus, "vd")
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if prefix + letter not in taken:
            return prefix + letter
    raise FailedPrecondition("no free disk name left on this bus", reason="no_free_target")


def _device(root: etree._Element, xpath: str, what: str, key: str) -> tuple[str, str]:
    """The XML and alias of one live device; NotFound if it is not there."""
    found = _elements(root, xpath, key=key)
    if not found:
        raise NotFound(f"the VM has no {what} {key}", reason="no_such_device",
                       object=what, id=key)
    element = found[0]
    alias = element.find("alias")
    return etree.tostring(element, encoding="unicode"), (
        alias.get("name", "") if alias is not None else "")


def _with_media(drive: etree._Element, path: str | None) -> etree._Element:
    """A copy of a CD-ROM's ``<disk>`` with ``path`` as its media (None: empty)."""
    element = copy.deepcopy(drive)
    for old in [*element.findall("source"), *element.findall("backingStore")]:
        element.remove(old)
    if path is not None:
        driver = element.find("driver")
        source = etree.Element("source", file=path)
        if driver is not None:
            driver.addnext(source)
        else:
            element.insert(0, source)
    if element.find("readonly") is None:
        etree.SubElement(element, "readonly")
    return element


class VmDeviceService:
    """``VM.hotplug*``, ``VM.hotunplug*``, ``VM.setTicket``, ``VM.setMemory``, ``VM.setVcpus``."""

    def __init__(self, vms: VmCore) -> None:
        self._vms = vms

    async def hotplug_disk(self, params: VmHotplugDiskParams) -> JsonObject:
        vm_id = params["vm_id"]
        raw = await self._vms.resolve_disk(params["disk"])
        # Shape, policy and files before touching the VM; the device name comes later.
        checked = check_disk(raw, "disk", "vda")
        element = disk_element(checked)
        await self._vms.vet(element, "disk", lambda field: disk_field(field, params["disk"]))

        def run(dom: Domain) -> str:
            vmops.require_running(dom, vm_id)
            root = _live_root(dom)
            target = checked.target if raw.get("target") else _next_target(
                root, checked.bus)
            if _elements(root, "devices/disk/target[@dev=$t]", t=target):
                raise AlreadyExists(f"the VM already has a disk {target}",
                                    reason="target_taken", object="disk", id=target)
            element.find("target").set("dev", target)  # type: ignore[union-attr]
            dom.attachDeviceFlags(etree.tostring(element, encoding="unicode"), _flags(dom))
            return target

        return {"target": await self._vms.mutate(vm_id, "VM.hotplugDisk", run,
                                                 writes=written_files(element))}

    async def change_media(self, params: VmChangeMediaParams) -> JsonObject:
        vm_id, drive, media = params["vm_id"], params["drive"], params["media"]
        path = None
        if media is not None:
            resolved = await self._vms.resolve_media(media, "media")
            if "path" not in resolved:
                raise InvalidArgument("media: give path or volume, or null to eject",
                                      reason="invalid_media", field="media")
            checked = cdrom_element(Cdrom(check_cdrom(resolved, "media", "sda").path, "sata",
                                          "sda", None))
            field = f"media.{'volume' if 'volume' in media else 'path'}"
            # The policy writes the path back resolved (no symbolic link on the way).
            await self._vms.vet(checked, "media", lambda _where: field)
            path = checked.find("source").get("file")  # type: ignore[union-attr]

        def run(dom: Domain) -> None:
            live = bool(dom.isActive())
            root = parse_xml(dom.XMLDesc(0 if live else vc.DOMAIN_XML_INACTIVE),
                             what="domain XML")
            found = _elements(root, "devices/disk[target/@dev=$key]", key=drive)
            if not found:
                raise NotFound(f"the VM has no drive {drive}", reason="no_such_device",
                               object="disk", id=drive)
            if found[0].get("device") != "cdrom":
                raise FailedPrecondition(f"{drive} is a {found[0].get('device', 'disk')}, not "
                                         "a CD-ROM", reason="not_cdrom", object="disk", id=drive)
            element = _with_media(found[0], path)
            flags = ((vc.DOMAIN_AFFECT_LIVE if live else 0)
                     | (vc.DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0)
                     | (vc.DOMAIN_DEVICE_MODIFY_FORCE if params["force"] else 0))
            dom.updateDeviceFlags(etree.tostring(element, encoding="unicode"), flags)

        try:
            await self._vms.mutate(vm_id, "VM.changeMedia", run)
        except FailedPrecondition as exc:
            if "tray" not in exc.message:
                raise
            # libvirt asks the guest to open the tray and waits; a guest that has the
            # disc mounted keeps it locked.
            raise FailedPrecondition(
                f"the guest keeps the tray of {drive} locked (a mounted disc): unmount it in "
                "the guest, or pass force", reason="tray_locked", object="disk",
                id=drive) from None
        return {"drive": drive, "path": path}

    async def hotunplug_disk(self, params: VmHotunplugDiskParams) -> JsonObject:
        xpath = "devices/disk[target/@dev=$key]"
        await self._unplug(params["vm_id"], "VM.hotunplugDisk", xpath, what="disk",
                           key=params["target"], timeout=params["timeout"])
        return {}

    async def hotplug_nic(self, params: VmHotplugNicParams) -> JsonObject:
        vm_id = params["vm_id"]
        nic = check_nic(self._vms.resolve_nic(params["nic"], "nic"), "nic")

        def run(dom: Domain) -> str:
            vmops.require_running(dom, vm_id)
            before = {m.get("address") for m in _live_root(dom).iterfind("devices/interface/mac")}
            if nic.mac and nic.mac in before:
                raise AlreadyExists(f"the VM already has a NIC {nic.mac}", reason="mac_taken",
                                    object="nic", id=nic.mac)
            dom.attachDeviceFlags(etree.tostring(nic_element(nic), encoding="unicode"),
                                  _flags(dom))
            after = {m.get("address") for m in _live_root(dom).iterfind("devices/interface/mac")}
            return nic.mac or next((m for m in after - before if m), "")

        return {"mac": await self._vms.mutate(vm_id, "VM.hotplugNic", run)}

    async def hotunplug_nic(self, params: VmHotunplugNicParams) -> JsonObject:
        mac = params["mac"].lower()
        xpath = "devices/interface[mac/@address=$key]"
        await self._unplug(params["vm_id"], "VM.hotunplugNic", xpath, what="nic", key=mac,
                           timeout=params["timeout"])
        return {}

    async def _unplug(self, vm_id: str, method: str, xpath: str, *, what: str, key: str,
                      timeout: float) -> None:
        self._vms.require_ready()
        async with self._vms.locks.hold(vm_id, method):
            def find(dom: Domain) -> tuple[str, str]:
                vmops.require_running(dom, vm_id)
                return _device(_live_root(dom), xpath, what, key)

            xml, alias = await self._vms.on_vm(vm_id, find)
            removed = self._vms.expect_removal(vm_id, alias)
            try:
                await self._vms.on_vm(vm_id, lambda dom: dom.detachDeviceFlags(xml, _flags(dom)))
                still_there = await self._vms.on_vm(
                    vm_id, lambda dom: bool(_elements(_live_root(dom), xpath, key=key)))
                if still_there:
                    try:
                        async with asyncio.timeout(timeout):
                            outcome = await removed
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"the guest did not release {what} {key} within {timeout:g}s",
                            reason="unplug_timeout", object=what, id=key) from None
                    if outcome != "removed":
                        raise FailedPrecondition(f"the guest refused to release {what} {key}",
                                                 reason="unplug_failed", object=what, id=key)
            finally:
                removed.cancel()

    async def set_ticket(self, params: VmSetTicketParams) -> JsonObject:
        vm_id, protocol = params["vm_id"], params["protocol"]
        if protocol == "vnc" and len(params["password"]) > 8:
            raise InvalidArgument("VNC passwords are at most 8 characters", reason="too_long",
                                  field="password")
        expires = time.time() + params["expires_in"]
        valid_to = datetime.datetime.fromtimestamp(expires, datetime.UTC)

        def run(dom: Domain) -> JsonObject:
            vmops.require_running(dom, vm_id)
            found = _elements(_live_root(dom), "devices/graphics[@type=$p]", p=protocol)
            if not found:
                raise FailedPrecondition(f"the VM has no {protocol} graphics",
                                         reason="no_graphics", object="vm", id=vm_id)
            graphics = copy.deepcopy(found[0])
            graphics.set("passwd", params["password"])
            graphics.set("passwdValidTo", valid_to.strftime("%Y-%m-%dT%H:%M:%S"))
            dom.updateDeviceFlags(etree.tostring(graphics, encoding="unicode"),
                                  vc.DOMAIN_AFFECT_LIVE)
            listen = graphics.find("listen")
            tls_port = graphics.get("tlsPort")
            return {
                "protocol": protocol,
                "host": (listen.get("address") if listen is not None else None)
                or graphics.get("listen") or "127.0.0.1",
                "port": int(graphics.get("port", "-1")),
                "tls_port": int(tls_port) if tls_port and tls_port != "-1" else None,
                "expires": round(expires, 3),
            }

        return await self._vms.mutate(vm_id, "VM.setTicket", run)

    async def set_memory(self, params: VmSetMemoryParams) -> JsonObject:
        vm_id, kib = params["vm_id"], params["memory_mib"] * 1024

        def run(dom: Domain) -> None:
            maximum = dom.maxMemory()
            if kib > maximum:
                raise FailedPrecondition(
                    f"{params['memory_mib']} MiB is above the VM's maximum of "
                    f"{maximum // 1024} MiB", reason="above_maximum", object="vm", id=vm_id)
            dom.setMemoryFlags(kib, self._live_or_config(dom))

        await self._change(vm_id, "VM.setMemory", run)
        return {"memory_mib": params["memory_mib"]}

    async def set_vcpus(self, params: VmSetVcpusParams) -> JsonObject:
        vm_id, count = params["vm_id"], params["vcpus"]
        await self._change(vm_id, "VM.setVcpus",
                           lambda dom: dom.setVcpusFlags(count, self._live_or_config(dom)))
        return {"vcpus": count}

    @staticmethod
    def _live_or_config(dom: Domain) -> int:
        running = vmops.state_of(dom)[0] in ("running", "paused")
        return ((vc.DOMAIN_AFFECT_LIVE if running else 0)
                | (vc.DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0))

    async def _change(self, vm_id: str, method: str, run: Callable[[Domain], object]) -> None:
        try:
            await self._vms.mutate(vm_id, method, run)
        except (NotFound, FailedPrecondition):
            raise
        except ApiError as exc:
            if exc.name in ("Unavailable", "DeadlineExceeded", "Aborted"):
                raise
            raise FailedPrecondition(f"{method}: the hypervisor refused: {exc.message}",
                                     reason="not_changeable", object="vm", id=vm_id) from None


"""Blocking libvirt operations on domains, run through ``Hypervisor.call``.

Each function takes the connection first, finds the domain, checks its state and acts,
raising API errors for the caller. They run in the hypervisor's thread pool, never on
the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time

from lxml import etree

from virtnode.errors import AlreadyExists, FailedPrecondition, NotFound
from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.handles import Connection, Domain
from virtnode.storage.images import qcow2
from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml
from virtnode.vm import pcieports
from virtnode.vm.spec import NAMESPACE, PREFIX, device_summary, metadata_body, read_metadata
from virtnode.vm.state import reason_name, vm_state

log = logging.getLogger(__name__)


_UNDEFINE_FLAGS = (
    vc.DOMAIN_UNDEFINE_MANAGED_SAVE
    | vc.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | vc.DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)
#: Flag sets tried in order: drivers refuse flags they do not know (the test driver has
#: no checkpoints), and a domain without NVRAM may refuse the NVRAM flag.
_UNDEFINE_ATTEMPTS = (
    _UNDEFINE_FLAGS | vc.DOMAIN_UNDEFINE_NVRAM,
    _UNDEFINE_FLAGS,
    vc.DOMAIN_UNDEFINE_MANAGED_SAVE | vc.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
)


def is_no_domain(exc: BaseException) -> bool:
    """Whether a libvirt exception says the domain does not exist."""
    return vc.has_error_code(exc, vc.ERR_NO_DOMAIN)


def lookup(conn: Connection, vm_id: str) -> Domain:
    """The domain with UUID ``vm_id``; NotFound when there is none."""
    try:
        return conn.lookupByUUIDString(vm_id)
    except Exception as exc:
        if is_no_domain(exc):
            raise NotFound(f"no VM {vm_id}", reason="not_found", object="vm",
                           id=vm_id) from None
        raise


def state_of(dom: Domain) -> tuple[str, str]:
    state, reason = dom.state()
    return vm_state(state, reason), reason_name(state, reason)


def require_running(dom: Domain, vm_id: str) -> None:
    state, _ = state_of(dom)
    if state not in ("running", "paused", "starting", "shutting_down"):
        raise FailedPrecondition(f"VM {vm_id} is not running (state {state})",
                                 reason="vm_not_running", object="vm", id=vm_id)


def require_stopped(dom: Domain, vm_id: str) -> None:
    state, _ = state_of(dom)
    if state not in ("shutoff", "defined", "crashed"):
        raise FailedPrecondition(f"VM {vm_id} is {state}", reason="vm_running",
                                 object="vm", id=vm_id)


def check_unique(conn: Connection, name: str, vm_id: str) -> None:
    """Raise AlreadyExists if a domain has this name or UUID."""
    for lookup_fn, value, what in ((conn.lookupByUUIDString, vm_id, "uuid"),
                                   (conn.lookupByName, name, "name")):
        try:
            lookup_fn(value)
        except Exception as exc:
            if is_no_domain(exc):
                continue
            raise
        raise AlreadyExists(f"a VM with {what} {value} already exists",
                            reason=f"{what}_taken", object="vm", id=value)


def names_backing(path: str) -> bool:
    """Whether the regular file at ``path`` is a qcow2 image naming a backing file.

    Reads the header's backing file offset (bytes 8-15); anything that is not a readable
    qcow2 file answers False, and QEMU then judges it. Never blocks on a FIFO.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        header = os.pread(fd, 16, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return (len(header) == 16 and header[:4] == qcow2.MAGIC
            and int.from_bytes(header[8:16], "big") != 0)


def create(conn: Connection, xml: str, *, persistent: bool, start: bool,
           hotplug_ports: int | None = None) -> Domain:
    """Define and/or start a domain; a failed start of a new definition is rolled back.

    With ``hotplug_ports``, a persistent domain whose stored definition has fewer free
    PCIe root ports than that gets more before it starts (:mod:`virtnode.vm.pcieports`).
    A transient domain has only the ports its XML brings.
    """
    if not persistent:
        return conn.createXML(xml, vc.DOMAIN_START_VALIDATE)
    dom = conn.defineXMLFlags(xml, vc.DOMAIN_DEFINE_VALIDATE)
    if hotplug_ports is not None:
        try:
            dom = _top_up_ports(conn, dom, hotplug_ports)
        except Exception:
            undefine_quietly(dom)
            raise
    if start:
        try:
            dom.create()
        except Exception:
            undefine_quietly(dom)
            raise
    return dom


def _top_up_ports(conn: Connection, dom: Domain, spare: int) -> Domain:
    # SECURE: the definition is written back, and must keep the graphics password.
    root = parse_xml(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE | vc.DOMAIN_XML_SECURE),
                     what="domain XML")
    added = pcieports.top_up(root, spare)
    if not added:
        return dom
    log.info("%s: %d more PCIe root ports for hotplug", dom.name(), added)
    return conn.defineXMLFlags(etree.tostring(root, encoding="unicode"),
                               vc.DOMAIN_DEFINE_VALIDATE)


def undefine_quietly(dom: Domain) -> None:
    with contextlib.suppress(Exception):  # best effort during a rollback
        undefine(dom)


def undefine(dom: Domain) -> None:
    """Undefine with its managed save, snapshot/checkpoint metadata and NVRAM.

    Falls back to fewer flags only when the driver refuses the flags themselves.
    """
    for flags in _UNDEFINE_ATTEMPTS[:-1]:
        try:
            dom.undefineFlags(flags)
        except Exception as exc:
            if not vc.has_error_code(exc, vc.ERR_INVALID_ARG, vc.ERR_NO_SUPPORT):
                raise
        else:
            return
    dom.undefineFlags(_UNDEFINE_ATTEMPTS[-1])


def mark_started(dom: Domain, metadata: JsonObject | None) -> None:
    """Record the start time in the live metadata (uptime survives agent restarts)."""
    if metadata is None:
        return
    live = {**metadata, "started": f"{time.time():.3f}"}
    body = etree.tostring(metadata_body(live, namespaced=False), encoding="unicode")
    try:
        dom.setMetadata(vc.DOMAIN_METADATA_ELEMENT, body, PREFIX, NAMESPACE,
                        vc.DOMAIN_AFFECT_LIVE)
    except Exception as exc:  # uptime is a convenience; the VM is running
        log.warning("cannot record the start time of %s: %s", dom.name(), exc)


def info(dom: Domain) -> JsonObject:
    """What ``VM.getInfo`` reports, read in one go."""
    xml = dom.XMLDesc(0)
    state, reason = state_of(dom)
    _, max_kib, cur_kib, vcpus, _cpu_time = dom.info()
    metadata = read_metadata(xml)
    started = None if metadata is None else metadata.get("started")
    running = state in ("running", "paused", "starting", "shutting_down")
    uptime = (round(time.time() - float(started), 3)
              if running and started else None)
    return {
        "vm_id": dom.UUIDString(),
        "name": dom.name(),
        "state": state,
        "reason": reason,
        "persistent": bool(dom.isPersistent()),
        "owner": "virtnode" if metadata is not None else "external",
        "labels": {} if metadata is None else metadata.get("labels", {}),
        "template": metadata is not None and metadata.get("template") == "yes",
        "uptime_seconds": uptime,
        "vcpus": vcpus,
        "memory_mib": cur_kib // 1024,
        "max_memory_mib": max_kib // 1024,
        "devices": device_summary(xml),
    }

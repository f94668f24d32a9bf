"""Which storage domain paths running VMs use, read from their live domain XML.

Kept simple on purpose: the disk sources (and backing chains) of active libvirt domains
are compared, as normalised paths, with a domain's directory. A path reached through a
symlink from elsewhere is not recognised; volumes, which VMs will use by id, make that
case moot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import PurePosixPath

from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.connection import Hypervisor
from virtnode.hypervisor.handles import Connection
from virtnode.util.safexml import parse_xml


def disk_sources(xml: str) -> list[str]:
    """Every file or block device path in a domain XML's disks, backing stores included."""
    root = parse_xml(xml, what="domain XML")
    return [str(source.get(attr)) for source in root.iterfind("devices/disk//source")
            for attr in ("file", "dev") if source.get(attr)]


def paths_under(paths: Iterable[str], directory: str) -> list[str]:
    """The absolute ``paths`` inside ``directory`` (after normalising ``..`` and ``//``)."""
    base = PurePosixPath(os.path.normpath(directory))
    return [p for p in paths
            if p.startswith("/") and PurePosixPath(os.path.normpath(p)).is_relative_to(base)]


async def running_vm_disks(hypervisor: Hypervisor) -> dict[str, list[str]]:
    """Disk paths of every running VM, by VM name. Raises what ``Hypervisor.call`` raises
    (``Unavailable`` while libvirt is disconnected)."""

    def read(conn: Connection) -> list[tuple[str, str]]:
        return [(dom.name(), dom.XMLDesc(0))
                for dom in conn.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE)]

    domains = await hypervisor.call(read, what="listing the disks of running VMs")
    return {name: disk_sources(xml) for name, xml in domains}


async def all_vm_disks(hypervisor: Hypervisor) -> dict[str, list[str]]:
    """Disk paths of every VM libvirt knows, running or only defined, by VM name: a
    running VM's live disks and, when it is persistent, those of its definition too (the
    media its next start will use). Raises what ``Hypervisor.call`` raises."""

    def read(conn: Connection) -> list[tuple[str, list[str]]]:
        found = []
        for dom in conn.listAllDomains(0):
            xmls = [dom.XMLDesc(0)]
            if dom.isActive() and dom.isPersistent():
                xmls.append(dom.XMLDesc(vc.DOMAIN_XML_INACTIVE))
            found.append((dom.name(), xmls))
        return [(name, [p for xml in xmls for p in disk_sources(xml)]) for name, xmls in found]

    domains = await hypervisor.call(read, what="listing the disks of VMs")
    return dict(domains)

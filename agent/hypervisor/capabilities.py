"""Parsing of libvirt's capabilities XML into the shape ``Host.getCapabilities`` returns."""

from __future__ import annotations

from lxml import etree

from virtnode.util.jsontypes import JsonObject
from virtnode.util.safexml import parse_xml

_UNIT_BYTES = {"b": 1, "bytes": 1, "kib": 1024, "k": 1024, "mib": 1024**2, "m": 1024**2,
               "gib": 1024**3, "g": 1024**3, "tib": 1024**4}


def _bytes(element: etree._Element | None) -> int | None:
    if element is None or element.text is None:
        return None
    unit = element.get("unit", "KiB").lower()
    return int(element.text) * _UNIT_BYTES.get(unit, 1024)


def _int_attr(element: etree._Element | None, name: str) -> int | None:
    value = None if element is None else element.get(name)
    return int(value) if value is not None and value.isdigit() else None


def _cpu(host: etree._Element | None) -> JsonObject:
    cpu = host.find("cpu") if host is not None else None
    topology = cpu.find("topology") if cpu is not None else None
    features: list[str] = []
    if cpu is not None:
        features = [f.get("name", "") for f in cpu.findall("feature")]
        listed = cpu.find("features")
        if listed is not None:
            features += [str(child.tag) for child in listed]
    return {
        "arch": cpu.findtext("arch", default="") if cpu is not None else "",
        "model": cpu.findtext("model", default="") if cpu is not None else "",
        "vendor": cpu.findtext("vendor", default="") if cpu is not None else "",
        "topology": {
            key: _int_attr(topology, key) or 1 for key in ("sockets", "dies", "cores", "threads")
        },
        "flags": sorted(set(f for f in features if f)),
    }


def _numa_cells(host: etree._Element | None) -> list[JsonObject]:
    if host is None:
        return []
    cells = []
    for cell in host.iterfind("topology/cells/cell"):
        cpus = [int(c.get("id", "0")) for c in cell.iterfind("cpus/cpu")]
        cells.append({
            "id": int(cell.get("id", "0")),
            "memory_bytes": _bytes(cell.find("memory")) or 0,
            "cpus": sorted(cpus),
        })
    return cells


def _guests(root: etree._Element) -> list[JsonObject]:
    guests = []
    for guest in root.iterfind("guest"):
        arch = guest.find("arch")
        if arch is None:
            continue
        guests.append({
            "os_type": guest.findtext("os_type", default=""),
            "arch": arch.get("name", ""),
            "domain_types": sorted({d.get("type", "") for d in arch.iterfind("domain")} - {""}),
        })
    return guests


def parse_capabilities(xml: str) -> JsonObject:
    """Turn libvirt's ``<capabilities>`` document into a plain dictionary.

    Raises :class:`~virtnode.errors.InvalidArgument` when the XML is not well-formed.
    """
    root = parse_xml(xml, what="capabilities XML")
    host = root.find("host")
    guests = _guests(root)
    return {
        "uuid": host.findtext("uuid", default="") if host is not None else "",
        "cpu": _cpu(host),
        "numa_cells": _numa_cells(host),
        "guests": guests,
        "domain_types": sorted({t for g in guests for t in g["domain_types"]}),
    }

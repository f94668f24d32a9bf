"""Blocking libvirt calls of the statistics sampler, run through ``Hypervisor.call``.

Records come back as ``(vm_id, name, stats, handle)`` with libvirt's flat stats dict, to
which each NIC's bridge is added as ``net.N.bridge`` (read here, in the worker thread, so
nothing on the event loop reads sysfs for it). Every call
passes ``NOWAIT``: libvirt then skips the monitor queries of a domain whose job another
call holds, instead of waiting for it (see docs/architecture.md, "Statistics").
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from virtnode.hypervisor import constants as vc
from virtnode.hypervisor.handles import Connection, Domain, DomainStats

#: (vm_id, name, libvirt's flat stats with net.N.bridge, the domain handle)
Record = tuple[str, str, DomainStats, Domain]

GROUPS = (vc.DOMAIN_STATS_STATE | vc.DOMAIN_STATS_CPU_TOTAL | vc.DOMAIN_STATS_BALLOON
          | vc.DOMAIN_STATS_VCPU | vc.DOMAIN_STATS_INTERFACE | vc.DOMAIN_STATS_BLOCK)
BULK_FLAGS = vc.CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | vc.CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
LIST_FLAGS = vc.CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


def bridge_of(device: str) -> str:
    """The bridge a host network device is a port of ('' for none); reads sysfs only."""
    if not device or "/" in device or device.startswith("."):
        return ""
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{device}/master"))
    except OSError:
        return ""


def _with_bridges(stats: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(stats.items()):
        if key.startswith("net.") and key.endswith(".name"):
            stats[key.removesuffix("name") + "bridge"] = bridge_of(str(value))
    return stats


def _records(pairs: list[tuple[Domain, DomainStats]]) -> list[Record]:
    # UUIDString() and name() read the handle; they make no call to libvirtd.
    return [(dom.UUIDString(), dom.name(), _with_bridges(stats), dom) for dom, stats in pairs
            if stats.get("state.state") != vc.DOMAIN_SHUTOFF]


def bulk(conn: Connection) -> list[Record]:
    """Statistics of every running domain in one call (it lists them, locking each)."""
    return _records(conn.getAllDomainStats(GROUPS, BULK_FLAGS))


def of(conn: Connection, doms: Collection[Domain], new_ids: Collection[str]) -> list[Record]:
    """Statistics of the domains ``doms`` and those with ``new_ids``, in one call.

    Lists nothing: libvirt locks every domain to list them, and a stats call stuck on a
    domain may hold its lock. Only the given domains, and the new ones looked up by UUID,
    are touched.
    """
    handles = list(doms)
    for vm_id in new_ids:
        try:
            handles.append(conn.lookupByUUIDString(vm_id))
        except Exception as exc:
            if not vc.has_error_code(exc, vc.ERR_NO_DOMAIN):
                raise
    return _records(conn.domainListGetStats(handles, GROUPS, LIST_FLAGS)) if handles else []


def control_state(dom: Domain) -> tuple[int, int] | None:
    """The domain's control interface state and its age in ms; None if unknown.

    Blocks while another call holds the domain's lock.
    """
    try:
        state, _details, ms = dom.controlInfo()
    except Exception as exc:
        if vc.has_error_code(exc, vc.ERR_NO_SUPPORT):
            return None
        raise
    return int(state), int(ms)

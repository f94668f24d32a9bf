"""Blocking libvirt calls of the statistics sampler, run through ``Hypervisor.call``.

Records come back as ``(vm_id, name, stats)`` with libvirt's flat stats dict. Every call
passes ``NOWAIT``: libvirt then skips the monitor queries of a domain whose job another
call holds, instead of waiting for it (see docs/architecture.md, "Statistics").
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from virtnode import virconst as vc

Connection = Any
Record = tuple[str, str, dict[str, Any]]
#: (virDomainControlState, milliseconds in that state) by vm_id.
ControlStates = dict[str, tuple[int, int]]

GROUPS = (vc.DOMAIN_STATS_STATE | vc.DOMAIN_STATS_CPU_TOTAL | vc.DOMAIN_STATS_BALLOON
          | vc.DOMAIN_STATS_VCPU | vc.DOMAIN_STATS_INTERFACE | vc.DOMAIN_STATS_BLOCK)
BULK_FLAGS = vc.CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | vc.CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
LIST_FLAGS = vc.CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


def _records(pairs: Any) -> list[Record]:
    # UUIDString() and name() read the handle; they make no call to libvirtd.
    return [(dom.UUIDString(), dom.name(), stats) for dom, stats in pairs]


def _unsupported(exc: BaseException) -> bool:
    code = getattr(exc, "get_error_code", None)
    return callable(code) and code() == vc.ERR_NO_SUPPORT


def bulk(conn: Connection) -> list[Record]:
    """Statistics of every running domain in one call."""
    return _records(conn.getAllDomainStats(GROUPS, BULK_FLAGS))


def control_state(dom: Any) -> tuple[int, int] | None:
    """The domain's control interface state and its age in ms; None if unknown."""
    try:
        state, _details, ms = dom.controlInfo()
    except Exception as exc:
        if _unsupported(exc):
            return None
        raise
    return int(state), int(ms)


def without(conn: Connection, exclude: Collection[str]
            ) -> tuple[list[Record], dict[str, tuple[int, int] | None]]:
    """Statistics of the running domains not in ``exclude``, in one call.

    Also returns the control state of each excluded domain that is still running, so
    the caller can tell when one is free again.
    """
    keep, held = [], {}
    for dom in conn.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE):
        vm_id = dom.UUIDString()
        if vm_id in exclude:
            held[vm_id] = control_state(dom)
        else:
            keep.append(dom)
    records = _records(conn.domainListGetStats(keep, GROUPS, LIST_FLAGS)) if keep else []
    return records, held


def control_states(conn: Connection) -> ControlStates | None:
    """The control state of every running domain; None if the driver cannot tell."""
    states: ControlStates = {}
    for dom in conn.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE):
        state = control_state(dom)
        if state is None:
            return None
        states[dom.UUIDString()] = state
    return states


def running_ids(conn: Connection) -> list[str]:
    """The vm_ids of the running domains."""
    return [dom.UUIDString() for dom in conn.listAllDomains(vc.CONNECT_LIST_DOMAINS_ACTIVE)]


def probe(conn: Connection, vm_id: str) -> list[Record]:
    """Statistics of one domain, waiting for its job: blocks while its monitor is stuck."""
    dom = conn.lookupByUUIDString(vm_id)
    return _records(conn.domainListGetStats([dom], GROUPS, 0))

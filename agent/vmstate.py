"""The agent's VM state model, mapped from libvirt's (state, reason) pairs.

States: ``defined``, ``starting``, ``running``, ``paused``, ``shutting_down``,
``shutoff``, ``crashed``, ``unknown``. See docs/architecture.md for the table.
"""

from __future__ import annotations

# libvirt's virDomainState values, spelled out so this module needs no libvirt import.
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)
PAUSED_STARTING_UP = 11
SHUTOFF_CRASHED = 3

STATES = (
    "defined",
    "starting",
    "running",
    "paused",
    "shutting_down",
    "shutoff",
    "crashed",
    "unknown",
)


def vm_state(state: int, reason: int) -> str:
    """Map a libvirt (state, reason) pair to the agent's state name."""
    if state in (RUNNING, BLOCKED):
        return "running"
    if state == PAUSED:
        return "starting" if reason == PAUSED_STARTING_UP else "paused"
    if state == PMSUSPENDED:
        return "paused"
    if state == SHUTDOWN:
        return "shutting_down"
    if state == SHUTOFF:
        return "crashed" if reason == SHUTOFF_CRASHED else "shutoff"
    if state == CRASHED:
        return "crashed"
    return "unknown"

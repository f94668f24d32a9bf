"""The agent's VM state model, mapped from libvirt's (state, reason) pairs.

States: ``defined``, ``starting``, ``running``, ``paused``, ``shutting_down``,
``shutoff``, ``crashed``, ``unknown``. See docs/architecture.md for the table.
"""

from __future__ import annotations

from virtnode.hypervisor import constants as vc

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

#: Reasons per state, as libvirt numbers them (virDomain<State>Reason), by name.
_REASONS: dict[int, tuple[str, ...]] = {
    vc.DOMAIN_RUNNING: ("unknown", "booted", "migrated", "restored", "from_snapshot",
                        "unpaused", "migration_canceled", "save_canceled", "wakeup",
                        "crashed", "postcopy", "postcopy_failed"),
    vc.DOMAIN_PAUSED: ("unknown", "user", "migration", "save", "dump", "ioerror",
                       "watchdog", "from_snapshot", "shutting_down", "snapshot",
                       "crashed", "starting_up", "postcopy", "postcopy_failed",
                       "api_error"),
    vc.DOMAIN_SHUTDOWN: ("unknown", "user"),
    vc.DOMAIN_SHUTOFF: ("unknown", "shutdown", "destroyed", "crashed", "migrated", "saved",
                        "failed", "from_snapshot", "daemon"),
    vc.DOMAIN_CRASHED: ("unknown", "panicked"),
    vc.DOMAIN_PMSUSPENDED: ("unknown",),
}


def vm_state(state: int, reason: int) -> str:
    """Map a libvirt (state, reason) pair to the agent's state name."""
    if state in (vc.DOMAIN_RUNNING, vc.DOMAIN_BLOCKED):
        return "running"
    if state == vc.DOMAIN_PAUSED:
        return "starting" if reason == vc.DOMAIN_PAUSED_STARTING_UP else "paused"
    if state == vc.DOMAIN_PMSUSPENDED:
        return "paused"
    if state == vc.DOMAIN_SHUTDOWN:
        return "shutting_down"
    if state == vc.DOMAIN_SHUTOFF:
        if reason == vc.DOMAIN_SHUTOFF_CRASHED:
            return "crashed"
        # Reason "unknown": defined and not run since libvirtd started.
        return "defined" if reason == vc.DOMAIN_SHUTOFF_UNKNOWN else "shutoff"
    if state == vc.DOMAIN_CRASHED:
        return "crashed"
    return "unknown"


def reason_name(state: int, reason: int) -> str:
    """libvirt's reason for a state, as a lower-case word (``booted``, ``destroyed``...)."""
    names = _REASONS.get(vc.DOMAIN_RUNNING if state == vc.DOMAIN_BLOCKED else state, ())
    return names[reason] if 0 <= reason < len(names) else "unknown"


_EVENTS: dict[int, tuple[str, tuple[str, ...]]] = {
    vc.DOMAIN_EVENT_DEFINED: ("defined", ("added", "updated", "renamed", "from_snapshot")),
    vc.DOMAIN_EVENT_UNDEFINED: ("undefined", ("removed", "renamed")),
    vc.DOMAIN_EVENT_STARTED: ("started", ("booted", "migrated", "restored", "from_snapshot",
                                          "wakeup", "recreated")),
    vc.DOMAIN_EVENT_SUSPENDED: ("suspended", ("paused", "migrated", "ioerror", "watchdog",
                                              "restored", "from_snapshot", "api_error",
                                              "postcopy", "postcopy_failed")),
    vc.DOMAIN_EVENT_RESUMED: ("resumed", ("unpaused", "migrated", "from_snapshot",
                                          "postcopy", "postcopy_failed")),
    vc.DOMAIN_EVENT_STOPPED: ("stopped", ("shutdown", "destroyed", "crashed", "migrated",
                                          "saved", "failed", "from_snapshot")),
    vc.DOMAIN_EVENT_SHUTDOWN: ("shutdown", ("finished", "guest", "host")),
    vc.DOMAIN_EVENT_PMSUSPENDED: ("pmsuspended", ("memory", "disk")),
    vc.DOMAIN_EVENT_CRASHED: ("crashed", ("panicked", "crashloaded")),
}
_STOPPED_CRASHED = 2


def lifecycle(event: int, detail: int, previous: str | None) -> tuple[str, str, str]:
    """Map a libvirt lifecycle event to ``(event, detail, state after it)``.

    The state after an event that does not change it (a definition updated) is
    ``previous``; after ``undefined`` it is ``removed``.
    """
    name, details = _EVENTS.get(event, ("unknown", ()))
    detail_name = details[detail] if 0 <= detail < len(details) else "unknown"
    state = {
        "started": "running",
        "resumed": "running",
        "suspended": "paused",
        "pmsuspended": "paused",
        "shutdown": "shutting_down",
        "crashed": "crashed",
        "undefined": "removed",
    }.get(name)
    if name == "stopped":
        state = "crashed" if detail == _STOPPED_CRASHED else "shutoff"
    elif name == "defined":
        # Defining never changes whether a VM runs: a running transient VM made
        # persistent gets "added" and keeps running.
        active = previous in ("starting", "running", "paused", "shutting_down")
        fresh = detail_name == "added" and not active
        state = "defined" if fresh or previous is None else previous
    return name, detail_name, state or previous or "unknown"


def is_start_noise(event: str, previous: str | None) -> bool:
    """Whether a lifecycle event only reflects how libvirt starts a VM: it starts QEMU with
    its CPUs paused and resumes them before it reports ``started``, so a ``resumed`` of a
    VM that was not paused is no change a subscriber should hear of."""
    return event == "resumed" and previous != "paused"

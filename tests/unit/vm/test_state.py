"""libvirt (state, reason) pairs and lifecycle events mapped to the agent's VM states."""

from __future__ import annotations

import libvirt
import pytest

from virtnode.vm.state import STATES, is_start_noise, lifecycle, reason_name, vm_state


@pytest.mark.parametrize(("state", "reason", "expected"), [
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, "running"),
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED, "running"),
    (libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_BLOCKED_UNKNOWN, "running"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, "paused"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR, "paused"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, "starting"),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, libvirt.VIR_DOMAIN_PMSUSPENDED_UNKNOWN, "paused"),
    (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER, "shutting_down"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN, "defined"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, "shutoff"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, "shutoff"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED, "shutoff"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_FAILED, "shutoff"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, "crashed"),
    (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED, "crashed"),
    (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_UNKNOWN, "crashed"),
    (libvirt.VIR_DOMAIN_NOSTATE, libvirt.VIR_DOMAIN_NOSTATE_UNKNOWN, "unknown"),
    (99, 0, "unknown"),
])
def test_vm_state(state: int, reason: int, expected: str) -> None:
    assert vm_state(state, reason) == expected
    assert expected in STATES


@pytest.mark.parametrize(("state", "prefix"), [
    (libvirt.VIR_DOMAIN_RUNNING, "VIR_DOMAIN_RUNNING_"),
    (libvirt.VIR_DOMAIN_PAUSED, "VIR_DOMAIN_PAUSED_"),
    (libvirt.VIR_DOMAIN_SHUTOFF, "VIR_DOMAIN_SHUTOFF_"),
    (libvirt.VIR_DOMAIN_CRASHED, "VIR_DOMAIN_CRASHED_"),
])
def test_reason_names_follow_libvirt(state: int, prefix: str) -> None:
    reasons = {getattr(libvirt, n): n.removeprefix(prefix).lower()
               for n in dir(libvirt) if n.startswith(prefix)}
    assert len(reasons) >= 2
    for value, name in reasons.items():
        assert reason_name(state, value) == name


@pytest.mark.parametrize(("state", "reason", "expected"), [
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, "booted"),
    (libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_BLOCKED_UNKNOWN, "unknown"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, "starting_up"),
    (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_UNKNOWN, "unknown"),
    (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER, "user"),
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, "destroyed"),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, libvirt.VIR_DOMAIN_PMSUSPENDED_UNKNOWN, "unknown"),
    (libvirt.VIR_DOMAIN_NOSTATE, libvirt.VIR_DOMAIN_NOSTATE_UNKNOWN, "unknown"),
    (libvirt.VIR_DOMAIN_RUNNING, 1000, "unknown"),
    (libvirt.VIR_DOMAIN_SHUTOFF, -1, "unknown"),
    (99, 1, "unknown"),
])
def test_reason_name(state: int, reason: int, expected: str) -> None:
    assert reason_name(state, reason) == expected


@pytest.mark.parametrize(("event", "detail", "expected"), [
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED,
     ("started", "booted", "running")),
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED,
     ("started", "restored", "running")),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
     ("suspended", "paused", "paused")),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
     ("suspended", "ioerror", "paused")),
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED,
     ("resumed", "unpaused", "running")),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
     ("stopped", "shutdown", "shutoff")),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
     ("stopped", "destroyed", "shutoff")),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED,
     ("stopped", "failed", "shutoff")),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
     ("stopped", "crashed", "crashed")),
    (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
     ("shutdown", "guest", "shutting_down")),
    (libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY,
     ("pmsuspended", "memory", "paused")),
    (libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED,
     ("crashed", "panicked", "crashed")),
    (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED,
     ("undefined", "removed", "removed")),
])
def test_lifecycle_sets_the_state(event: int, detail: int,
                                  expected: tuple[str, str, str]) -> None:
    # The state after these events does not depend on the one before.
    assert lifecycle(event, detail, "running") == expected
    assert lifecycle(event, detail, None) == expected


def test_defined_added_is_a_new_vm() -> None:
    added = libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_DEFINED, added, None) == (
        "defined", "added", "defined")


@pytest.mark.parametrize("previous", ["shutoff", "crashed", "running", "paused"])
def test_defined_updated_keeps_the_state(previous: str) -> None:
    updated = libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_DEFINED, updated, previous) == (
        "defined", "updated", previous)


def test_defined_updated_of_an_unseen_vm_is_defined() -> None:
    updated = libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_DEFINED, updated, None)[2] == "defined"


def test_running_transient_vm_made_persistent_keeps_running() -> None:
    # virsh define on a running transient VM reports "added"; the VM still runs.
    added = libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_DEFINED, added, "running")[2] == "running"


def test_unknown_event_keeps_the_state() -> None:
    assert lifecycle(99, 0, "paused") == ("unknown", "unknown", "paused")
    assert lifecycle(99, 0, None) == ("unknown", "unknown", "unknown")


def test_unknown_detail_of_a_known_event() -> None:
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_STARTED, 99, None) == (
        "started", "unknown", "running")
    assert lifecycle(libvirt.VIR_DOMAIN_EVENT_STOPPED, -1, "running") == (
        "stopped", "unknown", "shutoff")


EVENT_PREFIXES = {
    "VIR_DOMAIN_EVENT_DEFINED_": ("defined", libvirt.VIR_DOMAIN_EVENT_DEFINED),
    "VIR_DOMAIN_EVENT_UNDEFINED_": ("undefined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED),
    "VIR_DOMAIN_EVENT_STARTED_": ("started", libvirt.VIR_DOMAIN_EVENT_STARTED),
    "VIR_DOMAIN_EVENT_SUSPENDED_": ("suspended", libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
    "VIR_DOMAIN_EVENT_RESUMED_": ("resumed", libvirt.VIR_DOMAIN_EVENT_RESUMED),
    "VIR_DOMAIN_EVENT_STOPPED_": ("stopped", libvirt.VIR_DOMAIN_EVENT_STOPPED),
    "VIR_DOMAIN_EVENT_SHUTDOWN_": ("shutdown", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN),
    "VIR_DOMAIN_EVENT_PMSUSPENDED_": ("pmsuspended", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED),
    "VIR_DOMAIN_EVENT_CRASHED_": ("crashed", libvirt.VIR_DOMAIN_EVENT_CRASHED),
}


@pytest.mark.parametrize("prefix", sorted(EVENT_PREFIXES))
def test_event_and_detail_names_follow_libvirt(prefix: str) -> None:
    name, event = EVENT_PREFIXES[prefix]
    details = {getattr(libvirt, n): n.removeprefix(prefix).lower()
               for n in dir(libvirt) if n.startswith(prefix)}
    assert details
    for value, detail in details.items():
        assert lifecycle(event, value, None)[:2] == (name, detail)


@pytest.mark.parametrize(("event", "previous", "noise"), [
    ("resumed", "defined", True),
    ("resumed", "shutoff", True),
    ("resumed", None, True),
    ("resumed", "paused", False),
    ("started", "defined", False),
    ("suspended", "running", False),
])
def test_a_resume_of_a_vm_that_was_not_paused_is_start_noise(event: str, previous: str | None,
                                                              noise: bool) -> None:
    assert is_start_noise(event, previous) is noise

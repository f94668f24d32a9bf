"""Convergence policies for live migration: what to do when a migration does not end.

A pre-copy migration sends the guest's memory, then, pass after pass ("memory
iterations"), what the guest dirtied meanwhile. It ends once what remains can be sent
within the allowed downtime. A guest that dirties memory faster than the link carries it
never gets there: libvirt alone would go on for ever.

A :class:`Schedule` says what to do instead: an initial maximum downtime, then steps, each
taken once the migration has *stalled* a number of times. An iteration stalls when it
starts with no less to send (by :data:`PROGRESS` of it) than the best iteration before it;
the first pass (all of memory) and the second (the first measure of what the guest
dirties) set the baseline. A step raises the allowed downtime, switches to post-copy (the
guest runs on at the destination and fetches the pages it lacks), suspends the guest so
the rest is sent while it is paused, or aborts: the VM runs on here, untouched.

The named policies follow VDSM's convergence schedules, which count iterations; these
count stalled iterations, so a migration that still makes progress is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtnode.errors import InvalidArgument
from virtnode.util.jsontypes import JsonObject

ACTIONS = ("downtime", "post_copy", "suspend", "abort")
#: Actions after which no step can follow: the migration is no longer pre-copy, or ends.
FINAL = frozenset({"post_copy", "suspend", "abort"})
#: An iteration makes progress when it starts with less than (1 - PROGRESS) of the best.
PROGRESS = 0.1
MAX_DOWNTIME_MS = 60_000


@dataclass(frozen=True)
class Step:
    """Once the migration has stalled ``stalled`` times: ``action`` (with
    ``downtime_ms`` for ``downtime``)."""

    stalled: int
    action: str
    downtime_ms: int = 0

    def to_api(self) -> JsonObject:
        step: JsonObject = {"stalled_iterations": self.stalled, "action": self.action}
        if self.action == "downtime":
            step["downtime_ms"] = self.downtime_ms
        return step


@dataclass(frozen=True)
class Schedule:
    name: str
    initial_downtime_ms: int
    steps: tuple[Step, ...]

    @property
    def post_copy(self) -> bool:
        """Whether the migration must be started able to switch to post-copy."""
        return any(step.action == "post_copy" for step in self.steps)

    def to_api(self) -> JsonObject:
        return {"name": self.name, "initial_downtime_ms": self.initial_downtime_ms,
                "steps": [step.to_api() for step in self.steps]}


def _raises(*downtimes: tuple[int, int]) -> tuple[Step, ...]:
    return tuple(Step(stalled, "downtime", ms) for stalled, ms in downtimes)


_VDSM_RAISES = _raises((1, 150), (2, 200), (3, 300), (4, 400), (6, 500))

POLICIES: dict[str, Schedule] = {
    # Raise the downtime as VDSM's "minimal downtime" does, then give up: the VM is never
    # paused for longer than half a second.
    "minimal_downtime": Schedule("minimal_downtime", 100, (*_VDSM_RAISES, Step(8, "abort"))),
    # Raise the downtime a little, then let the guest run on at the destination: always
    # ends, with the guest slowed while it fetches the pages it lacks.
    "post_copy": Schedule("post_copy", 100, (*_raises((1, 150), (2, 300)),
                                             Step(3, "post_copy"))),
    # Raise the downtime, then pause the guest for the rest: always ends, with a downtime
    # as long as what remains takes to send.
    "suspend_workload": Schedule("suspend_workload", 100, (
        *_raises((1, 200), (2, 500), (3, 1000), (4, 2000)), Step(5, "suspend"))),
}
DEFAULT_POLICY = "minimal_downtime"


def schedule_of(policy: str | Mapping[str, Any] | None) -> Schedule:
    """The schedule a ``VM.migrate`` policy names or spells out; InvalidArgument when it
    makes no sense (the schema has checked the types)."""
    if policy is None:
        return POLICIES[DEFAULT_POLICY]
    if isinstance(policy, str):
        try:
            return POLICIES[policy]
        except KeyError:
            raise InvalidArgument(f"no policy {policy!r}; known: {', '.join(POLICIES)}",
                                  reason="bad_policy", field="policy") from None
    steps = tuple(Step(int(s["stalled_iterations"]), str(s["action"]),
                       int(s.get("downtime_ms", 0))) for s in policy.get("steps", ()))
    initial = int(policy.get("initial_downtime_ms", POLICIES[DEFAULT_POLICY]
                             .initial_downtime_ms))
    downtime = initial
    for index, step in enumerate(steps):
        where = f"policy.steps[{index}]"
        if index and step.stalled < steps[index - 1].stalled:
            raise InvalidArgument(f"{where}: steps must come in order of stalled_iterations",
                                  reason="bad_policy", field=where)
        if step.action == "downtime":
            if step.downtime_ms <= downtime:
                raise InvalidArgument(
                    f"{where}: downtime_ms must raise the downtime above {downtime} ms",
                    reason="bad_policy", field=where)
            downtime = step.downtime_ms
        elif "downtime_ms" in policy["steps"][index]:
            raise InvalidArgument(f"{where}: only a downtime step takes downtime_ms",
                                  reason="bad_policy", field=where)
        if step.action in FINAL and index != len(steps) - 1:
            raise InvalidArgument(f"{where}: nothing can follow {step.action}",
                                  reason="bad_policy", field=where)
    return Schedule("custom", initial, steps)


class Follower:
    """Follows a migration's job statistics and says which steps are due."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.stalled = 0
        self.downtime_ms = schedule.initial_downtime_ms
        self._iteration = 0
        self._best: int | None = None
        self._next = 0

    def raise_floor(self, downtime_ms: int) -> None:
        """The migration allows ``downtime_ms`` already (a follower taking over one that
        ran without it): the steps that would not raise it are passed over."""
        self.downtime_ms = max(self.downtime_ms, downtime_ms)
        while (self._next < len(self.schedule.steps)
               and self.schedule.steps[self._next].action == "downtime"
               and self.schedule.steps[self._next].downtime_ms <= self.downtime_ms):
            self._next += 1

    def observe(self, iteration: int, remaining: int) -> list[Step]:
        """A reading of libvirt's ``memory_iteration`` and ``data_remaining``: the steps
        to take now, in order (none while the iteration is the same)."""
        if iteration <= self._iteration:
            return []
        passed, self._iteration = iteration - self._iteration, iteration
        if iteration < 2:
            return []  # the first pass sends all of memory: nothing to judge yet
        if self._best is None or remaining < self._best * (1 - PROGRESS):
            self._best = remaining  # the baseline, or progress
            return []
        self.stalled += passed
        due: list[Step] = []
        while (self._next < len(self.schedule.steps)
               and self.schedule.steps[self._next].stalled <= self.stalled):
            step = self.schedule.steps[self._next]
            self._next += 1
            due.append(step)
            if step.action == "downtime":
                self.downtime_ms = step.downtime_ms
        return due


_CLEAR_CAPS = re.compile(r"^\s*clear_emulator_capabilities\s*=\s*(\d+)\s*(#.*)?$")


def post_copy_possible(sysctl: str, qemu_conf: str, qemu_user: str | None) -> bool:
    """Whether this host's QEMU can take part in a post-copy migration: it needs
    ``userfaultfd``, which the kernel gives an unprivileged process only with
    ``vm.unprivileged_userfaultfd = 1`` (``sysctl``, the file's text), and otherwise only
    to a QEMU that runs as root and keeps its capabilities (``qemu.conf``)."""
    if sysctl.strip() == "1":
        return True
    if qemu_user not in ("root", "0"):
        return False
    for line in qemu_conf.splitlines():
        match = _CLEAR_CAPS.match(line)
        if match:
            return match.group(1) == "0"
    return False

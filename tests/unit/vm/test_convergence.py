"""Convergence schedules: named policies, schedules of one's own, stall counting."""

from __future__ import annotations

import pytest

from virtnode.errors import InvalidArgument
from virtnode.vm.convergence import (
    POLICIES,
    Follower,
    post_copy_possible,
    schedule_of,
)

MIB = 1 << 20


def test_the_default_is_vdsms_minimal_downtime_then_abort() -> None:
    schedule = schedule_of(None)
    assert schedule.name == "minimal_downtime"
    assert schedule.initial_downtime_ms == 100
    assert [(s.stalled, s.action, s.downtime_ms) for s in schedule.steps] == [
        (1, "downtime", 150), (2, "downtime", 200), (3, "downtime", 300),
        (4, "downtime", 400), (6, "downtime", 500), (8, "abort", 0)]
    assert not schedule.post_copy
    assert schedule_of("post_copy").post_copy
    assert schedule_of("suspend_workload").steps[-1].action == "suspend"


def test_a_migration_that_makes_progress_never_stalls() -> None:
    follower = Follower(POLICIES["minimal_downtime"])
    remaining = 200 * MIB
    for iteration in range(1, 30):
        assert follower.observe(iteration, remaining) == []
        remaining = int(remaining * 0.7)
    assert follower.stalled == 0
    assert follower.downtime_ms == 100


def test_stalls_take_the_steps_in_order() -> None:
    follower = Follower(POLICIES["minimal_downtime"])
    assert follower.observe(1, 256 * MIB) == []  # the first pass: all of memory
    assert follower.observe(2, 16 * MIB) == []  # the baseline
    assert follower.observe(2, 3 * MIB) == [], "readings within one iteration are not judged"
    taken = []
    for iteration in range(3, 12):
        # 10 % less is not progress enough
        taken.append([s.action for s in follower.observe(iteration, 15 * MIB)])
    assert taken == [["downtime"], ["downtime"], ["downtime"], ["downtime"], [],
                     ["downtime"], [], ["abort"], []]
    assert follower.stalled == 9
    assert follower.downtime_ms == 500


def test_iterations_missed_between_readings_count() -> None:
    follower = Follower(schedule_of({"steps": [
        {"stalled_iterations": 3, "action": "post_copy"}]}))
    follower.observe(2, 16 * MIB)
    assert [s.action for s in follower.observe(5, 16 * MIB)] == ["post_copy"]


def test_progress_sets_a_new_best_to_beat() -> None:
    follower = Follower(schedule_of({"initial_downtime_ms": 50, "steps": [
        {"stalled_iterations": 2, "action": "abort"}]}))
    follower.observe(2, 100 * MIB)
    assert follower.observe(3, 80 * MIB) == []  # progress
    assert follower.observe(4, 85 * MIB) == []  # a stall against 80
    assert follower.stalled == 1
    assert [s.action for s in follower.observe(5, 75 * MIB)] == ["abort"], \
        "75 is not 10 % below 80"


@pytest.mark.parametrize(("steps", "field"), [
    ([{"stalled_iterations": 2, "action": "downtime", "downtime_ms": 200},
      {"stalled_iterations": 1, "action": "downtime", "downtime_ms": 300}], "policy.steps[1]"),
    ([{"stalled_iterations": 1, "action": "downtime", "downtime_ms": 50}], "policy.steps[0]"),
    ([{"stalled_iterations": 1, "action": "abort", "downtime_ms": 500}], "policy.steps[0]"),
    ([{"stalled_iterations": 1, "action": "post_copy"},
      {"stalled_iterations": 2, "action": "abort"}], "policy.steps[0]"),
])
def test_schedules_that_make_no_sense_are_refused(steps: list[dict[str, object]],
                                                  field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        schedule_of({"initial_downtime_ms": 100, "steps": steps})
    assert caught.value.details["field"] == field
    assert caught.value.reason == "bad_policy"


def test_an_unknown_policy_name_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        schedule_of("fastest")


def test_post_copy_needs_userfaultfd() -> None:
    assert post_copy_possible("1\n", "", "libvirt-qemu")
    assert not post_copy_possible("0\n", "", "libvirt-qemu")
    assert not post_copy_possible("0\n", "", "root"), "libvirt drops root's capabilities"
    assert post_copy_possible("0\n", "clear_emulator_capabilities = 0\n", "root")
    assert not post_copy_possible("", "clear_emulator_capabilities = 1", "root")


def test_a_follower_taking_over_never_lowers_the_downtime() -> None:
    follower = Follower(POLICIES["minimal_downtime"])
    follower.raise_floor(300)
    assert follower.downtime_ms == 300
    follower.observe(2, 16 * MIB)
    taken = [(s.action, s.downtime_ms) for i in range(3, 12)
             for s in follower.observe(i, 16 * MIB)]
    assert taken == [("downtime", 400), ("downtime", 500), ("abort", 0)]

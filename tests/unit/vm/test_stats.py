"""``VM.getStats`` through the dispatcher, from the sampler on libvirt's test driver.

The test driver reports only each domain's state: the CPU, memory, disk and NIC figures
of a guest, and a VM whose stuck monitor leaves it stale, only QEMU shows
(tests/integration/test_stats_qemu.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.vm.conftest import AgentFactory
from virtnode.util.jsontypes import JsonObject

UNKNOWN = "00000000-0000-4000-8000-00000000abcd"
SAMPLED = {"stats": {"vm_interval": 0.05}}


def sampled(vm_id: str) -> Callable[[JsonObject], bool]:
    return lambda data: vm_id in {vm["vm_id"] for vm in data["vms"]}


@pytest.mark.covers("VM.getStats")
async def test_nothing_before_the_first_sample(start_agent: AgentFactory) -> None:
    api = await start_agent()  # the first VM sample is an hour away
    vm_id = await api.create()
    assert await api.call("VM.getStats") == {"time": None, "vms": [], "missing": []}
    assert await api.call("VM.getStats", {"vm_ids": [vm_id]}) == {
        "time": None, "vms": [], "missing": [vm_id]}


@pytest.mark.covers("VM.getStats")
async def test_stats_of_the_running_vms_from_the_latest_sample(
        start_agent: AgentFactory) -> None:
    api = await start_agent(SAMPLED)
    running = await api.create("running")
    defined = await api.create("defined", start=False)
    await api.events.first("stats.vm", sampled(running), "a sample with the new VM")
    everything = await api.call("VM.getStats")
    assert everything["time"] is not None and everything["missing"] == []
    assert [(vm["name"], vm["state"], vm["stale_seconds"]) for vm in everything["vms"]] == [
        ("running", "running", 0), ("test", "running", 0)], "sorted by name; running only"
    asked = await api.call("VM.getStats", {"vm_ids": [running.upper(), defined, UNKNOWN]})
    assert [vm["vm_id"] for vm in asked["vms"]] == [running]
    assert asked["missing"] == [defined, UNKNOWN]
    await api.error("VM.getStats", {"vm_ids": ["not-a-uuid"]}, "InvalidParams")


@pytest.mark.covers("VM.getStats")
async def test_a_stopped_vm_leaves_the_stats_at_once(start_agent: AgentFactory) -> None:
    api = await start_agent(SAMPLED)
    vm_id = await api.create()
    await api.events.first("stats.vm", sampled(vm_id), "a sample with the VM")
    await api.sampler.close()  # no more samples: the stopped event itself takes it out
    await api.call("VM.destroy", {"vm_id": vm_id})
    await api.events.first("vm.lifecycle", lambda d: d["vm_id"] == vm_id
                           and d["event"] == "stopped", "the VM's stopped event")
    stats = await api.call("VM.getStats", {"vm_ids": [vm_id]})
    assert (stats["vms"], stats["missing"]) == ([], [vm_id])

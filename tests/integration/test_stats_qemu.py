"""Statistics of real guests on qemu:///system: rates that move with guest disk I/O, and a
VM whose monitor is stuck (QEMU stopped with SIGSTOP) going stale while another stays fresh."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests import guests
from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import (
    FAST_RECOVERY,
    make_image,
    next_event,
    qemu_pid,
    scrape,
    vm_name,
)
from tests.integration.test_vm_lifecycle import create, firmware_spec
from virtnode.client import Client
from virtnode.util.jsontypes import JsonObject

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]

SAMPLING = {"host_interval": 1.0, "vm_interval": 1.0, "vm_timeout": 1.0, "probe_timeout": 0.5,
            "stuck_retry": 2.0}


@pytest.fixture
async def stats_agent(tmp_path: Path, libvirtd: None) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI,
                              sections={**FAST_RECOVERY, "stats": SAMPLING,
                                        "log": {"level": "info"}})
    yield agent
    status = await agent.stop()
    assert status == 0, agent.log


async def wait_stats(client: Client, predicate: Callable[[list[JsonObject]], bool],
                     timeout: float = 60.0) -> list[JsonObject]:
    """After each stats.vm event, read VM.getStats until ``predicate(vms)`` holds."""
    vms: list[JsonObject] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                await next_event(client, "stats.vm", lambda _d: True, timeout=timeout)
                vms = (await client.call("VM.getStats"))["vms"]
                if predicate(vms):
                    return vms
    except TimeoutError:
        summary = [(vm["name"], vm["stale_seconds"], vm["time"]) for vm in vms]
        raise AssertionError(f"VM stats never matched; last: {summary}") from None


def by_id(vms: list[JsonObject], vm_id: str) -> JsonObject | None:
    return next((vm for vm in vms if vm["vm_id"] == vm_id), None)


async def test_disk_rates_follow_guest_io(stats_agent: AgentProcess,
                                          checked_client: ClientFactory,
                                          image_dir: Path) -> None:
    client = await checked_client(stats_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["stats.vm"]})
    image = await guests.guest_image("writer")
    disk = await make_image(image_dir, "data.raw", "64M", fmt="raw")
    name = vm_name()
    console = guests.console_log_path(name)
    xml = guests.domain_xml(image, name, str(uuid.uuid4()), console, disk=disk)
    vm_id = str((await client.call("VM.create", {"xml": xml, "persistent": False}))["vm_id"])
    await guests.wait_for_console(console, guests.GUEST_READY, timeout=90)

    def writing(vms: list[JsonObject]) -> bool:
        vm = by_id(vms, vm_id)
        if vm is None or not vm["disks"]:
            return False
        vda = vm["disks"][0]
        # Rates move as soon as the guest writes; a slow (TCG, loaded) guest may need a few
        # cycles more to have written the 4 MiB checked below.
        return bool(vda["write_bytes_per_second"] and vda["read_bytes_per_second"]
                    and vda["write_ops_per_second"] and vda["write_latency_seconds"]
                    and vda["write_bytes"] >= 4 * 1024 * 1024)

    vm = by_id(await wait_stats(client, writing), vm_id)
    assert vm is not None
    vda = vm["disks"][0]
    assert vda["name"] == "vda" and vda["path"] == str(disk)
    assert vda["write_bytes"] >= 4 * 1024 * 1024
    assert 0 < vda["write_latency_seconds"] < 5
    assert vm["cpu"]["percent"] is not None and vm["cpu"]["percent"] > 0, "TCG keeps a CPU busy"
    assert [v["id"] for v in vm["vcpus"]] == [0]

    _, _, text = await scrape(stats_agent.http_url)
    series = (f'virtnode_vm_disk_write_bytes_total{{device="vda",vm_id="{vm_id}",'
              f'vm_name="{name}"}}')
    line = next(line for line in text.splitlines() if line.startswith(series))
    assert float(line.split()[-1]) >= 4 * 1024 * 1024


async def test_stuck_monitor_goes_stale_while_others_stay_fresh(
        stats_agent: AgentProcess, checked_client: ClientFactory) -> None:
    client = await checked_client(stats_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["stats.vm"]})
    stuck_name, fresh_name = vm_name(), vm_name()
    stuck_id = await create(client, stuck_name, spec=firmware_spec(stuck_name))
    fresh_id = await create(client, fresh_name, spec=firmware_spec(fresh_name))
    await wait_stats(client, lambda vms: all(
        (vm := by_id(vms, i)) is not None and vm["cpu"]["percent"] is not None
        for i in (stuck_id, fresh_id)))

    pid = await qemu_pid(stuck_name)
    os.kill(pid, signal.SIGSTOP)
    try:
        await check_stuck_and_fresh(stats_agent, client, stuck_id, fresh_id)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nagent log:\n{stats_agent.log[-5000:]}") from None
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_stats(client, lambda vms: (vm := by_id(vms, stuck_id)) is not None
                     and vm["stale_seconds"] == 0, timeout=30)
    assert "not answering" in stats_agent.log and "answers again" in stats_agent.log


async def check_stuck_and_fresh(agent: AgentProcess, client: Client, stuck_id: str,
                                fresh_id: str) -> None:
    def split(vms: list[JsonObject]) -> bool:
        stuck, fresh = by_id(vms, stuck_id), by_id(vms, fresh_id)
        return (stuck is not None and fresh is not None and stuck["stale_seconds"] >= 2
                and fresh["stale_seconds"] == 0)

    vms = await wait_stats(client, split, timeout=30)
    stuck, fresh = by_id(vms, stuck_id), by_id(vms, fresh_id)
    assert stuck is not None and fresh is not None
    assert fresh["time"] > stuck["time"]
    # The next cycles keep the fresh VM fresh without waiting for the stuck one.
    event = await next_event(client, "stats.vm", lambda _d: True)
    assert event["stale_vms"] == 1, event
    assert event["duration_seconds"] < 1.0, "the stuck VM is left out of the bulk call"
    states = {v["vm_id"]: v["stale_seconds"] for v in event["vms"]}
    assert states[fresh_id] == 0 and states[stuck_id] > 0
    # Other calls are served while the stuck call holds its thread.
    await asyncio.wait_for(client.call("VM.getInfo", {"vm_id": fresh_id}), 5)
    _, _, text = await scrape(agent.http_url)
    assert "virtnode_stats_stale_vms 1.0" in text
    assert f'virtnode_vm_stale_seconds{{vm_id="{stuck_id}"' in text

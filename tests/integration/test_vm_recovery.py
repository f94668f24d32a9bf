"""The agent's restart and libvirtd's: running VMs are never touched, the view comes back."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import (
    FAST_RECOVERY,
    expect_error,
    next_event,
    qemu_pid,
    virt,
    vm_name,
)
from tests.integration.test_vm_lifecycle import create, firmware_spec

pytestmark = [pytest.mark.integration, pytest.mark.qemu,
              pytest.mark.usefixtures("libvirtd", "cleanup_vms")]


async def define_external(name: str) -> str:
    """A VM made with libvirt directly, as another tool would."""
    xml = (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>")
    return str(await virt(lambda conn: conn.createXML(xml, 0).UUIDString()))


async def test_agent_killed_and_restarted_leaves_vms_alone(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    client = await checked_client(agent.unix_url)
    running, paused = vm_name(), vm_name()
    running_id = await create(client, running)
    paused_id = await create(client, paused)
    await client.call("VM.pause", {"vm_id": paused_id})
    external = vm_name()
    external_id = await define_external(external)
    pids = {name: await qemu_pid(name) for name in (running, paused, external)}
    ours = {running_id, paused_id, external_id}  # other work may run VMs on this host
    before = [vm for vm in (await client.call("VM.list"))["vms"] if vm["vm_id"] in ours]
    await client.close()

    assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    try:
        client = await checked_client(agent.unix_url)
        after = [vm for vm in (await client.call("VM.list"))["vms"] if vm["vm_id"] in ours]
        assert after == before
        for name, pid in pids.items():
            assert await qemu_pid(name) == pid, f"{name} was restarted"
        states = {vm_id: (await client.call("VM.getInfo", {"vm_id": vm_id}))
                  for vm_id in (running_id, paused_id, external_id)}
        assert states[running_id]["state"] == "running"
        assert states[paused_id]["state"] == "paused"
        assert states[running_id]["owner"] == "virtnode"
        assert states[external_id]["owner"] == "external"
        assert states[running_id]["uptime_seconds"] > 0, "uptime kept in the live metadata"
        await client.call("VM.resume", {"vm_id": paused_id})
    finally:
        assert await agent.stop() == 0


async def test_what_libvirt_did_while_the_agent_was_dead_is_published(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    client = await checked_client(agent.unix_url)
    kept, stopped = vm_name(), vm_name()
    kept_id = await create(client, kept)
    stopped_id = await create(client, stopped)
    await client.call("Events.get", {"since": 0, "wait": 1})  # let the journal catch up
    told = (await client.call("Events.get", {}))["last_seq"]
    await client.close()
    assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL

    # While nobody journals: one VM is stopped, another appears.
    await virt(lambda conn: conn.lookupByName(stopped).destroy())
    external = vm_name()
    external_id = await define_external(external)
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    try:
        client = await checked_client(agent.unix_url)
        answer = await client.call("Events.get", {"since": told, "topics": ["vm.lifecycle"]})
        changes = {e["data"]["vm_id"]: e["data"] for e in answer["events"]}
        # Subscribers that resume from where they were are told what they missed...
        assert changes[stopped_id]["event"] == "resync"
        assert (changes[stopped_id]["previous_state"], changes[stopped_id]["state"]) == (
            "running", "shutoff")
        assert (changes[external_id]["previous_state"], changes[external_id]["state"]) == (
            "unknown", "running")
        assert changes[external_id]["name"] == external
        # ...and of nothing that did not change.
        assert kept_id not in changes
    finally:
        assert await agent.stop() == 0


async def health(agent: AgentProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{agent.http_url}/healthz") as resp:
        return dict(await resp.json())


async def test_mutating_calls_wait_for_recovery(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    first = await start_agent(tmp_path / "first", hypervisor=daemon.QEMU_URI)
    try:
        vm_id = await create(await checked_client(first.unix_url), vm_name())
    finally:
        assert await first.stop() == 0
    sections = {"hypervisor": {**FAST_RECOVERY["hypervisor"], "call_timeout": 1.0}}
    daemon.signal(signal.SIGSTOP)
    try:
        # libvirtd is frozen while the agent starts: it serves, but cannot know the VMs.
        agent = await start_agent(tmp_path / "second", hypervisor=daemon.QEMU_URI,
                                  sections=sections)
        client = await checked_client(agent.unix_url)
        await client.call("Events.subscribe", {"topics": ["hypervisor.connection"]})
        body = await health(agent)
        assert body["recovering"] is True and body["status"] == "degraded"
        await expect_error(client, "VM.pause", {"vm_id": vm_id}, "Unavailable", "recovering")
    finally:
        await daemon.resume()
    try:
        await next_event(client, "hypervisor.connection",
                         lambda data: data["state"] == "connected", timeout=30)
        assert (await client.call("VM.pause", {"vm_id": vm_id}))["state"] == "paused"
        assert (await health(agent))["recovering"] is False
    finally:
        assert await agent.stop() == 0


async def test_libvirtd_restart_keeps_vms_running_and_events_flowing(
    qemu_agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    name = vm_name()
    vm_id = await create(client, name, spec=firmware_spec(name))
    pid = await qemu_pid(name)
    await client.call("Events.subscribe", {"topics": ["hypervisor.connection", "vm.*"]})
    daemon.signal(signal.SIGKILL)
    try:
        await next_event(client, "hypervisor.connection",
                         lambda data: data["state"] == "disconnected")
    finally:
        await daemon.start()
    await next_event(client, "hypervisor.connection", lambda data: data["state"] == "connected")
    assert await qemu_pid(name) == pid, "the guest kept running through libvirtd's restart"
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
    await client.call("VM.pause", {"vm_id": vm_id})
    event = await next_event(client, "vm.lifecycle",
                             lambda data: data["vm_id"] == vm_id and data["event"] == "suspended")
    assert event["state"] == "paused", "lifecycle events resumed on the new connection"

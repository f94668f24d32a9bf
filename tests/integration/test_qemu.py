"""The agent on a real libvirtd (qemu:///system): capabilities, a frozen and a killed libvirtd."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from virtnode.client import Client, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.usefixtures("libvirtd")]

async def health(agent: AgentProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{agent.http_url}/healthz") as resp:
        return resp.status, await resp.json()


async def next_connection_event(client: Client, state: str, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for note in client.notifications():
            data = note["params"]["data"]
            if note["params"]["topic"] == "hypervisor.connection" and data["state"] == state:
                return dict(data)
    raise AssertionError("connection closed before the event")


async def test_capabilities_of_a_kvm_host(qemu_agent: AgentProcess,
                                          checked_client: ClientFactory) -> None:
    client = await checked_client(qemu_agent.unix_url)
    caps = await client.call("Host.getCapabilities")
    assert caps["hypervisor"]["type"] == "QEMU"
    assert caps["hypervisor"]["uri"] == daemon.QEMU_URI
    assert {"kvm", "qemu"} <= set(caps["domain_types"])
    assert caps["cpu"]["arch"] == "x86_64"
    assert caps["cpu"]["vendor"] and caps["cpu"]["model"] and caps["cpu"]["flags"]
    assert caps["memory_bytes"] > 256 * 1024 * 1024
    assert caps["numa_cells"] and caps["numa_cells"][0]["cpus"]
    assert (await client.call("VM.list"))["vms"] is not None


async def test_frozen_libvirtd_gives_deadline_and_the_agent_keeps_answering(
    impatient_agent: AgentProcess, checked_client: ClientFactory
) -> None:
    client = await checked_client(impatient_agent.unix_url)
    await client.call("VM.list")
    daemon.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        stuck = asyncio.create_task(client.call("VM.list"))
        # While a hypervisor call hangs, the agent answers everything else at once.
        for _ in range(5):
            t0 = time.monotonic()
            await client.call("Host.ping")
            assert time.monotonic() - t0 < 0.25
        with pytest.raises(RemoteError) as caught:
            await stuck
        elapsed = time.monotonic() - started
        assert caught.value.name == "DeadlineExceeded" and caught.value.code == 4
        assert 0.9 < elapsed < 3.0, elapsed
    finally:
        await daemon.resume()
    deadline = time.monotonic() + 15
    while True:
        try:
            await client.call("VM.list")
            break
        except RemoteError as exc:
            assert exc.name in ("DeadlineExceeded", "Unavailable")
            assert time.monotonic() < deadline, "VM.list never worked again after SIGCONT"
            await asyncio.sleep(0.2)


async def test_killed_libvirtd_is_survived_and_reconnected(
    qemu_agent: AgentProcess, checked_client: ClientFactory
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["hypervisor.*"]})
    assert (await health(qemu_agent))[0] == 200
    daemon.signal(signal.SIGKILL)
    try:
        lost = await next_connection_event(client, "disconnected", timeout=15)
        assert lost["uri"] == daemon.QEMU_URI
        # The agent keeps serving; hypervisor calls answer Unavailable.
        assert (await client.call("Host.ping"))["time"] > 0
        with pytest.raises(RemoteError) as caught:
            await client.call("VM.list")
        assert caught.value.name == "Unavailable" and caught.value.code == 14
        status, body = await health(qemu_agent)
        assert status == 503 and body["hypervisor"]["state"] == "disconnected"
    finally:
        await daemon.start()
    await next_connection_event(client, "connected", timeout=30)
    assert "vms" in await client.call("VM.list")
    status, body = await health(qemu_agent)
    assert status == 200 and body["status"] == "ok"


async def test_keepalive_notices_a_libvirtd_that_stopped_answering(
    qemu_agent: AgentProcess, checked_client: ClientFactory
) -> None:
    client = await checked_client(qemu_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["hypervisor.connection"]})
    daemon.signal(signal.SIGSTOP)
    try:
        # No call is made: only keepalive (1 s x 2 probes here) can notice.
        lost = await next_connection_event(client, "disconnected", timeout=15)
        assert "keepalive" in lost["reason"], lost
    finally:
        await daemon.resume()
    await next_connection_event(client, "connected", timeout=30)
    assert "vms" in await client.call("VM.list")


async def test_sigterm_drains_a_call_in_flight(impatient_agent: AgentProcess,
                                               checked_client: ClientFactory) -> None:
    qemu_agent = impatient_agent
    client = await checked_client(qemu_agent.unix_url)
    daemon.signal(signal.SIGSTOP)
    try:
        in_flight = asyncio.create_task(client.call("VM.list"))
        # Messages on one socket are taken in order: once the ping is answered, the
        # VM.list call is running inside the agent.
        await client.call("Host.ping")
        stopping = asyncio.create_task(qemu_agent.stop())
        # The call that started before SIGTERM is answered (its deadline passes), not dropped.
        with pytest.raises(RemoteError) as caught:
            await in_flight
        assert caught.value.name == "DeadlineExceeded"
        assert await stopping == 0
    finally:
        await daemon.resume()
    assert "virtnode stopped" in qemu_agent.log
    assert "still running" not in qemu_agent.log, qemu_agent.log

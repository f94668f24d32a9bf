"""A migration whose agents or libvirtd die half way, in the lab (tools/lab kill, start).

The guest dirties memory (tests/guests.py, ``dirty``) at a capped bandwidth, so the
migration is still in its first pass when something is killed; its policy suspends the
guest once the migration stalls twice, so it ends on its own. Afterwards the VM runs on
exactly one host, and both agents say so.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.lab import lab
from tests.integration.migrating import (
    connect,
    create_guest,
    defined,
    phases,
    remove_vm,
    running,
)
from virtnode.client import Client, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

POLICY = {"steps": [{"stalled_iterations": 2, "action": "suspend"}]}


async def start_half_way(client: Client, vm_id: str, destination: str) -> str:
    """Start a migration and return its job id once it is a fifth of the way."""
    started = await client.call("VM.migrate", {
        "vm_id": vm_id, "destination": destination, "max_bandwidth_mibps": 8,
        "policy": POLICY})
    job_id: str = started["job_id"]
    for _ in range(600):
        job = (await client.call("Job.get", {"job_id": job_id}))["job"]
        assert job["state"] in ("pending", "running"), job
        if job["progress"] >= 20:
            return job_id
        await asyncio.sleep(0.1)
    raise AssertionError(f"the migration did not get going: {job}")


async def settled(host: dict[str, Any], job_id: str) -> dict[str, Any]:
    async with await connect(host) as client:
        job: dict[str, Any] = (await client.call("Job.wait", {"job_id": job_id,
                                                              "timeout": 120}))["job"]
        return job


async def state_at(host: dict[str, Any], vm_id: str, timeout: float = 60) -> str | None:
    """The VM's state as the host's agent says (None: it has no such VM), once the agent
    answers (after a restart it may still be connecting to libvirt)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            async with await connect(host) as client:
                return str((await client.call("VM.getInfo", {"vm_id": vm_id}))["state"])
        except RemoteError as exc:
            if exc.name == "NotFound":
                return None
            if asyncio.get_running_loop().time() > deadline:
                raise
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.5)


async def moved(hosts: list[dict[str, Any]], vm_id: str, name: str) -> None:
    """The VM runs on B only, both agents say so, and B has settled its end."""
    a, b = hosts
    assert name in await running("lab-h2")
    assert name not in await defined("lab-h1")
    assert (await state_at(a, vm_id), await state_at(b, vm_id)) == (None, "running")
    async with await connect(b) as on_b:
        for _ in range(50):
            if ("destination", "succeeded") in await phases(on_b, vm_id):
                break
            await asyncio.sleep(0.2)
        assert ("destination", "succeeded") in await phases(on_b, vm_id)


async def cleanup(hosts: list[dict[str, Any]], vm_id: str) -> None:
    for host in hosts:
        async with await connect(host) as client:
            await remove_vm(client, vm_id)


async def test_the_source_agent_killed_half_way_finds_the_vm_moved(
        hosts: list[dict[str, Any]]) -> None:
    a, b = hosts
    async with await connect(a) as on_a:
        vm_id, name = await create_guest(on_a)
        job_id = await start_half_way(on_a, vm_id, b["url"])
    try:
        await asyncio.to_thread(lab, "kill", "lab-h1", "agent")
        await asyncio.to_thread(lab, "start", "lab-h1", "agent")
        # The migration went on in libvirtd; the job, resumed, follows it to its end.
        job = await settled(a, job_id)
        assert job["state"] == "succeeded", job
        assert job["result"]["recovered"] is True
        await moved(hosts, vm_id, name)
    finally:
        await cleanup(hosts, vm_id)


async def test_the_destination_agent_killed_half_way_takes_the_vm_after_its_restart(
        hosts: list[dict[str, Any]]) -> None:
    a, b = hosts
    async with await connect(a) as on_a:
        vm_id, name = await create_guest(on_a)
        try:
            job_id = await start_half_way(on_a, vm_id, b["url"])
            await asyncio.to_thread(lab, "kill", "lab-h2", "agent")
            await asyncio.to_thread(lab, "start", "lab-h2", "agent")
            job = await settled(a, job_id)
            assert job["state"] == "succeeded", job
            # The restarted agent settled the migration it had recorded.
            await moved(hosts, vm_id, name)
        finally:
            await cleanup(hosts, vm_id)


async def test_the_destination_libvirtd_killed_half_way_leaves_the_vm_on_the_source(
        hosts: list[dict[str, Any]]) -> None:
    a, b = hosts
    async with await connect(a) as on_a:
        vm_id, name = await create_guest(on_a)
        try:
            job_id = await start_half_way(on_a, vm_id, b["url"])
            await asyncio.to_thread(lab, "kill", "lab-h2", "libvirtd")
            job = await settled(a, job_id)
            assert job["state"] == "failed", job
            assert await state_at(a, vm_id) == "running"
            await asyncio.to_thread(lab, "start", "lab-h2", "libvirtd")
            # The restarted libvirtd ends the half-made incoming VM it finds.
            for _ in range(100):
                if name not in await defined("lab-h2"):
                    break
                await asyncio.sleep(0.2)
            assert name not in await defined("lab-h2")
            assert name in await running("lab-h1")
            assert (await state_at(a, vm_id), await state_at(b, vm_id)) == ("running", None)
        finally:
            await cleanup(hosts, vm_id)

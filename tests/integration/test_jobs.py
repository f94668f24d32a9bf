"""Jobs through a real agent: VM.shutdown as a job, Job.*, the CLI, restarts and SIGKILL.

On test:///default the driver supports neither ACPI nor guest-agent shutdown, so a
shutdown job ends at once (destroyed, or failed). A job that stays running needs a real
guest that ignores the power button: the ``noacpi`` Linux guest on qemu:///system.
"""

from __future__ import annotations

import asyncio
import io
import signal
import sys
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration import libvirtd as daemon
from tests.integration.conftest import expect_error, next_event, wait_job
from tests.integration.test_vm_guest import linux_vm
from tests.subproc import virtnode
from virtnode.client import Client
from virtnode.client import jobs as jobcli

pytestmark = [pytest.mark.integration]

MISSING = "00000000-0000-4000-8000-000000000000"


async def running_test_vm(client: Client) -> str:
    """The VM test:///default starts with, running."""
    vms = (await client.call("VM.list", {"state": "running"}))["vms"]
    return str(vms[0]["vm_id"])


async def job_states(client: Client, job_id: str, until: str,
                     timeout: float = 10.0) -> list[str]:
    """States from job.state events of ``job_id`` up to ``until`` (subscribe first)."""
    states: list[str] = []
    async with asyncio.timeout(timeout):
        async for note in client.notifications():
            params = note["params"]
            if params.get("topic") == "job.state" and params["data"]["job_id"] == job_id:
                states.append(params["data"]["state"])
                if states[-1] == until:
                    return states
    raise AssertionError(f"connection closed; saw {states}")


async def test_async_shutdown_is_a_job_with_events_and_a_request_key(
    agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["job.*"]})
    vm_id = await running_test_vm(client)
    params = {"vm_id": vm_id, "async": True, "fallback": "destroy", "request_key": "off-1"}
    started = await client.call("VM.shutdown", params)
    job_id = started["job_id"]
    assert started["job"]["kind"] == "VM.shutdown" and started["job"]["target"] == vm_id
    assert started["job"]["cancellable"] is True
    job = await wait_job(client, job_id, timeout=10)
    assert job["state"] == "succeeded", (job, agent.log)
    assert job["result"]["stopped_by"] == "destroy" and job["result"]["tried"] == ["destroy"]
    assert job["progress"] == 100 and job["error"] is None
    assert await job_states(client, job_id, "succeeded") == ["pending", "running", "succeeded"]
    assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "shutoff"

    # A retry after a lost answer gets the same job; the VM, already off, is not touched.
    assert (await client.call("VM.shutdown", params))["job_id"] == job_id
    error = await expect_error(client, "VM.shutdown", {**params, "timeout": 5},
                               "InvalidArgument", "request_key_reused")
    assert error.data["job_id"] == job_id

    assert (await client.call("Job.get", {"job_id": job_id}))["job"] == job
    listed = (await client.call("Job.list", {"state": "succeeded", "kind": "VM.shutdown",
                                             "target": vm_id}))["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]
    assert (await client.call("Job.list", {"state": "running"}))["jobs"] == []
    await expect_error(client, "Job.cancel", {"job_id": job_id}, "FailedPrecondition",
                       "job_finished")


async def test_a_failed_shutdown_job_carries_the_error_the_call_would_give(
    agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(agent.unix_url)
    vm_id = await running_test_vm(client)
    started = await client.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                                "fallback": "none", "timeout": 1})
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "failed" and job["result"] is None
    assert job["error"]["code"] == 4
    assert job["error"]["data"]["name"] == "DeadlineExceeded"
    assert job["error"]["data"]["reason"] == "shutdown_timeout"
    # The synchronous call is unchanged: the same error as an answer, then a result.
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id, "timeout": 1},
                       "DeadlineExceeded", "shutdown_timeout")
    result = await client.call("VM.shutdown", {"vm_id": vm_id, "fallback": "destroy"})
    assert result["stopped_by"] == "destroy"
    assert (await client.call("Job.list"))["jobs"] == [job]


async def test_requests_that_cannot_start_make_no_job(
    agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(agent.unix_url)
    vm_id = await running_test_vm(client)
    await client.call("VM.destroy", {"vm_id": vm_id})
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id, "async": True},
                       "FailedPrecondition", "vm_not_running")
    await expect_error(client, "VM.shutdown", {"vm_id": MISSING, "async": True}, "NotFound")
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id, "request_key": "k"},
                       "InvalidArgument", "request_key_needs_async")
    await expect_error(client, "VM.shutdown", {"vm_id": vm_id, "async": True,
                                               "request_key": "no spaces"}, "InvalidParams")
    assert (await client.call("Job.list"))["jobs"] == []
    for method in ("Job.get", "Job.wait", "Job.cancel"):
        await expect_error(client, method, {"job_id": MISSING}, "NotFound")
    await expect_error(client, "Job.wait", {"job_id": MISSING, "timeout": 301},
                       "InvalidParams")


async def test_the_cli_watches_lists_and_reports_the_outcome(
    agent: AgentProcess, checked_client: ClientFactory,
) -> None:
    client = await checked_client(agent.unix_url)
    vm_id = await running_test_vm(client)
    failed = (await client.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                                "timeout": 1}))["job_id"]
    done = (await client.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                              "fallback": "destroy"}))["job_id"]
    url = ("--url", agent.unix_url)
    ok = await virtnode("job", "watch", done, *url)
    assert ok.status == 0, ok.err
    assert f"job {done} succeeded 100%" in ok.out and '"stopped_by": "destroy"' in ok.out
    bad = await virtnode("job", "watch", failed, *url)
    assert bad.status == 1 and "DeadlineExceeded" in bad.err
    listing = await virtnode("job", "list", "--state", "failed", *url)
    assert listing.status == 0 and failed in listing.out and done not in listing.out
    cancel = await virtnode("job", "cancel", done, *url)
    assert cancel.status == 1 and "job_finished" in cancel.err
    assert (await virtnode("job", "watch", MISSING, *url)).status == 1
    drawn = io.StringIO()
    assert (await jobcli.watch(client, done, drawn, tty=True))["state"] == "succeeded"
    assert drawn.getvalue().startswith("\r[" + "#" * jobcli.BAR_WIDTH + "] 100%  succeeded")
    assert drawn.getvalue().endswith("\x1b[K\n")


async def test_jobs_outlive_an_agent_restart(tmp_path: Path,
                                             checked_client: ClientFactory) -> None:
    agent = await start_agent(tmp_path)
    client = await checked_client(agent.unix_url)
    vm_id = await running_test_vm(client)
    job_id = (await client.call("VM.shutdown", {"vm_id": vm_id, "async": True,
                                                "fallback": "destroy"}))["job_id"]
    job = await wait_job(client, job_id)
    await client.close()
    assert await agent.stop() == 0
    agent = await start_agent(tmp_path)
    try:
        client = await checked_client(agent.unix_url)
        assert (await client.call("Job.get", {"job_id": job_id}))["job"] == job
    finally:
        await agent.stop()


# -- a job that stays running: a real guest that ignores the power button ---------------------


async def held_shutdown(client: Client, vm_id: str, timeout: float) -> str:
    """Start a shutdown the guest ignores, with no fallback; returns the running job's id."""
    started = await client.call("VM.shutdown", {
        "vm_id": vm_id, "async": True, "methods": ["acpi"], "fallback": "none",
        "timeout": timeout})
    job_id = str(started["job_id"])
    job = await wait_job(client, job_id, timeout=0.5)
    assert job["state"] == "running", job
    return job_id


@pytest.mark.qemu
@pytest.mark.usefixtures("libvirtd", "cleanup_vms")
async def test_a_running_job_holds_the_vm_and_cancel_stops_waiting(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI,
                              sections={"vm": {"lock_wait": 1.0}})
    try:
        client = await checked_client(agent.unix_url)
        vm_id, _ = await linux_vm(client, "noacpi")
        await client.call("Events.subscribe", {"topics": ["job.progress"]})
        job_id = await held_shutdown(client, vm_id, timeout=30)
        operation = (await client.call("VM.getInfo", {"vm_id": vm_id}))["operation"]
        assert operation["method"] == "VM.shutdown"
        await expect_error(client, "VM.reboot", {"vm_id": vm_id}, "Aborted", "vm_busy")
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "virtnode", "job", "watch", job_id, "--url", agent.unix_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(10):  # about 3 % a second of a 30 s timeout
            progress = await next_event(client, "job.progress", lambda d: d["job_id"] == job_id)
            assert 0 < progress["progress"] < 100
            assert watcher.stdout is not None
            first = (await watcher.stdout.readline()).decode()
        assert first.startswith(f"job {job_id} running"), first

        job = (await client.call("Job.cancel", {"job_id": job_id}))["job"]
        assert job["state"] == "cancelled" and job["error"]["data"]["name"] == "Cancelled"
        async with asyncio.timeout(10):
            out, err = await watcher.communicate()
        assert watcher.returncode == 1 and b"cancelled" in err
        assert out.decode().splitlines()[-1].startswith(f"job {job_id} cancelled")
        info = await client.call("VM.getInfo", {"vm_id": vm_id})
        assert info["state"] == "running" and info["operation"] is None
    finally:
        await agent.stop()


@pytest.mark.qemu
@pytest.mark.usefixtures("libvirtd", "cleanup_vms")
async def test_a_job_running_when_the_agent_is_killed_is_interrupted(
    tmp_path: Path, checked_client: ClientFactory,
) -> None:
    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    client = await checked_client(agent.unix_url)
    vm_id, _ = await linux_vm(client, "noacpi")
    job_id = await held_shutdown(client, vm_id, timeout=600)
    await client.close()
    assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL

    agent = await start_agent(tmp_path, hypervisor=daemon.QEMU_URI)
    try:
        client = await checked_client(agent.unix_url)
        job = (await client.call("Job.get", {"job_id": job_id}))["job"]
        assert job["state"] == "failed" and job["finished"] is not None
        assert job["error"]["data"]["reason"] == "interrupted"
        assert (await client.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
        # The VM is free again: a new shutdown starts at once.
        assert (await client.call("Job.list", {"state": "running"}))["jobs"] == []
        assert "was running when the agent stopped" in agent.log
    finally:
        await agent.stop()

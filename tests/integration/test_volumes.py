"""Volumes through a real agent on test:///default: shapes, errors, chains, copy and merge
jobs with real data, cancel, a SIGKILL during a copy, and a full filesystem."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory
from tests.integration.conftest import (
    LoopFsFactory,
    expect_error,
    next_event,
    qemu_io,
    wait_job,
)
from tests.subproc import run
from virtnode.client import Client, RemoteError

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


async def new_domain(client: Client, path: Path, name: str = "vols") -> str:
    created = await client.call("StorageDomain.create",
                                {"type": "localfs", "name": name, "path": str(path)})
    return str(created["domain"]["sd_id"])


async def test_create_snapshot_clone_list_info_delete(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["storage.volume"]})
    sd_id = await new_domain(client, tmp_path / "sd")
    base = (await client.call("Volume.create", {"sd_id": sd_id, "size": 16 * MiB,
                                                "format": "raw"}))["volume"]
    assert (base["role"], base["legality"], base["parent"]) == ("leaf", "legal", None)
    assert (await asyncio.to_thread(os.stat, base["path"])).st_size == 16 * MiB
    await next_event(client, "storage.volume", lambda d: d["event"] == "created")
    ref = {k: base[k] for k in ("sd_id", "image_id", "volume_id")}

    snap = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": base["image_id"], "volume_id": base["volume_id"]}}))["volume"]
    assert snap["image_id"] == base["image_id"] and snap["parent"] == base["volume_id"]
    assert snap["virtual_size"] == 16 * MiB
    info = (await client.call("Volume.getInfo", ref))["volume"]
    assert info["role"] == "internal" and info["generation"] == 2
    top = (await client.call("Volume.getInfo", {**ref, "volume_id": snap["volume_id"]}))
    chain = top["volume"]["chain"]
    assert [c["volume_id"] for c in chain] == [snap["volume_id"], base["volume_id"]]
    assert top["volume"]["qemu_virtual_size"] == 16 * MiB

    # A layer over an internal volume, or a clone of a non-template, is refused.
    err = await expect_error(client, "Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": base["image_id"], "volume_id": base["volume_id"]}})
    assert err.data["reason"] == "not_leaf"
    err = await expect_error(client, "Volume.create", {
        "sd_id": sd_id, "image_id": str(uuid.uuid4()),
        "parent": {"image_id": snap["image_id"], "volume_id": snap["volume_id"]}})
    assert err.data["reason"] == "not_shared"
    err = await expect_error(client, "Volume.delete", ref)
    assert (err.name, err.data["reason"]) == ("FailedPrecondition", "has_children")

    template = (await client.call("Volume.create", {"sd_id": sd_id, "size": 8 * MiB,
                                                    "format": "qcow2", "shared": True}))["volume"]
    clones = [(await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": template["image_id"], "volume_id": template["volume_id"]}}))["volume"]
        for _ in range(2)]
    assert len({c["image_id"] for c in clones} | {template["image_id"]}) == 3
    tref = {k: template[k] for k in ("sd_id", "image_id", "volume_id")}
    assert (await client.call("Volume.getInfo", tref))["volume"]["role"] == "shared"
    info = (await client.call("Volume.getInfo", {k: clones[0][k] for k in tref}))["volume"]
    assert [c["volume_id"] for c in info["chain"]] == [clones[0]["volume_id"],
                                                       template["volume_id"]]

    listed = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert len(listed) == 5
    one = (await client.call("Volume.list", {"sd_id": sd_id, "image_id": base["image_id"]}))
    assert {v["volume_id"] for v in one["volumes"]} == {base["volume_id"], snap["volume_id"]}

    resized = await client.call("Volume.resize", {**ref, "volume_id": snap["volume_id"],
                                                  "size": 32 * MiB})
    assert resized["volume"]["virtual_size"] == 32 * MiB
    err = await expect_error(client, "Volume.resize", {**ref, "volume_id": snap["volume_id"],
                                                       "size": MiB})
    assert err.data["reason"] == "shrink_refused"

    await client.call("Volume.delete", {**ref, "volume_id": snap["volume_id"]})
    assert (await client.call("Volume.getInfo", ref))["volume"]["role"] == "leaf"
    await client.call("Volume.delete", ref)
    assert not await asyncio.to_thread(os.path.exists, os.path.dirname(base["path"]))
    gone = await expect_error(client, "Volume.getInfo", ref)
    assert (gone.name, gone.data["reason"]) == ("NotFound", "no_volume")


@pytest.mark.parametrize("bad", ["../x", "a/b", "{12345678-1234-1234-1234-123456789abc}",
                                 "12345678123412341234123456789abc"])
async def test_traversal_ids_are_refused(agent: AgentProcess, checked_client: ClientFactory,
                                         tmp_path: Path, bad: str) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    good = str(uuid.uuid4())
    for params in ({"sd_id": sd_id, "image_id": bad, "volume_id": good},
                   {"sd_id": sd_id, "image_id": good, "volume_id": bad}):
        err = await expect_error(client, "Volume.getInfo", params)
        assert err.name == "InvalidParams"
        err = await expect_error(client, "Volume.delete", params)
        assert err.name == "InvalidParams"
    err = await expect_error(client, "Volume.create", {"sd_id": sd_id, "image_id": bad, "size": 1})
    assert err.name == "InvalidParams"
    assert sorted(os.listdir(tmp_path / "sd" / sd_id / "images")) == []


@pytest.mark.parametrize(
    ("description", "name", "reason"),
    [
        # A lone surrogate has no UTF-8 form: once stored, no listing could be sent.
        ("x\udfff", "ParseError", "bad_unicode"),
        ("x\u0000y", "InvalidParams", "control_character"),
    ],
    ids=["surrogate", "nul"],
)
async def test_description_that_cannot_be_stored_is_refused(
        *, agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path,
        description: str, name: str, reason: str) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    async with asyncio.timeout(30):
        for method, params in (
                ("Volume.create", {"sd_id": sd_id, "size": MiB, "description": description}),
                ("Volume.copy", {"src": {"sd_id": sd_id, "image_id": str(uuid.uuid4()),
                                         "volume_id": str(uuid.uuid4())},
                                 "dst_sd": sd_id, "description": description})):
            await expect_error(client, method, params, name, reason)
        assert sorted(os.listdir(tmp_path / "sd" / sd_id / "images")) == []
        assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []


async def test_copy_and_merge_keep_the_data(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["job.*"]})
    sd_a = await new_domain(client, tmp_path / "sd-a", "a")
    sd_b = await new_domain(client, tmp_path / "sd-b", "b")
    base = (await client.call("Volume.create", {"sd_id": sd_a, "size": 64 * MiB,
                                                "format": "raw"}))["volume"]
    await qemu_io(base["path"], "raw", "write -P 0x11 0 32M")
    top = (await client.call("Volume.create", {"sd_id": sd_a, "parent": {
        "image_id": base["image_id"], "volume_id": base["volume_id"]}}))["volume"]
    await qemu_io(top["path"], "qcow2", "write -P 0x22 16M 16M")
    ref = {k: top[k] for k in ("sd_id", "image_id", "volume_id")}

    err = await expect_error(client, "Volume.copy", {"src": ref, "dst_sd": sd_b, "collapse": False})
    assert (err.name, err.data["reason"]) == ("InvalidArgument", "has_parent")

    started = await client.call("Volume.copy", {"src": ref, "dst_sd": sd_b,
                                                "dst_format": "qcow2", "request_key": "copy-1"})
    again = await client.call("Volume.copy", {"src": ref, "dst_sd": sd_b,
                                              "dst_format": "qcow2", "request_key": "copy-1"})
    assert again["job_id"] == started["job_id"]
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 100
    copy = job["result"]["volume"]
    assert (copy["sd_id"], copy["format"], copy["parent"]) == (sd_b, "qcow2", None)
    await qemu_io(copy["path"], "qcow2", "read -P 0x11 0 16M")
    await qemu_io(copy["path"], "qcow2", "read -P 0x22 16M 16M")
    await qemu_io(copy["path"], "qcow2", "read -P 0 32M 32M")

    merged = await client.call("Volume.merge", ref)
    job = await wait_job(client, merged["job_id"])
    assert job["state"] == "succeeded", job
    parent = job["result"]["volume"]
    assert (parent["volume_id"], parent["role"], parent["legality"]) == (
        base["volume_id"], "leaf", "legal")
    assert not await asyncio.to_thread(os.path.exists, top["path"])
    await qemu_io(base["path"], "raw", "read -P 0x11 0 16M")
    await qemu_io(base["path"], "raw", "read -P 0x22 16M 16M")
    err = await expect_error(client, "Volume.merge", {**ref, "volume_id": base["volume_id"]})
    assert err.data["reason"] == "no_parent"


async def big_volume(client: Client, sd_id: str, size: int) -> dict[str, Any]:
    """A raw volume filled with real (non-zero, incompressible enough) data."""
    volume: dict[str, Any] = (await client.call(
        "Volume.create", {"sd_id": sd_id, "size": size, "format": "raw"}))["volume"]
    await run("dd", "if=/dev/urandom", f"of={volume['path']}", "bs=4M",
              f"count={size // (4 * MiB)}", "conv=notrunc", "status=none", timeout=300)
    return volume


async def test_cancel_removes_the_target(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["job.*"]})
    sd_id = await new_domain(client, tmp_path / "sd")
    src = await big_volume(client, sd_id, 512 * MiB)
    ref = {k: src[k] for k in ("sd_id", "image_id", "volume_id")}
    started = await client.call("Volume.copy", {"src": ref, "dst_sd": sd_id,
                                                "dst_format": "qcow2"})
    # Freeze qemu-img as soon as it runs: a copy this size may otherwise be done before
    # the delete below arrives.
    frozen = await freeze_children(agent.pid)
    try:
        held = await expect_error(client, "Volume.delete", ref)
        assert held.data["reason"] == "volume_busy"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    cancelled = (await client.call("Job.cancel", {"job_id": started["job_id"]}))["job"]
    assert cancelled["state"] == "cancelled"
    images = sorted(os.listdir(tmp_path / "sd" / sd_id / "images"))
    assert images == [src["image_id"]]
    assert len((await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]) == 1


@pytest.fixture
async def disk_root() -> AsyncIterator[Path]:
    """A domain directory on disk (not tmpfs, so the copies take real I/O), removed after."""
    root = Path("/var/tmp") / f"vn-it-vol-{uuid.uuid4().hex[:8]}"
    yield root
    await asyncio.to_thread(shutil.rmtree, root, True)


async def freeze_children(pid: int) -> list[int]:
    """SIGSTOP the processes ``pid`` starts (its qemu-img) as soon as there are any."""
    async with asyncio.timeout(30):
        while True:
            children = await children_of(pid)
            if children:
                break
            await asyncio.sleep(0.005)
    for child in children:
        os.kill(child, signal.SIGSTOP)
    return children


async def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (its qemu-img)."""
    return [int(child) for child in (await run("pgrep", "-P", str(pid))).out.split()]


async def crash_and_restart(agent: AgentProcess, tmp_path: Path, checked_client: ClientFactory,
                            children: list[int]) -> tuple[AgentProcess, Client]:
    """SIGKILL the agent, check its qemu-img died with it, start it again on its state."""
    os.kill(agent.pid, signal.SIGKILL)
    await agent.stop()
    # qemu-img dies with the agent (its death signal), not left writing on its own.
    assert await asyncio.to_thread(all_gone, children, 10.0), "qemu-img outlived the agent"
    agent = await start_agent(tmp_path / "a")
    return agent, await checked_client(agent.unix_url)


async def test_sigkill_during_copy_then_restart_removes_the_half_made_target(
        tmp_path: Path, checked_client: ClientFactory, disk_root: Path) -> None:
    agent = await start_agent(tmp_path / "a")
    try:
        client = await checked_client(agent.unix_url)
        await client.call("Events.subscribe", {"topics": ["job.*"]})
        sd_id = await new_domain(client, disk_root)
        src = await big_volume(client, sd_id, 768 * MiB)
        ref = {k: src[k] for k in ("sd_id", "image_id", "volume_id")}
        started = await client.call("Volume.copy", {"src": ref, "dst_sd": sd_id,
                                                    "dst_format": "raw"})
        await next_event(client, "job.progress", lambda d: d["job_id"] == started["job_id"]
                         and 0 < d["progress"] < 100, timeout=60)
        images = disk_root / sd_id / "images"
        assert len(os.listdir(images)) == 2  # the target is there, illegal
        await client.close()
        children = await children_of(agent.pid)
        assert children, "no qemu-img was running"
        agent, client = await crash_and_restart(agent, tmp_path, checked_client, children)
        assert sorted(os.listdir(images)) == [src["image_id"]]
        volumes = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
        assert [v["volume_id"] for v in volumes] == [src["volume_id"]]
        job = (await client.call("Job.get", {"job_id": started["job_id"]}))["job"]
        assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "interrupted")
        assert "was left illegal" in agent.log
    finally:
        await agent.stop()


async def test_sigkill_during_merge_then_restart_keeps_the_chain_and_merge_finishes(
        tmp_path: Path, checked_client: ClientFactory, disk_root: Path) -> None:
    agent = await start_agent(tmp_path / "a")
    try:
        client = await checked_client(agent.unix_url)
        await client.call("Events.subscribe", {"topics": ["job.*"]})
        sd_id = await new_domain(client, disk_root)
        base = (await client.call("Volume.create", {"sd_id": sd_id, "size": 768 * MiB,
                                                    "format": "raw"}))["volume"]
        await qemu_io(base["path"], "raw", "write -P 0x11 0 768M")
        top = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
            "image_id": base["image_id"], "volume_id": base["volume_id"]}}))["volume"]
        await qemu_io(top["path"], "qcow2", "write -P 0x22 0 768M")
        ref = {k: top[k] for k in ("sd_id", "image_id", "volume_id")}
        started = await client.call("Volume.merge", ref)
        # Freeze qemu-img as soon as it runs, so that the crash surely comes before the
        # commit ends (it takes about a second here).
        children = await freeze_children(agent.pid)
        job = (await client.call("Job.get", {"job_id": started["job_id"]}))["job"]
        assert job["state"] == "running"
        await client.close()
        agent, client = await crash_and_restart(agent, tmp_path, checked_client, children)
        # The chain is kept, illegal (the parent is half written), and says so.
        volumes = {v["volume_id"]: v for v in
                   (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]}
        assert set(volumes) == {base["volume_id"], top["volume_id"]}
        assert {v["legality"] for v in volumes.values()} == {"illegal"}
        assert "part of an interrupted merge" in agent.log
        job = (await client.call("Job.get", {"job_id": started["job_id"]}))["job"]
        assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "interrupted")
        # A VM cannot use it, and its data cannot be copied out while it is so.
        err = await expect_error(client, "Volume.copy", {"src": ref, "dst_sd": sd_id})
        assert err.data["reason"] == "volume_illegal"

        # Running the merge again finishes it, with every byte of the top in the base.
        again = await client.call("Volume.merge", ref)
        job = await wait_job(client, again["job_id"], timeout=300)
        assert job["state"] == "succeeded", job
        merged = job["result"]["volume"]
        assert (merged["volume_id"], merged["role"], merged["legality"]) == (
            base["volume_id"], "leaf", "legal")
        assert not await asyncio.to_thread(os.path.exists, top["path"])
        await qemu_io(base["path"], "raw", "read -P 0x22 0 768M")
    finally:
        await agent.stop()


def all_gone(pids: list[int], timeout: float) -> bool:
    """Whether every process in ``pids`` exits within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def test_no_space_leaves_nothing_behind(
        tmp_path: Path, loop_fs: LoopFsFactory, checked_client: ClientFactory) -> None:
    tiny_posix = await loop_fs(32 * MiB)
    agent = await start_agent(tmp_path / "a")
    try:
        client = await checked_client(agent.unix_url)
        created = await client.call("StorageDomain.create", {
            "type": "posixfs", "name": "tiny",
            "mount": {"source": tiny_posix, "vfs_type": "ext4"}})
        sd_id = created["domain"]["sd_id"]
        images = Path(created["domain"]["path"]) / "images"
        err = await expect_error(client, "Volume.create", {
            "sd_id": sd_id, "size": 256 * MiB, "format": "raw", "allocation": "preallocated"})
        assert (err.name, err.data["reason"]) == ("ResourceExhausted", "no_space")
        assert os.listdir(images) == []
        # A sparse source that fits, filled so that a preallocated copy cannot.
        src = (await client.call("Volume.create", {"sd_id": sd_id, "size": 24 * MiB,
                                                   "format": "raw"}))["volume"]
        await qemu_io(src["path"], "raw", "write -P 0x33 0 20M")
        ref = {k: src[k] for k in ("sd_id", "image_id", "volume_id")}
        err = await expect_error(client, "Volume.copy", {"src": ref, "dst_sd": sd_id,
                                                         "dst_format": "raw"})
        assert (err.name, err.data["reason"]) == ("ResourceExhausted", "no_space")
        assert os.listdir(images) == [src["image_id"]]
        await client.call("Volume.delete", ref)
        await client.call("StorageDomain.delete", {"sd_id": sd_id})
    finally:
        await agent.stop()


async def test_vm_create_with_a_volume_disk_writes_the_chain(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    template = (await client.call("Volume.create", {"sd_id": sd_id, "size": 8 * MiB,
                                                    "format": "raw", "shared": True}))["volume"]
    clone = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": template["image_id"], "volume_id": template["volume_id"]}}))["volume"]
    ref = {k: clone[k] for k in ("sd_id", "image_id", "volume_id")}
    tref = {k: template[k] for k in ref}
    err = await expect_error(client, "VM.create", {"spec": {
        "name": "vn-it-vol-t", "domain_type": "test", "disks": [{"volume": tref}]}})
    assert err.data["reason"] == "not_leaf"
    created = await client.call("VM.create", {"spec": {
        "name": "vn-it-vol-a", "domain_type": "test", "disks": [{"volume": ref}]},
        "start": False})
    xml = (await client.call("VM.getXML", {"vm_id": created["vm_id"],
                                           "inactive": True}))["xml"]
    assert f"file='{clone['path']}'" in xml or f'file="{clone["path"]}"' in xml
    assert template["path"] in xml and "<backingStore" in xml
    await client.call("VM.undefine", {"vm_id": created["vm_id"]})


async def answers(client: Client, method: str, params: dict[str, Any]) -> Any:
    """The call's result, or the RemoteError it answered."""
    try:
        return await client.call(method, params)
    except RemoteError as exc:
        return exc


async def test_deleting_a_domain_waits_for_its_volume_calls_and_jobs(
        agent: AgentProcess, checked_client: ClientFactory, disk_root: Path) -> None:
    client = await checked_client(agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["job.*"]})
    sd_id = await new_domain(client, disk_root)
    src = await big_volume(client, sd_id, 1024 * MiB)
    ref = {k: src[k] for k in ("sd_id", "image_id", "volume_id")}
    job_id = (await client.call("Volume.copy", {"src": ref, "dst_sd": sd_id,
                                                "dst_format": "qcow2"}))["job_id"]
    # As it starts: copying a GiB takes far longer than the delete that follows.
    await next_event(client, "job.state", lambda d: d["job_id"] == job_id
                     and d["state"] == "running", timeout=60)
    busy = await expect_error(client, "StorageDomain.delete", {"sd_id": sd_id})
    assert (busy.name, busy.data["reason"]) == ("FailedPrecondition", "domain_busy")
    assert busy.data["jobs"] == [job_id]
    assert (await client.call("Job.get", {"job_id": job_id}))["job"]["state"] == "running"

    create = {"sd_id": sd_id, "size": 16 * MiB, "format": "qcow2"}
    calls = [answers(client, "Volume.create", create) for _ in range(3)]
    calls.insert(1, answers(client, "StorageDomain.delete", {"sd_id": sd_id, "force": True}))
    outcomes = await asyncio.gather(*calls)
    deleted = outcomes.pop(1)
    assert deleted == {}, deleted
    # The delete answered only once the copy had ended: cancelled by it, or finished before.
    job = (await client.call("Job.get", {"job_id": job_id}))["job"]
    assert job["state"] in ("cancelled", "succeeded"), job
    for outcome in outcomes:  # made before the delete, or refused as for a missing domain
        if isinstance(outcome, RemoteError):
            assert outcome.code != -32603, outcome
            assert (outcome.name, outcome.data["object"]) == ("NotFound", "storage_domain")
        else:
            assert outcome["volume"]["sd_id"] == sd_id
    late = await expect_error(client, "Volume.create", create)
    assert (late.name, late.data["object"]) == ("NotFound", "storage_domain")
    assert not (disk_root / sd_id).exists()

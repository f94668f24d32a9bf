"""VM.migrate between agents of the lab (tools/lab): real libvirtds, real KVM guests
(firmware only) and TCG Linux guests (tests/guests.py).

Each test leaves the lab as it found it: no VM on any host.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.integration.lab import on_host
from tests.integration.migrating import (
    actions,
    connect,
    create_guest,
    create_vm,
    defined,
    disk_paths,
    drop_volumes,
    holds_data,
    left_alone,
    migrate,
    phases,
    ref,
    remove_vm,
    running,
    runs_only_on,
    state_on,
    volume_with_data,
    volumes_in,
)
from virtnode.client import RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.qemu]
LAB_HOSTS = 3


async def test_a_running_vm_moves_live_and_back(hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        vm_id, name = await create_vm(on_a)
        try:
            job = await migrate(on_a, vm_id, b["url"])
            assert job["state"] == "succeeded", job
            assert job["result"]["destination_host_uuid"] != job["result"]["vm_id"]
            assert name in await running("lab-h2")
            assert name not in await defined("lab-h1"), "the source keeps no definition"
            assert name in await defined("lab-h2"), "a persistent VM stays persistent"
            info = await on_b.call("VM.getInfo", {"vm_id": vm_id})
            assert (info["state"], info["persistent"]) == ("running", True)
            assert await phases(on_a, vm_id) == [("source", "succeeded")]
            assert await phases(on_b, vm_id) == [("destination", "preparing"),
                                                 ("destination", "succeeded")]

            back = await migrate(on_b, vm_id, a["url"])
            assert back["state"] == "succeeded", back
            assert name in await running("lab-h1")
            assert name not in await defined("lab-h2")
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)


async def test_refusals_leave_both_hosts_unchanged(hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    # A bridge that only the source has.
    made = await asyncio.to_thread(on_host, "lab-h1", "ip", "link", "add", "onlyhere0",
                                   "type", "bridge")
    assert made.returncode == 0, made.stderr
    async with await connect(a) as on_a:
        vm_id, name = await create_vm(
            on_a, nics=[{"bridge": "onlyhere0", "model": "virtio"}])
        try:
            cases = [
                (b["url"], "network_missing"),
                ("tls://10.77.0.19:8765", "destination_unreachable"),
                (a["url"], "destination_is_source"),
            ]
            for destination, reason in cases:
                with pytest.raises(RemoteError) as caught:
                    await on_a.call("VM.migrate", {"vm_id": vm_id,
                                                   "destination": destination})
                assert (caught.value.name, caught.value.data.get("reason")) == (
                    "FailedPrecondition", reason), caught.value.error
                await left_alone(on_a, vm_id, name)
        finally:
            await remove_vm(on_a, vm_id)
            await asyncio.to_thread(on_host, "lab-h1", "ip", "link", "del", "onlyhere0")


async def test_a_migration_cancelled_half_way_leaves_the_vm_running_on_the_source(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        # A Linux guest, its memory real data: its first pass takes tens of seconds at
        # 1 MiB/s, so "half way" is a measurable point (a firmware-only guest's zero
        # pages go by in a second or two, past any poll under load).
        vm_id, name = await create_guest(on_a, "noacpi", memory_mib=128)
        try:
            started = await on_a.call("VM.migrate", {
                "vm_id": vm_id, "destination": b["url"], "max_bandwidth_mibps": 1})
            job_id = started["job_id"]
            for _ in range(1200):
                job = (await on_a.call("Job.get", {"job_id": job_id}))["job"]
                if job["progress"] >= 40 or job["state"] not in ("pending", "running"):
                    break
                await asyncio.sleep(0.1)
            assert job["state"] == "running" and 40 <= job["progress"] < 80, job
            cancelled = (await on_a.call("Job.cancel", {"job_id": job_id}))["job"]
            assert cancelled["state"] == "cancelled", cancelled
            assert name in await running("lab-h1")
            await runs_only_on("lab-h1", name, "lab-h2")
            assert (await on_a.call("VM.getInfo", {"vm_id": vm_id}))["state"] == "running"
            assert ("destination", "cancelled") in await phases(on_b, vm_id)
        finally:
            await remove_vm(on_a, vm_id)


async def test_a_migration_that_does_not_converge_is_aborted_by_its_policy(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        vm_id, name = await create_guest(on_a)
        try:
            job = await migrate(on_a, vm_id, b["url"], max_bandwidth_mibps=8, policy={
                "initial_downtime_ms": 50, "steps": [
                    {"stalled_iterations": 1, "action": "downtime", "downtime_ms": 100},
                    {"stalled_iterations": 2, "action": "abort"}]})
            assert job["state"] == "failed", job
            assert (job["error"]["data"]["name"], job["error"]["data"]["reason"]) == (
                "Aborted", "not_converging"), job["error"]
            assert job["error"]["data"]["max_downtime_ms"] == 100
            assert await actions(on_a, vm_id) == ["downtime", "abort"]
            await runs_only_on("lab-h1", name, "lab-h2")
            assert ("destination", "failed") in await phases(on_b, vm_id)
        finally:
            await remove_vm(on_a, vm_id)


async def test_post_copy_ends_a_migration_that_does_not_converge(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        vm_id, name = await create_guest(on_a)
        try:
            job = await migrate(on_a, vm_id, b["url"], max_bandwidth_mibps=8,
                                policy="post_copy")
            assert job["state"] == "succeeded", job
            assert job["result"]["post_copy"] is True
            assert job["result"]["policy"] == "post_copy"
            assert await actions(on_a, vm_id) == ["downtime", "downtime", "post_copy"]
            await runs_only_on("lab-h2", name, "lab-h1")
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)


async def test_suspending_the_workload_ends_a_migration_with_a_measured_downtime(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        vm_id, name = await create_guest(on_a)
        try:
            job = await migrate(on_a, vm_id, b["url"], max_bandwidth_mibps=8, policy={
                "steps": [{"stalled_iterations": 1, "action": "suspend"}]})
            assert job["state"] == "succeeded", job
            # Paused for what remained at 8 MiB/s: well over the 100 ms allowed.
            assert job["result"]["downtime_ms"] > 100, job["result"]
            assert await actions(on_a, vm_id) == ["suspend"]
            await runs_only_on("lab-h2", name, "lab-h1")
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)


async def test_a_migration_past_its_timeout_is_aborted(hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        vm_id, name = await create_vm(on_a, memory_mib=2048)
        try:
            job = await migrate(on_a, vm_id, b["url"], max_bandwidth_mibps=1, timeout=3)
            assert job["state"] == "failed", job
            assert (job["error"]["data"]["name"], job["error"]["data"]["reason"]) == (
                "DeadlineExceeded", "migration_timeout"), job["error"]
            await runs_only_on("lab-h1", name, "lab-h2")
            assert ("destination", "failed") in await phases(on_b, vm_id)
        finally:
            await remove_vm(on_a, vm_id)


async def test_progress_follows_libvirts_figures(hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        # Real data in its memory: a pass of seconds at 4 MiB/s, long enough to look.
        vm_id, name = await create_guest(on_a, "noacpi", memory_mib=128)
        try:
            started = await on_a.call("VM.migrate", {
                "vm_id": vm_id, "destination": b["url"], "max_bandwidth_mibps": 4})
            seen = []
            shown: dict[str, Any] = {}
            while True:
                job = (await on_a.call("Job.get", {"job_id": started["job_id"]}))["job"]
                seen.append(job["progress"])
                if job["state"] not in ("pending", "running"):
                    break
                if 0 < job["progress"] < 100 and not shown:
                    with pytest.raises(RemoteError) as again:
                        await on_a.call("VM.migrate", {"vm_id": vm_id,
                                                       "destination": b["url"]})
                    assert again.value.data["reason"] == "vm_migrating"
                    # Both agents show the VM migrating; B has it paused, coming in.
                    shown["a"] = await on_a.call("VM.getInfo", {"vm_id": vm_id})
                    shown["b"] = await on_b.call("VM.getInfo", {"vm_id": vm_id})
                    shown["b_list"] = (await on_b.call("VM.list", {}))["vms"]
                await asyncio.sleep(0.1)
            assert job["state"] == "succeeded", job
            assert [p for p in seen if 0 < p < 100], seen
            out, into = shown["a"]["migration"], shown["b"]["migration"]
            assert (out["role"], into["role"]) == ("source", "destination")
            assert out["migration_id"] == into["migration_id"]
            assert out["peer"] != into["peer"], "each names the other host"
            assert shown["b"]["state"] == "paused"
            assert [v["migration"]["role"] for v in shown["b_list"]
                    if v["vm_id"] == vm_id] == ["destination"]
            assert "migration" not in await on_b.call("VM.getInfo", {"vm_id": vm_id})
            on_b_events = (await on_b.call("Events.get", {"topics": ["vm.migration"],
                                                          "since": 0}))["events"]
            assert [e["data"]["phase"] for e in on_b_events
                    if e["data"]["vm_id"] == vm_id] == ["preparing", "migrating",
                                                        "succeeded"]
            events = (await on_a.call("Events.get", {"topics": ["vm.migration"],
                                                      "since": 0}))["events"]
            figures = [e["data"] for e in events if e["data"]["vm_id"] == vm_id
                       and e["data"].get("data_total_bytes")]
            assert figures, "no reading of libvirt's figures"
            assert figures[0]["data_total_bytes"] >= 128 * 1024 * 1024
            assert name in await running("lab-h2")
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)


async def test_a_stopped_vm_moves_offline(hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        name = f"mig-{uuid.uuid4().hex[:8]}"
        disk = (await on_a.call("Volume.create", {"sd_id": a["sd_id"], "format": "qcow2",
                                                  "size": 64 << 20}))["volume"]
        created = await on_a.call("VM.create", {"spec": {
            "name": name, "memory_mib": 64, "domain_type": "kvm", "machine": "pc",
            "disks": [{"volume": {k: disk[k] for k in ("sd_id", "image_id", "volume_id")}}]},
            "start": False})
        vm_id = created["vm_id"]
        try:
            job = await migrate(on_a, vm_id, b["url"], mode="offline")
            assert job["state"] == "succeeded", job
            assert name in await defined("lab-h2")
            assert name not in await running("lab-h2"), "it stays stopped"
            assert name not in await defined("lab-h1")
            assert (await on_b.call("VM.getInfo", {"vm_id": vm_id}))["persistent"] is True
            await on_b.call("VM.start", {"vm_id": vm_id})
            assert name in await running("lab-h2")
            # Its disk, where B mounts the shared domain.
            there = (await on_b.call("Volume.getInfo", {
                k: disk[k] for k in ("sd_id", "image_id", "volume_id")}))["volume"]["path"]
            assert await disk_paths("lab-h2", name) == [there]
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)
            await on_a.call("Volume.delete", {k: disk[k] for k in
                                              ("sd_id", "image_id", "volume_id")})


async def test_a_vm_on_local_storage_moves_with_its_disk_copied(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        # A chain of two layers on A's own storage, the data in the lower one.
        base = await volume_with_data(on_a, "lab-h1", a["local_sd_id"])
        leaf = (await on_a.call("Volume.create", {"sd_id": a["local_sd_id"],
                                                  "format": "qcow2",
                                                  "parent": {
                                                      "image_id": base["image_id"],
                                                      "volume_id": base["volume_id"]}}))[
            "volume"]
        vm_id, name = await create_vm(on_a, disks=[{"volume": ref(leaf)}])
        try:
            with pytest.raises(RemoteError) as caught:
                await on_a.call("VM.migrate", {"vm_id": vm_id, "destination": b["url"]})
            # A's own domain is not attached on B.
            assert caught.value.data["reason"] == "storage_missing"
            with pytest.raises(RemoteError) as caught:
                await on_a.call("VM.migrate", {
                    "vm_id": vm_id, "destination": b["url"], "storage": "copy",
                    "destination_sd_id": str(uuid.uuid4())})
            assert caught.value.data["reason"] == "storage_missing"
            assert await volumes_in(on_b, b["local_sd_id"]) == []

            job = await migrate(on_a, vm_id, b["url"], storage="copy",
                                destination_sd_id=b["local_sd_id"])
            assert job["state"] == "succeeded", job
            [made] = job["result"]["volumes"]
            assert made["sd_id"] == b["local_sd_id"]
            assert made["image_id"] == leaf["image_id"], "the image keeps its id"
            assert await disk_paths("lab-h2", name) == [made["path"]]
            assert await holds_data("lab-h2", made["path"]), "the chain's data, copied"
            await runs_only_on("lab-h2", name, "lab-h1")
            [listed] = await volumes_in(on_b, b["local_sd_id"])
            assert (listed["volume_id"], listed["format"], listed["virtual_size"]) == (
                made["volume_id"], "qcow2", 256 << 20)
            assert len(await volumes_in(on_a, a["local_sd_id"])) == 2, "the source keeps its"

            # And back: A has the image already, so the copy goes into a new one.
            back = await migrate(on_b, vm_id, a["url"], storage="copy",
                                 destination_sd_id=a["local_sd_id"])
            assert back["state"] == "succeeded", back
            [home] = back["result"]["volumes"]
            assert home["image_id"] != leaf["image_id"]
            assert await holds_data("lab-h1", home["path"])
            assert await state_on("lab-h1", name) == "running"
        finally:
            await remove_vm(on_a, vm_id)
            await remove_vm(on_b, vm_id)
            await drop_volumes(on_a, a["local_sd_id"])
            await drop_volumes(on_b, b["local_sd_id"])


async def test_a_cancelled_copy_leaves_no_volume_at_the_destination(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    async with await connect(a) as on_a, await connect(b) as on_b:
        disk = await volume_with_data(on_a, "lab-h1", a["local_sd_id"], fmt="raw")
        vm_id, name = await create_vm(on_a, disks=[{"volume": ref(disk)}])
        try:
            started = await on_a.call("VM.migrate", {
                "vm_id": vm_id, "destination": b["url"], "storage": "copy",
                "destination_sd_id": b["local_sd_id"], "max_bandwidth_mibps": 1})
            assert len(await volumes_in(on_b, b["local_sd_id"])) == 1, "made before the job"
            cancelled = (await on_a.call("Job.cancel", {"job_id": started["job_id"]}))["job"]
            assert cancelled["state"] == "cancelled", cancelled
            await runs_only_on("lab-h1", name, "lab-h2")
            assert await volumes_in(on_b, b["local_sd_id"]) == []
        finally:
            await remove_vm(on_a, vm_id)
            await drop_volumes(on_a, a["local_sd_id"])
            await drop_volumes(on_b, b["local_sd_id"])


async def test_a_vm_moves_through_three_hosts(hosts: list[dict[str, Any]]) -> None:
    a, b, c = hosts
    async with await connect(a) as on_a, await connect(b) as on_b, \
            await connect(c) as on_c:
        disk = await volume_with_data(on_a, "lab-h1", a["sd_id"])
        vm_id, name = await create_vm(on_a, disks=[{"volume": ref(disk)}])
        try:
            assert (await migrate(on_a, vm_id, b["url"]))["state"] == "succeeded"
            assert (await migrate(on_b, vm_id, c["url"]))["state"] == "succeeded"
            assert name in await running("lab-h3")
            for host in ("lab-h1", "lab-h2"):
                assert name not in await defined(host)
            info = await on_c.call("VM.getInfo", {"vm_id": vm_id})
            assert (info["vm_id"], info["state"]) == (vm_id, "running")
            # The same volume, where C mounts the shared domain.
            there = (await on_c.call("Volume.getInfo", ref(disk)))["volume"]["path"]
            assert there != disk["path"]
            assert await disk_paths("lab-h3", name) == [there]
            assert await holds_data("lab-h3", there)
        finally:
            for client in (on_a, on_b, on_c):
                await remove_vm(client, vm_id)
            await on_a.call("Volume.delete", ref(disk))


async def test_a_copy_into_too_little_space_is_refused_before_anything_moves(
        hosts: list[dict[str, Any]]) -> None:
    a, b, _ = hosts
    small = "/var/lib/libvirt/small"
    for argv in (["mkdir", "-p", small], ["mount", "-t", "tmpfs", "-o", "size=64m",
                                          "tmpfs", small]):
        done = await asyncio.to_thread(on_host, "lab-h2", *argv)
        assert done.returncode == 0, done.stderr
    async with await connect(a) as on_a, await connect(b) as on_b:
        tight = (await on_b.call("StorageDomain.create", {
            "type": "localfs", "name": "tight", "path": small}))["domain"]["sd_id"]
        disk = await volume_with_data(on_a, "lab-h1", a["local_sd_id"])  # 5 MiB of data
        await asyncio.to_thread(on_host, "lab-h1", "qemu-io", "-f", "qcow2", "-c",
                                "write -P 0x11 8M 100M", disk["path"])
        vm_id, name = await create_vm(on_a, disks=[{"volume": ref(disk)}])
        try:
            with pytest.raises(RemoteError) as caught:
                await on_a.call("VM.migrate", {"vm_id": vm_id, "destination": b["url"],
                                               "storage": "copy",
                                               "destination_sd_id": tight})
            assert (caught.value.name, caught.value.data["reason"]) == (
                "FailedPrecondition", "insufficient_space"), caught.value.error
            assert caught.value.data["need"] > caught.value.data["free"]
            assert await volumes_in(on_b, tight) == []
            await left_alone(on_a, vm_id, name)
        finally:
            await remove_vm(on_a, vm_id)
            await drop_volumes(on_a, a["local_sd_id"])
            await on_b.call("StorageDomain.delete", {"sd_id": tight})
            await asyncio.to_thread(on_host, "lab-h2", "umount", small)

"""Storage domains through a real agent: localfs in a temp dir, posixfs on loop-mounted ext4."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import LoopFsFactory, expect_error, next_event, scrape
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

FAST = {"storage": {"monitor_interval": 0.2, "monitor_timeout": 2.0}}


@pytest.fixture
async def sd_agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    agent = await start_agent(tmp_path / "a", sections=FAST)
    yield agent
    status = await agent.stop()
    assert status == 0, agent.log


async def wait_state(client: Client, sd_id: str, state: str, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            domain: dict[str, Any] = (await client.call("StorageDomain.getInfo",
                                                        {"sd_id": sd_id}))["domain"]
            if domain["state"] == state:
                return domain
            await asyncio.sleep(0.05)


async def test_localfs_create_list_info_detach_attach_delete(
        sd_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(sd_agent.unix_url)
    await client.call("Events.subscribe", {"topics": ["storage.*"]})
    root = tmp_path / "local"
    created = (await client.call("StorageDomain.create",
                                 {"type": "localfs", "name": "local", "path": str(root)}))
    domain = created["domain"]
    sd_id = domain["sd_id"]
    assert domain["path"] == str(root / sd_id)
    metadata = json.loads((root / sd_id / "dom_md" / "metadata.json").read_text())
    assert metadata["uuid"] == sd_id and metadata["type"] == "localfs"
    assert metadata == domain["metadata"]
    assert (root / sd_id / "images").is_dir()
    event = await next_event(client, "storage.domain", lambda d: d["event"] == "created")
    assert event["sd_id"] == sd_id

    info = await wait_state(client, sd_id, "ok")
    monitor = info["monitor"]
    assert monitor["direct_io"] is True and monitor["read_latency_seconds"] >= 0
    assert 0 < monitor["free_bytes"] <= monitor["total_bytes"]
    listed = (await client.call("StorageDomain.list"))["domains"]
    assert [d["sd_id"] for d in listed] == [sd_id]

    dup = await expect_error(client, "StorageDomain.create",
                             {"type": "localfs", "name": "local", "path": str(tmp_path / "x")})
    assert (dup.name, dup.data["reason"]) == ("AlreadyExists", "name_in_use")
    busy = await expect_error(client, "StorageDomain.create",
                              {"type": "localfs", "name": "other", "path": str(root)})
    assert (busy.name, busy.data["reason"]) == ("FailedPrecondition", "not_empty")

    await client.call("StorageDomain.detach", {"sd_id": sd_id})
    assert (await client.call("StorageDomain.list"))["domains"] == []
    assert (root / sd_id / "dom_md" / "metadata.json").exists()  # detach keeps the data
    gone = await expect_error(client, "StorageDomain.getInfo", {"sd_id": sd_id})
    assert gone.name == "NotFound"

    again = await client.call("StorageDomain.attach",
                              {"sd_id": sd_id, "type": "localfs", "path": str(root)})
    assert again["domain"]["metadata"] == metadata
    twice = await expect_error(client, "StorageDomain.attach",
                               {"sd_id": sd_id, "type": "localfs", "path": str(root)})
    assert twice.name == "AlreadyExists"

    (root / sd_id / "images" / str(uuid.uuid4())).mkdir()
    (next((root / sd_id / "images").iterdir()) / "volume").write_bytes(b"x")
    held = await expect_error(client, "StorageDomain.delete", {"sd_id": sd_id})
    assert held.data["reason"] == "has_volumes"
    await client.call("StorageDomain.delete", {"sd_id": sd_id, "force": True})
    assert list(root.iterdir()) == []
    await next_event(client, "storage.domain", lambda d: d["event"] == "deleted")


@pytest.mark.parametrize("params", [
    {"sd_id": "../x"}, {"sd_id": "a/b"}, {"sd_id": "not-a-uuid"},
])
async def test_bad_ids_are_refused(sd_agent: AgentProcess, checked_client: ClientFactory,
                                   params: dict[str, Any]) -> None:
    client = await checked_client(sd_agent.unix_url)
    err = await expect_error(client, "StorageDomain.getInfo", params)
    assert err.name == "InvalidParams"
    err = await expect_error(client, "StorageDomain.attach",
                             {**params, "type": "localfs", "path": "/tmp"})
    assert err.name == "InvalidParams"


async def test_bad_create_params_are_refused(sd_agent: AgentProcess,
                                             checked_client: ClientFactory,
                                             tmp_path: Path) -> None:
    client = await checked_client(sd_agent.unix_url)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "localfs", "name": "a/b", "path": str(tmp_path)}, "InvalidParams"),
        ({"type": "localfs", "name": "x\n", "path": str(tmp_path)}, "InvalidParams"),
        ({"type": "localfs", "name": "x", "path": "relative"}, "InvalidParams"),
        ({"type": "localfs", "name": "x", "path": f"{tmp_path}/../etc"}, "InvalidArgument"),
        ({"type": "localfs", "name": "x"}, "InvalidArgument"),
        ({"type": "posixfs", "name": "x", "path": str(tmp_path)}, "InvalidArgument"),
        ({"type": "posixfs", "name": "x",
          "mount": {"source": "-oremount", "vfs_type": "ext4"}}, "InvalidArgument"),
        ({"type": "posixfs", "name": "x",
          "mount": {"source": "/dev/null", "vfs_type": "ext4", "options": "a b"}},
         "InvalidArgument"),
        ({"type": "posixfs", "name": "x",
          "mount": {"source": "/dev/null", "vfs_type": "-t"}}, "InvalidParams"),
    ]
    for params, name in cases:
        err = await expect_error(client, "StorageDomain.create", params)
        assert err.name == name, (params, err)
    assert (await client.call("StorageDomain.list"))["domains"] == []


@pytest.mark.parametrize(
    ("params", "name", "reason"),
    [
        ({"name": "sur\ud800"}, "ParseError", "bad_unicode"),
        ({"name": "ok", "leaf": "x\udc00"}, "ParseError", "bad_unicode"),
        ({"name": "ok", "leaf": "a\u0000b"}, "InvalidParams", "control_character"),
        ({"name": "ok", "leaf": "bell\u0007"}, "InvalidParams", "control_character"),
    ],
    ids=["surrogate-name", "surrogate-path", "nul-path", "bell-path"],
)
async def test_create_with_text_that_cannot_be_stored_leaves_nothing(
        *, sd_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path,
        params: dict[str, Any], name: str, reason: str) -> None:
    client = await checked_client(sd_agent.unix_url)
    root = tmp_path / "local"
    path = root / params.pop("leaf", "")
    async with asyncio.timeout(30):
        err = await expect_error(client, "StorageDomain.create",
                                 {"type": "localfs", "path": str(path), **params}, name, reason)
        if name == "InvalidParams":
            assert err.data["field"] == "path"
        assert not root.exists()
        assert (await client.call("StorageDomain.list"))["domains"] == []


async def test_attach_refuses_corrupt_and_newer_metadata(
        sd_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(sd_agent.unix_url)
    root = tmp_path / "shared"
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "s", "path": str(root)}))["domain"]["sd_id"]
    await client.call("StorageDomain.detach", {"sd_id": sd_id})
    path = root / sd_id / "dom_md" / "metadata.json"
    good = path.read_text()
    params = {"sd_id": sd_id, "type": "localfs", "path": str(root)}
    for text, reason in ((good.replace('"version": 1', '"version": 9'), "metadata_newer"),
                         ("{not json", "metadata_corrupt"),
                         (good.replace('"block_size": 512', '"block_size": "512"'),
                          "metadata_corrupt")):
        path.write_text(text)
        err = await expect_error(client, "StorageDomain.attach", params)
        assert (err.name, err.data["reason"]) == ("FailedPrecondition", reason)
        assert path.read_text() == text  # never rewritten
    path.write_text(good)
    wrong = await expect_error(client, "StorageDomain.attach", {**params, "type": "posixfs"})
    assert wrong.name == "InvalidArgument"
    missing_sd = await expect_error(client, "StorageDomain.attach",
                                    {**params, "sd_id": str(uuid.uuid4())})
    assert (missing_sd.name, missing_sd.data["reason"]) == ("NotFound", "no_domain")


async def test_the_registry_survives_a_restart(tmp_path: Path,
                                               checked_client: ClientFactory) -> None:
    root = tmp_path / "local"
    agent = await start_agent(tmp_path / "a", sections=FAST)
    try:
        client = await checked_client(agent.unix_url)
        sd_id = (await client.call("StorageDomain.create", {
            "type": "localfs", "name": "keep", "path": str(root)}))["domain"]["sd_id"]
        await client.close()
    finally:
        assert await agent.stop() == 0, agent.log
    agent = await start_agent(tmp_path / "a", sections=FAST)
    try:
        client = await checked_client(agent.unix_url)
        domain = await wait_state(client, sd_id, "ok")
        assert domain["name"] == "keep" and domain["error"] is None
        await client.call("StorageDomain.detach", {"sd_id": sd_id})
    finally:
        assert await agent.stop() == 0, agent.log


async def test_metrics_report_the_monitor(sd_agent: AgentProcess,
                                          checked_client: ClientFactory,
                                          tmp_path: Path) -> None:
    client = await checked_client(sd_agent.unix_url)
    sd_id = (await client.call("StorageDomain.create", {
        "type": "localfs", "name": "m", "path": str(tmp_path / "m")}))["domain"]["sd_id"]
    await wait_state(client, sd_id, "ok")
    _, _, text = await scrape(sd_agent.http_url)
    labels = f'sd_id="{sd_id}",sd_name="m"'
    assert f'virtnode_storage_domain_state{{{labels},state="ok"}} 1.0' in text
    assert f"virtnode_storage_domain_free_bytes{{{labels}}}" in text
    assert f"virtnode_storage_domain_read_latency_seconds{{{labels}}}" in text
    # The same check in the host statistics, read from the monitor's cache.
    stats = await client.call("Host.getStats")
    [entry] = [d for d in stats["storage_domains"] if d["sd_id"] == sd_id]
    assert entry["name"] == "m" and entry["monitor"]["state"] == "ok"
    assert entry["monitor"]["total_bytes"] > entry["monitor"]["free_bytes"] > 0


# --- posixfs on loop devices ----------------------------------------------------------------


async def test_posixfs_create_detach_and_two_agents(
        tmp_path: Path, loop_fs: LoopFsFactory, checked_client: ClientFactory) -> None:
    spec = {"source": await loop_fs(64 * 1024 * 1024), "vfs_type": "ext4"}
    first = await start_agent(tmp_path / "a", sections=FAST)
    second = await start_agent(tmp_path / "b", sections=FAST)
    try:
        one = await checked_client(first.unix_url)
        two = await checked_client(second.unix_url)
        await one.call("Events.subscribe", {"topics": ["storage.domain"]})
        domain = (await one.call("StorageDomain.create",
                                 {"type": "posixfs", "name": "shared", "mount": spec}))["domain"]
        sd_id = domain["sd_id"]
        mount_point = tmp_path / "a" / "state" / "mnt" / sd_id
        assert domain["root"] == str(mount_point)
        assert await asyncio.to_thread(os.path.ismount, mount_point)
        event = await next_event(one, "storage.domain",
                                 lambda d: d["event"] == "state" and d["state"] == "ok")
        assert event["previous_state"] == "unknown"
        options = (await run("findmnt", "-no", "OPTIONS", mount_point)).check()
        assert {"nosuid", "nodev", "noexec"} <= set(options.strip().split(","))

        attached = (await two.call("StorageDomain.attach",
                                   {"sd_id": sd_id, "type": "posixfs", "mount": spec}))["domain"]
        assert attached["metadata"] == domain["metadata"]
        assert attached["root"] == str(tmp_path / "b" / "state" / "mnt" / sd_id)
        info = await wait_state(two, sd_id, "ok")
        assert info["monitor"]["total_bytes"] < 64 * 1024 * 1024

        # The volumes one host makes, the other sees: the same ids, metadata and chain.
        base = (await one.call("Volume.create", {"sd_id": sd_id, "size": 4 * 1024 * 1024,
                                                 "format": "raw"}))["volume"]
        top = (await one.call("Volume.create", {"sd_id": sd_id, "parent": {
            "image_id": base["image_id"], "volume_id": base["volume_id"]}}))["volume"]
        ref = {k: top[k] for k in ("sd_id", "image_id", "volume_id")}
        seen = (await two.call("Volume.list", {"sd_id": sd_id}))["volumes"]
        mine = (await one.call("Volume.list", {"sd_id": sd_id}))["volumes"]
        assert [without_path(v) for v in seen] == [without_path(v) for v in mine]
        assert len(seen) == 2
        info = (await two.call("Volume.getInfo", ref))["volume"]
        assert info["path"].startswith(attached["path"] + "/")
        assert [c["volume_id"] for c in info["chain"]] == [top["volume_id"], base["volume_id"]]
        assert info["qemu_virtual_size"] == 4 * 1024 * 1024
        await one.call("Volume.delete", ref)
        err = await expect_error(two, "Volume.getInfo", ref)
        assert err.data["reason"] == "no_volume"
        await one.call("Volume.delete", {**ref, "volume_id": base["volume_id"]})
        assert (await two.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []

        await two.call("StorageDomain.detach", {"sd_id": sd_id})
        assert not await asyncio.to_thread(os.path.ismount, attached["root"])
        assert not await asyncio.to_thread(os.path.exists, attached["root"])
        await one.call("StorageDomain.detach", {"sd_id": sd_id})
        assert not await asyncio.to_thread(os.path.ismount, mount_point)
        await next_event(one, "storage.domain", lambda d: d["event"] == "detached")
    finally:
        assert await first.stop() == 0, first.log
        assert await second.stop() == 0, second.log


async def test_posixfs_is_mounted_again_after_a_restart(
        tmp_path: Path, loop_fs: LoopFsFactory, checked_client: ClientFactory) -> None:
    spec = {"source": await loop_fs(64 * 1024 * 1024), "vfs_type": "ext4", "options": "noatime"}
    agent = await start_agent(tmp_path / "a", sections=FAST)
    try:
        client = await checked_client(agent.unix_url)
        sd_id = (await client.call("StorageDomain.create", {
            "type": "posixfs", "name": "p", "mount": spec}))["domain"]["sd_id"]
    finally:
        assert await agent.stop() == 0, agent.log
    mount_point = tmp_path / "a" / "state" / "mnt" / sd_id
    (await run("umount", mount_point)).check()  # as after a reboot
    agent = await start_agent(tmp_path / "a", sections=FAST)
    try:
        client = await checked_client(agent.unix_url)
        domain = await wait_state(client, sd_id, "ok")
        assert domain["mount"] == spec and domain["error"] is None
        assert await asyncio.to_thread(os.path.ismount, mount_point)
        await client.call("StorageDomain.delete", {"sd_id": sd_id})
        assert not await asyncio.to_thread(os.path.ismount, mount_point)
    finally:
        assert await agent.stop() == 0, agent.log


async def test_posixfs_on_a_tiny_filesystem(tmp_path: Path, loop_fs: LoopFsFactory,
                                            checked_client: ClientFactory) -> None:
    """A nearly full filesystem still takes a domain (later work checks no_space)."""
    device = await loop_fs(2 * 1024 * 1024, mkfs_options=("-m", "0"))
    agent = await start_agent(tmp_path / "a", sections=FAST)
    try:
        client = await checked_client(agent.unix_url)
        domain = (await client.call("StorageDomain.create", {
            "type": "posixfs", "name": "tiny",
            "mount": {"source": device, "vfs_type": "ext4"}}))["domain"]
        info = await wait_state(client, domain["sd_id"], "ok")
        assert info["monitor"]["total_bytes"] <= 2 * 1024 * 1024
        await client.call("StorageDomain.detach", {"sd_id": domain["sd_id"]})
    finally:
        assert await agent.stop() == 0, agent.log


async def test_a_failed_mount_leaves_nothing(sd_agent: AgentProcess,
                                             checked_client: ClientFactory,
                                             tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("posixfs tests mount and need root")
    client = await checked_client(sd_agent.unix_url)
    not_a_fs = tmp_path / "zeros.img"
    not_a_fs.write_bytes(bytes(1024 * 1024))
    err = await expect_error(client, "StorageDomain.create", {
        "type": "posixfs", "name": "bad",
        "mount": {"source": str(not_a_fs), "vfs_type": "ext4", "options": "loop,ro"}})
    assert (err.name, err.data["reason"]) == ("FailedPrecondition", "mount_failed")
    mnt = tmp_path / "a" / "state" / "mnt"
    assert not mnt.exists() or list(mnt.iterdir()) == []
    assert (await client.call("StorageDomain.list"))["domains"] == []


def without_path(volume: dict[str, Any]) -> dict[str, Any]:
    """A volume as any host sees it: everything but its path, which is per host."""
    return {k: v for k, v in volume.items() if k != "path"}


# --- where a domain may not be made ---------------------------------------------------------


UUID_NAME = re.compile(r"(\.deleted-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                       r"[0-9a-f]{12}.*")


def entries(path: Path) -> list[str] | None:
    """What a directory holds (None when it is absent or not a directory)."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def domains_in(path: Path) -> list[str]:
    """The entries of a directory named as a domain (or a domain being deleted) would be."""
    return [e for e in entries(path) or [] if UUID_NAME.fullmatch(e)]


async def refused_or_undone(client: Client, params: dict[str, Any]) -> Any:
    """The error StorageDomain.create answers. Should it make the domain instead, the
    domain is deleted again at once (nothing is left in a system directory) and the test
    fails."""
    from virtnode.client import RemoteError

    try:
        created = await client.call("StorageDomain.create", params)
    except RemoteError as err:
        return err
    await client.call("StorageDomain.delete", {"sd_id": created["domain"]["sd_id"],
                                               "force": True})
    raise AssertionError(f"a domain was made in {created['domain']['path']} (deleted again)")


def resolved(path: str) -> Path:
    return Path(os.path.realpath(path))


def place(tmp_path: Path, where: str) -> str:
    """The path to create in: a system directory, or one made under tmp_path."""
    if where.startswith("/"):
        return where
    if where == "link-to-etc":
        (tmp_path / "etc-link").symlink_to("/etc")
        return str(tmp_path / "etc-link")
    if where == "dangling":
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "sd")
        return str(tmp_path / "dangling")
    if where == "state":
        return str(tmp_path / "a" / "state")
    if where == "long-name":
        return str(tmp_path / ("x" * 256))
    assert where == "long-path"
    return str(tmp_path / "/".join(["d" * 200] * 20))


@pytest.mark.parametrize(("where", "reason"), [
    ("/", "system_path"), ("/etc", "system_path"), ("/dev", "system_path"),
    ("/dev/shm", "system_path"), ("/proc", "system_path"), ("/sys/kernel", "system_path"),
    ("/usr/lib", "system_path"), ("link-to-etc", "system_path"), ("state", "system_path"),
    ("dangling", "invalid_path"), ("long-name", "path_too_long"),
    ("long-path", "path_too_long"),
])
async def test_create_refuses_system_places_and_makes_nothing(
        sd_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path, where: str,
        reason: str) -> None:
    client = await checked_client(sd_agent.unix_url)
    path = place(tmp_path, where)
    # What a domain would have made (system directories change on their own: /proc).
    watched = [Path(path), resolved(path), tmp_path / "a" / "state"]
    before = [domains_in(p) for p in watched], entries(tmp_path)
    err = await refused_or_undone(client, {"type": "localfs", "name": "bad", "path": path,
                                           "force": True})
    assert (err.name, err.data["reason"], err.data["field"]) == (
        "InvalidArgument", reason, "path"), err.error
    assert ([domains_in(p) for p in watched], entries(tmp_path)) == before
    assert not (tmp_path / "nowhere").exists()
    assert (await client.call("StorageDomain.list"))["domains"] == []
    if where == "/etc":
        err = await expect_error(client, "StorageDomain.attach", {
            "sd_id": str(uuid.uuid4()), "type": "localfs", "path": path})
        assert (err.name, err.data["reason"]) == ("InvalidArgument", "system_path")


@pytest.mark.parametrize(("vfs_type", "allowed"), [("proc", False), ("sysfs", False),
                                                     ("tmpfs", True)])
async def test_create_refuses_special_filesystems(
        sd_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path,
        vfs_type: str, allowed: bool) -> None:
    if os.geteuid() != 0:
        missing("mounting a filesystem needs root")
    client = await checked_client(sd_agent.unix_url)
    mount_point = tmp_path / vfs_type
    mount_point.mkdir()
    (await run("mount", "-t", vfs_type, vfs_type, mount_point)).check()
    try:
        params = {"type": "localfs", "name": "special", "path": str(mount_point),
                  "force": True}
        if allowed:
            created = await client.call("StorageDomain.create", params)
            await client.call("StorageDomain.delete", {"sd_id": created["domain"]["sd_id"]})
        else:
            err = await refused_or_undone(client, params)
            assert (err.name, err.data["reason"], err.data["field"]) == (
                "InvalidArgument", "special_filesystem", "path"), err.error
            # A posixfs mount of such a type is refused before anything is mounted.
            err = await expect_error(client, "StorageDomain.create", {
                "type": "posixfs", "name": "special",
                "mount": {"source": vfs_type, "vfs_type": vfs_type}})
            assert (err.name, err.data["reason"]) == ("InvalidArgument", "special_filesystem")
        # Nothing was made there (proc's own entries come and go with processes).
        assert domains_in(mount_point) == []
    finally:
        await run("umount", mount_point)


@pytest.mark.qemu
async def test_a_domain_qemu_cannot_reach_is_refused(
        qemu_agent: AgentProcess, checked_client: ClientFactory, image_dir: Path) -> None:
    client = await checked_client(qemu_agent.unix_url)
    closed = image_dir / "closed"
    closed.mkdir()
    os.chmod(closed, 0o700)  # as mktemp -d makes it
    refused = await expect_error(client, "StorageDomain.create",
                                 {"type": "localfs", "name": "hidden",
                                  "path": str(closed / "sd")})
    assert (refused.name, refused.data["reason"]) == ("FailedPrecondition", "not_accessible")
    assert refused.data["path"] == str(closed) and refused.data["user"] == "libvirt-qemu"
    assert str(closed) in refused.message and "libvirt-qemu" in refused.message
    assert not (closed / "sd").exists()  # a refused create leaves nothing made

    opened = image_dir / "open"
    opened.mkdir()
    os.chmod(opened, 0o755)
    sd_id = (await client.call("StorageDomain.create",
                               {"type": "localfs", "name": "visible",
                                "path": str(opened / "sd")}))["domain"]["sd_id"]
    for made in (opened / "sd", opened / "sd" / sd_id, opened / "sd" / sd_id / "images"):
        assert made.stat().st_mode & 0o777 == 0o755, made

    await client.call("StorageDomain.detach", {"sd_id": sd_id})
    os.chmod(opened, 0o700)
    again = await expect_error(client, "StorageDomain.attach",
                               {"sd_id": sd_id, "type": "localfs", "path": str(opened / "sd")})
    assert (again.name, again.data["reason"]) == ("FailedPrecondition", "not_accessible")
    assert again.data["path"] == str(opened)
    os.chmod(opened, 0o755)
    await client.call("StorageDomain.attach",
                      {"sd_id": sd_id, "type": "localfs", "path": str(opened / "sd")})

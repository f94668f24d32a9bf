"""Volume.import through a real agent: foreign formats converted by qemu-img into volumes
as a job, and only files of the import directories, checked before anything is made."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.agentproc import AgentProcess, running_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import expect_error, wait_job
from tests.integration.test_volumes import new_domain
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
async def importing_agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    if shutil.which("qemu-img") is None:
        missing("qemu-img is not installed (tools/ensure-host installs qemu-utils)")
    (tmp_path / "imports").mkdir()
    sections = {"storage": {"import_paths": [str(tmp_path / "imports")]}}
    async with running_agent(tmp_path, sections=sections) as agent:
        yield agent


async def random_raw(path: Path, size: int, seed: int) -> None:
    def write() -> None:
        rng = random.Random(seed)
        with path.open("wb") as handle:
            handle.truncate(size)
            for index in rng.sample(range(size // MiB), size // MiB // 4):
                handle.seek(index * MiB)
                handle.write(rng.randbytes(MiB))
    await asyncio.to_thread(write)


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "qcow2", "raw"])
async def test_a_foreign_image_becomes_a_volume(
        importing_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path,
        fmt: str) -> None:
    client = await checked_client(importing_agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    raw = tmp_path / "source.raw"
    await random_raw(raw, 32 * MiB, seed=len(fmt))
    source = tmp_path / "imports" / f"disk.{fmt}"
    (await run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, source)).check()

    started = await client.call("Volume.import", {"sd_id": sd_id, "path": str(source),
                                                  "description": fmt})
    job = await wait_job(client, started["job_id"])
    assert (job["kind"], job["state"], job["progress"]) == ("Volume.import", "succeeded", 100)
    volume = job["result"]["volume"]
    assert (volume["format"], volume["legality"], volume["virtual_size"]) == (
        "qcow2", "legal", 32 * MiB)
    (await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw,
               volume["path"])).check()


async def test_only_self_contained_files_of_the_import_directories(
        importing_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(importing_agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    imports = tmp_path / "imports"
    outside = tmp_path / "outside.raw"
    await asyncio.to_thread(outside.write_bytes, b"secret" * 1000)
    await asyncio.to_thread(os.symlink, "/etc/shadow", imports / "shadow.raw")
    (await run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F",
               "raw", imports / "backed.qcow2", "1M")).check()
    (await run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
               f"data_file={outside}", imports / "datafile.qcow2", "1M")).check()
    (await run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat",
               imports / "split.vmdk", "1M")).check()
    await asyncio.to_thread((imports / "fake.vdi").write_bytes, b"\0" * MiB)
    await asyncio.to_thread((imports / "folder").mkdir)

    cases = [
        ("/etc/shadow", "auto", "PermissionDenied", "path_not_allowed"),
        (str(imports / "shadow.raw"), "auto", "PermissionDenied", "path_not_allowed"),
        (str(imports / ".." / "outside.raw"), "auto", "PermissionDenied", "path_not_allowed"),
        (str(imports / "backed.qcow2"), "auto", "InvalidArgument", "backing_file"),
        (str(imports / "datafile.qcow2"), "auto", "InvalidArgument", "external_data_file"),
        (str(imports / "split.vmdk"), "auto", "InvalidArgument", "external_extents"),
        (str(imports / "fake.vdi"), "vdi", "InvalidArgument", "format_mismatch"),
        (str(imports / "missing.raw"), "auto", "InvalidArgument", "invalid_path"),
        (str(imports), "auto", "PermissionDenied", "path_not_allowed"),
        (str(imports / "folder"), "auto", "InvalidArgument", "invalid_path"),
    ]
    for path, fmt, name, reason in cases:
        await expect_error(client, "Volume.import", {"sd_id": sd_id, "path": path,
                                                     "format": fmt}, name, reason)
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert (await client.call("Job.list", {"kind": "Volume.import"}))["jobs"] == []


async def test_imports_are_refused_without_import_directories(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    image = tmp_path / "disk.raw"
    await asyncio.to_thread(image.write_bytes, bytes(MiB))
    await expect_error(client, "Volume.import", {"sd_id": sd_id, "path": str(image)},
                       "PermissionDenied", "path_not_allowed")


async def test_an_iso_file_becomes_an_iso_image(
        importing_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(importing_agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    iso = tmp_path / "imports" / "installer.iso"
    content = tmp_path / "content"
    content.mkdir()
    (content / "README.txt").write_text("install me\n")
    (await run("xorriso", "-as", "mkisofs", "-quiet", "-V", "INSTALLER", "-o", iso,
               content)).check()
    started = await client.call("Volume.import", {"sd_id": sd_id, "path": str(iso),
                                                  "dst_format": "raw", "content": "iso"})
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "succeeded", job
    volume = job["result"]["volume"]
    assert (volume["content"], volume["role"], volume["format"]) == ("iso", "shared", "raw")
    (await run("cmp", iso, volume["path"])).check()

    not_iso = tmp_path / "imports" / "disk.raw"
    await random_raw(not_iso, 2 * MiB, seed=3)
    await expect_error(client, "Volume.import", {"sd_id": sd_id, "path": str(not_iso),
                                                 "dst_format": "raw", "content": "iso"},
                       "InvalidArgument", "not_iso")
    await expect_error(client, "Volume.import", {"sd_id": sd_id, "path": str(iso),
                                                 "content": "iso"},
                       "InvalidArgument", "invalid_format")  # dst_format qcow2
    assert len((await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]) == 1


# --- from an upload ----------------------------------------------------------------------------


@pytest.fixture
async def http(agent: AgentProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP to the agent's unix socket, as root (an admin)."""
    connector = aiohttp.UnixConnector(path=str(agent.unix_path))
    async with aiohttp.ClientSession("http://localhost", connector=connector) as session:
        yield session


async def start_upload_import(client: Client, sd_id: str, image: Path,
                              **extra: Any) -> dict[str, Any]:
    size = (await asyncio.to_thread(image.stat)).st_size
    started: dict[str, Any] = await client.call("Volume.import", {
        "sd_id": sd_id, "upload": {"size": size}, **extra})
    assert started["transfer"]["size"] == size
    return started


async def put_all(http: aiohttp.ClientSession, url: str, image: Path) -> None:
    data = await asyncio.to_thread(image.read_bytes)
    async with http.put(url, data=data) as resp:
        assert resp.status == 200, await resp.text()


async def test_an_uploaded_vmdk_becomes_a_volume_with_the_command(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    raw = tmp_path / "source.raw"
    await random_raw(raw, 48 * MiB, seed=11)
    image = tmp_path / "appliance.vmdk"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
               "subformat=streamOptimized", raw, image)).check()

    out = (await run(sys.executable, "-m", "virtnode", "volume", "upload", image,
                     "--sd", sd_id, "--chunk-size", "1", "--description", "appliance",
                     "--url", agent.unix_url, env={**os.environ, "NO_COLOR": "1"})).check()
    result = json.loads(out)
    volume = result["volume"]
    assert (volume["format"], volume["legality"], volume["virtual_size"],
            volume["description"]) == ("qcow2", "legal", 48 * MiB, "appliance")
    assert result["sha256"] == hashlib.sha256(
        await asyncio.to_thread(image.read_bytes)).hexdigest()
    (await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw,
               volume["path"])).check()
    # The uploaded file was the import's to convert, not a volume of its own.
    listed = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert [v["volume_id"] for v in listed] == [volume["volume_id"]]
    (job,) = (await client.call("Job.list", {"kind": "Volume.import"}))["jobs"]
    assert (job["state"], job["progress"]) == ("succeeded", 100)


async def test_an_upload_is_checked_as_a_path_is_and_nothing_is_left(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    backed = tmp_path / "backed.qcow2"
    (await run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F",
               "raw", backed, "1M")).check()
    started = await start_upload_import(client, sd_id, backed)
    transfer = started["transfer"]
    await put_all(http, transfer["url"], backed)
    done = await client.call("Volume.finalizeTransfer", {"transfer_id": transfer["transfer_id"]})
    assert done["import_job_id"] == started["job_id"] and "volume" not in done
    job = await wait_job(client, started["job_id"])
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "backing_file")
    assert job["error"]["data"]["field"] == "upload"
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert os.listdir(tmp_path / "sd" / sd_id / "images") == []

    # A format other than the one declared fails the job the same way.
    plain = tmp_path / "plain.qcow2"
    (await run("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")).check()
    started = await start_upload_import(client, sd_id, plain, format="vdi")
    await put_all(http, started["transfer"]["url"], plain)
    await client.call("Volume.finalizeTransfer",
                      {"transfer_id": started["transfer"]["transfer_id"]})
    job = await wait_job(client, started["job_id"])
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "format_mismatch")
    assert os.listdir(tmp_path / "sd" / sd_id / "images") == []


def converting(agent: psutil.Process) -> list[psutil.Process]:
    """The agent's ``qemu-img convert`` processes."""
    found = []
    for child in agent.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == "qemu-img" and "convert" in child.cmdline():
                found.append(child)
    return found


async def test_cancelling_an_import_while_it_converts_leaves_nothing(
        importing_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(importing_agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    raw = tmp_path / "source.raw"
    await random_raw(raw, 2048 * MiB, seed=7)  # 512 MiB of data: seconds of converting
    source = tmp_path / "imports" / "big.vmdk"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", raw, source)).check()
    await asyncio.to_thread(raw.unlink)

    started = await client.call("Volume.import", {"sd_id": sd_id, "path": str(source)})
    agent = psutil.Process(importing_agent.pid)
    deadline = asyncio.get_running_loop().time() + 60
    while not (converters := converting(agent)):  # until qemu-img converts, not after
        job = (await client.call("Job.get", {"job_id": started["job_id"]}))["job"]
        assert job["state"] in ("pending", "running"), job
        assert asyncio.get_running_loop().time() < deadline, "the conversion never began"
        await asyncio.sleep(0.01)
    await client.call("Job.cancel", {"job_id": started["job_id"]})
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "cancelled"
    assert job["progress"] < 100
    _gone, alive = await asyncio.to_thread(psutil.wait_procs, converters, 10)
    assert not alive, "qemu-img outlived the cancelled import"
    assert os.listdir(tmp_path / "sd" / sd_id / "images") == []
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert source.exists()  # the source is never touched


async def test_cancelling_the_import_ends_its_upload(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    started = await client.call("Volume.import", {"sd_id": sd_id,
                                                  "upload": {"size": 8 * MiB}})
    transfer = started["transfer"]
    async with http.put(transfer["url"], data=bytes(MiB),
                        headers={"Content-Range": f"bytes 0-{MiB - 1}/{8 * MiB}"}) as resp:
        assert resp.status == 200
    assert len(os.listdir(tmp_path / "sd" / sd_id / "images")) == 1  # the upload's file
    await client.call("Job.cancel", {"job_id": started["job_id"]})
    job = await wait_job(client, started["job_id"])
    assert job["state"] == "cancelled"
    assert (await wait_job(client, transfer["job_id"]))["state"] == "cancelled"
    async with http.head(transfer["url"]) as resp:
        assert resp.status == 404
    assert os.listdir(tmp_path / "sd" / sd_id / "images") == []

    # And the other way round: the transfer cancelled fails the import.
    started = await client.call("Volume.import", {"sd_id": sd_id,
                                                  "upload": {"size": 8 * MiB}})
    await client.call("Volume.cancelTransfer",
                      {"transfer_id": started["transfer"]["transfer_id"]})
    job = await wait_job(client, started["job_id"])
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", "transfer_ended")
    assert os.listdir(tmp_path / "sd" / sd_id / "images") == []


async def test_an_import_takes_exactly_one_of_path_and_upload(
        importing_agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(importing_agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    image = tmp_path / "imports" / "disk.raw"
    await random_raw(image, MiB, seed=1)
    for params in ({}, {"path": str(image), "upload": {"size": MiB}}):
        await expect_error(client, "Volume.import", {"sd_id": sd_id, **params},
                           "InvalidArgument", "invalid_params")
    await expect_error(client, "Volume.import", {"sd_id": sd_id, "upload": {"size": MiB},
                                                 "content": "iso"},
                       "InvalidArgument", "invalid_format")  # dst_format qcow2
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert (await client.call("Job.list", {}))["jobs"] == []

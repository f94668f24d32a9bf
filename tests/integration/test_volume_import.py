"""Volume.import through a real agent: foreign formats converted by qemu-img into volumes
as a job, and only files of the import directories, checked before anything is made."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess, running_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import expect_error, wait_job
from tests.integration.test_volumes import new_domain
from tests.subproc import run

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

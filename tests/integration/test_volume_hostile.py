"""Files in a storage domain are hostile input: a qcow2 header that names a backing file
the metadata does not, data and metadata files that are links, a damaged volume next to
healthy ones.

Each test plants such a file where a volume's data was (as anyone who can write into the
domain could), next to a file outside the domain holding a secret, and checks that no
call reads, grows or copies the outside file, and that the rest of the domain stays
usable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import expect_error, wait_job
from tests.integration.test_volumes import new_domain
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SECRET = b"virtnode-test-secret-outside-the-domain"


@pytest.fixture(autouse=True)
def qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        missing("qemu-img is not installed (tools/ensure-host installs qemu-utils)")


def ref_of(volume: dict[str, Any]) -> dict[str, str]:
    return {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}


def write_outside(path: Path, size: int = MiB) -> bytes:
    """A raw file outside every domain, the secret at its start; returns its content."""
    content = SECRET + bytes(size - len(SECRET))
    path.write_bytes(content)
    return content


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every regular file under ``root`` whose bytes contain ``needle`` (links not followed)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
    return found


async def replace_data(volume: dict[str, Any], *options: str) -> None:
    """Put ``qemu-img create OPTIONS PATH 1M`` where the volume's data file was."""
    path = volume["path"]
    await asyncio.to_thread(os.unlink, path)
    (await run("qemu-img", "create", "-q", *options, path, str(MiB))).check()


async def refused(client: Client, method: str, params: dict[str, Any], reason: str,
                  volume_id: str) -> None:
    err = await expect_error(client, method, params, "FailedPrecondition", reason)
    assert (err.data["object"], err.data["id"]) == ("volume", volume_id), err.data
    assert SECRET.decode() not in json.dumps(err.error)


async def no_copy_made(client: Client, sd_id: str, before: int, params: dict[str, Any], *,
                       reason: str, volume_id: str) -> None:
    """Volume.copy is refused before a job exists, or its job fails; no volume is left."""
    try:
        started = await client.call("Volume.copy", params)
    except Exception:
        await refused(client, "Volume.copy", params, reason, volume_id)
    else:
        job = await wait_job(client, started["job_id"])
        raise AssertionError(f"the copy ran: {job}")
    volumes = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert len(volumes) == before


# --- 1. the qcow2 header never chooses a backing file ------------------------------------------


@pytest.mark.parametrize("header", ["absolute", "relative", "json", "data_file"])
async def test_a_header_that_names_an_outside_file_is_refused_everywhere(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path,
        header: str) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    outside = tmp_path / "outside.raw"
    volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": MiB,
                                                  "format": "qcow2"}))["volume"]
    ref = ref_of(volume)
    if header == "data_file":
        # An external data file: reading the image reads the outside file directly.
        await replace_data(volume, "-f", "qcow2", "-o",
                           f"data_file={outside},data_file_raw=on")
        reason = "external_data_file"
    else:
        # relative: from <tmp>/sd/<sd_id>/images/<image_id>/ back up to <tmp>
        backing = {"absolute": str(outside), "relative": "../../../../outside.raw",
                   "json": "json:" + json.dumps({"driver": "file",
                                                 "filename": str(outside)})}[header]
        await replace_data(volume, "-f", "qcow2", "-u", "-b", backing, "-F", "raw")
        reason = "backing_mismatch"
    content = write_outside(outside)
    before = len((await client.call("Volume.list", {"sd_id": sd_id}))["volumes"])

    await refused(client, "Volume.getInfo", ref, reason, volume["volume_id"])
    await refused(client, "Volume.resize", {**ref, "size": 4 * MiB}, reason,
                  volume["volume_id"])
    await no_copy_made(client, sd_id, before, {"src": ref, "dst_sd": sd_id,
                                               "dst_format": "raw"},
                       reason=reason, volume_id=volume["volume_id"])
    await refused(client, "VM.create", {"spec": {
        "name": "vn-it-hostile", "domain_type": "test", "disks": [{"volume": ref}]}},
        reason, volume["volume_id"])
    # A snapshot over it would hand the header's backing file to whoever reads the layer.
    await refused(client, "Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": volume["image_id"], "volume_id": volume["volume_id"]}}, reason,
        volume["volume_id"])

    assert await asyncio.to_thread(outside.read_bytes) == content
    assert await asyncio.to_thread(files_holding, tmp_path / "sd", SECRET) == []
    # The planted file can still be deleted (its outside file stays).
    await client.call("Volume.delete", ref)
    assert await asyncio.to_thread(outside.read_bytes) == content


async def test_a_layer_whose_header_names_another_parent_is_refused(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    outside = tmp_path / "outside.raw"
    content = write_outside(outside)
    base = (await client.call("Volume.create", {"sd_id": sd_id, "size": MiB,
                                                "format": "raw"}))["volume"]
    top = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": base["image_id"], "volume_id": base["volume_id"]}}))["volume"]
    ref = ref_of(top)
    # The metadata says base; the header now says the outside file.
    (await run("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", str(outside), "-F", "raw",
               top["path"])).check()

    await refused(client, "Volume.getInfo", ref, "backing_mismatch", top["volume_id"])
    await refused(client, "Volume.resize", {**ref, "size": 2 * MiB}, "backing_mismatch",
                  top["volume_id"])
    await refused(client, "Volume.merge", ref, "backing_mismatch", top["volume_id"])
    await no_copy_made(client, sd_id, 2, {"src": ref, "dst_sd": sd_id},
                       reason="backing_mismatch", volume_id=top["volume_id"])
    await refused(client, "VM.create", {"spec": {
        "name": "vn-it-hostile", "domain_type": "test", "disks": [{"volume": ref}]}},
        "backing_mismatch", top["volume_id"])
    assert await asyncio.to_thread(outside.read_bytes) == content
    assert await asyncio.to_thread(files_holding, tmp_path / "sd", SECRET) == []
    # The base is untouched and usable.
    info = (await client.call("Volume.getInfo", ref_of(base)))["volume"]
    assert (info["role"], info["legality"]) == ("internal", "legal")



# --- 2. a file with more than one link ---------------------------------------------------------


async def test_a_hard_linked_data_file_is_never_used(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    outside = tmp_path / "outside.raw"
    content = SECRET  # 38 bytes, like a small configuration file
    await asyncio.to_thread(outside.write_bytes, content)
    for fmt in ("raw", "qcow2"):
        volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": MiB,
                                                      "format": fmt}))["volume"]
        ref = ref_of(volume)
        await asyncio.to_thread(os.unlink, volume["path"])
        await asyncio.to_thread(os.link, outside, volume["path"])
        for method, params in (("Volume.getInfo", ref),
                               ("Volume.resize", {**ref, "size": 4 * MiB}),
                               ("Volume.copy", {"src": ref, "dst_sd": sd_id})):
            await refused(client, method, params, "unsafe_path", volume["volume_id"])
        await refused(client, "VM.create", {"spec": {
            "name": "vn-it-hostile", "domain_type": "test", "disks": [{"volume": ref}]}},
            "unsafe_path", volume["volume_id"])
        stat = await asyncio.to_thread(os.stat, outside)
        assert (stat.st_size, stat.st_nlink) == (len(content), 2)
        assert await asyncio.to_thread(outside.read_bytes) == content
        [listed] = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
        assert set(listed) == {"sd_id", "image_id", "volume_id", "error"}
        assert "links" in listed["error"]
        # Delete removes the volume's own names; the file's other name stays as it was.
        await client.call("Volume.delete", ref)
        assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
        stat = await asyncio.to_thread(os.stat, outside)
        assert (stat.st_size, stat.st_nlink) == (len(content), 1)


async def test_a_hard_linked_metadata_file_is_refused(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    volume = (await client.call("Volume.create", {"sd_id": sd_id, "size": MiB,
                                                  "format": "raw"}))["volume"]
    meta = volume["path"] + ".meta.json"
    await asyncio.to_thread(os.link, meta, tmp_path / "meta-elsewhere.json")
    await refused(client, "Volume.getInfo", ref_of(volume), "unsafe_path", volume["volume_id"])
    await refused(client, "Volume.resize", {**ref_of(volume), "size": 2 * MiB}, "unsafe_path",
                  volume["volume_id"])
    [entry] = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    assert "links" in entry["error"]


# --- 3. a damaged volume does not take the domain down with it -------------------------------


async def test_a_symlinked_volume_is_listed_with_an_error_and_the_others_stay_usable(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    outside = tmp_path / "outside.raw"
    content = write_outside(outside)
    bad, good = [(await client.call("Volume.create", {"sd_id": sd_id, "size": MiB,
                                                      "format": "raw"}))["volume"]
                 for _ in range(2)]
    await asyncio.to_thread(os.unlink, bad["path"])
    await asyncio.to_thread(os.symlink, outside, bad["path"])

    listed = {v["volume_id"]: v for v in
              (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]}
    assert set(listed) == {bad["volume_id"], good["volume_id"]}
    assert "symbolic link" in listed[bad["volume_id"]]["error"]
    assert "error" not in listed[good["volume_id"]]
    one = (await client.call("Volume.list", {"sd_id": sd_id, "image_id": bad["image_id"]}))
    assert [v["volume_id"] for v in one["volumes"]] == [bad["volume_id"]]

    await refused(client, "Volume.getInfo", ref_of(bad), "unsafe_path", bad["volume_id"])
    await refused(client, "Volume.resize", {**ref_of(bad), "size": 2 * MiB}, "unsafe_path",
                  bad["volume_id"])
    # The healthy volume is used as ever: read, layered, copied and deleted.
    await client.call("Volume.getInfo", ref_of(good))
    snap = (await client.call("Volume.create", {"sd_id": sd_id, "parent": {
        "image_id": good["image_id"], "volume_id": good["volume_id"]}}))["volume"]
    job = await wait_job(client, (await client.call(
        "Volume.copy", {"src": ref_of(snap), "dst_sd": sd_id}))["job_id"])
    assert job["state"] == "succeeded", job
    await client.call("Volume.delete", ref_of(job["result"]["volume"]))
    await client.call("Volume.delete", ref_of(snap))
    await client.call("Volume.delete", ref_of(good))

    # Deleting the damaged volume removes its link and metadata, never the link's target.
    await client.call("Volume.delete", ref_of(bad))
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert await asyncio.to_thread(outside.read_bytes) == content
    await client.call("StorageDomain.delete", {"sd_id": sd_id})

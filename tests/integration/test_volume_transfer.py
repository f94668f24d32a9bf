"""Volume transfers through a real agent: uploads in resumable chunks, downloads with
Range, images from outside refused before they become volumes, and the transfer URL
guarded like /rpc (role, Origin, expiry).

The bytes go over the agent's unix socket (whose caller, root, is an admin) with aiohttp
as any client would send them; an interrupted chunk is a raw connection closed half-way
through its body.
"""

from __future__ import annotations

import asyncio
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
import pytest

from tests.agentproc import AgentProcess, running_agent
from tests.conftest import ClientFactory, missing
from tests.integration.conftest import expect_error, wait_job
from tests.integration.test_volumes import new_domain
from tests.subproc import run
from virtnode.client import Client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.fixture(autouse=True)
def qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        missing("qemu-img is not installed (tools/ensure-host installs qemu-utils)")


@pytest.fixture
async def http(agent: AgentProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP to the agent's unix socket, as root (an admin)."""
    connector = aiohttp.UnixConnector(path=str(agent.unix_path))
    async with aiohttp.ClientSession("http://localhost", connector=connector) as session:
        yield session


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


async def make_qcow2_with_data(path: Path, virtual: int, blocks: int, seed: int) -> None:
    """A qcow2 of ``virtual`` bytes holding ``blocks`` MiB of random data at random places
    (made from a sparse raw file by qemu-img convert)."""
    raw = path.with_suffix(".raw")

    def write_raw() -> None:
        rng = random.Random(seed)
        with raw.open("wb") as handle:
            handle.truncate(virtual)
            for index in rng.sample(range(virtual // MiB), blocks):
                handle.seek(index * MiB)
                handle.write(rng.randbytes(MiB))

    await asyncio.to_thread(write_raw)
    (await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))).check()
    await asyncio.to_thread(raw.unlink)


async def upload_offset(http: aiohttp.ClientSession, url: str) -> int:
    async with http.head(url) as resp:
        assert resp.status == 200, await resp.text()
        return int(resp.headers["Upload-Offset"])


async def offset_past(http: aiohttp.ClientSession, url: str, old: int,
                      timeout: float = 10.0) -> int:
    """The Upload-Offset once it has moved past ``old``. After a dropped PUT a HEAD sent on
    a new connection can be read before the dropped request's head is (both wait in the
    listener's queue; the loop serves them in the order the kernel reports them), so the
    first answer may predate the dropped bytes."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (offset := await upload_offset(http, url)) <= old:
        assert asyncio.get_running_loop().time() < deadline, (
            f"Upload-Offset still {offset} after {timeout} s")
        await asyncio.sleep(0.05)
    return offset


async def put_chunk(http: aiohttp.ClientSession, url: str, data: bytes, start: int,
                    size: int) -> int:
    """PUT ``data`` at ``start``; returns the Upload-Offset the agent answers with."""
    headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/{size}"}
    async with http.put(url, data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return int(resp.headers["Upload-Offset"])


async def interrupted_put(agent: AgentProcess, url: str, data: bytes, start: int, *,
                          size: int, sent: int) -> None:
    """Begin a PUT of ``data`` at ``start`` and drop the connection after ``sent`` bytes of
    its body."""
    _, writer = await asyncio.open_unix_connection(str(agent.unix_path))
    head = (f"PUT {url} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
            f"Content-Range: bytes {start}-{start + len(data) - 1}/{size}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n")
    writer.write(head.encode() + data[:sent])
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def prepare_upload(client: Client, sd_id: str, path: Path, fmt: str,
                         **extra: Any) -> dict[str, Any]:
    size = (await asyncio.to_thread(path.stat)).st_size
    prepared: dict[str, Any] = await client.call("Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": size, "format": fmt, **extra})
    return prepared


async def put_whole(http: aiohttp.ClientSession, url: str, path: Path) -> None:
    data = await asyncio.to_thread(path.read_bytes)
    async with http.put(url, data=data) as resp:
        assert resp.status == 200, await resp.text()


async def images_in(domain_dir: Path) -> list[str]:
    return await asyncio.to_thread(lambda: sorted(os.listdir(domain_dir / "images")))


# --- upload ------------------------------------------------------------------------------------


async def test_upload_of_a_1gib_qcow2_in_chunks_survives_a_dropped_connection(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    source = tmp_path / "disk.qcow2"
    await make_qcow2_with_data(source, GiB, blocks=128, seed=16)
    data = await asyncio.to_thread(source.read_bytes)
    size, chunk = len(data), 16 * MiB
    assert size > 128 * MiB

    prepared = await prepare_upload(client, sd_id, source, "qcow2", description="uploaded")
    url, volume = prepared["url"], prepared["volume"]
    assert url == f"/transfer/{prepared['transfer_id']}"
    assert (volume["legality"], prepared["size"]) == ("illegal", size)
    job = (await client.call("Job.get", {"job_id": prepared["job_id"]}))["job"]
    assert (job["kind"], job["state"]) == ("Volume.prepareTransfer", "running")
    assert prepared["transfer_id"] not in json.dumps(job)  # readers see jobs: no secret

    offset, interrupted = 0, False
    while offset < size:
        piece = data[offset:offset + chunk]
        if not interrupted and offset >= 3 * chunk:
            # Drop the connection 40 % into this chunk: what arrived is kept, and the
            # client resumes from where the agent says it stands.
            await interrupted_put(agent, url, piece, offset, size=size, sent=len(piece) * 2 // 5)
            interrupted = True
            resumed = await offset_past(http, url, offset)
            assert resumed < offset + len(piece), (offset, resumed)
            assert resumed == offset + len(piece) * 2 // 5
            offset = await put_chunk(http, url, data[resumed:offset + len(piece)], resumed,
                                     size)
            continue
        if offset + len(piece) == size:
            # Not everything has arrived: finalize says how much did, and waits for more.
            err = await expect_error(client, "Volume.finalizeTransfer", {
                "transfer_id": prepared["transfer_id"]}, "FailedPrecondition",
                "transfer_incomplete")
            assert err.data["received"] == offset
        offset = await put_chunk(http, url, piece, offset, size)
    assert interrupted and offset == size

    digest = await asyncio.to_thread(sha256_of, source)
    done = await client.call("Volume.finalizeTransfer",
                             {"transfer_id": prepared["transfer_id"], "sha256": digest})
    volume = done["volume"]
    assert (done["sha256"], done["size"]) == (digest, size)
    assert (volume["legality"], volume["format"], volume["virtual_size"]) == (
        "legal", "qcow2", GiB)
    assert volume["description"] == "uploaded"
    (await run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(source),
               volume["path"])).check()
    info = (await client.call("Volume.getInfo", {k: volume[k] for k in (
        "sd_id", "image_id", "volume_id")}))["volume"]
    assert info["qemu_virtual_size"] == GiB
    job = await wait_job(client, prepared["job_id"])
    assert (job["state"], job["progress"]) == ("succeeded", 100)
    async with http.head(url) as resp:
        assert resp.status == 404  # the id is spent


async def test_a_wrong_checksum_refuses_the_upload_and_leaves_nothing(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    source = tmp_path / "disk.raw"
    await asyncio.to_thread(source.write_bytes, os.urandom(2 * MiB))
    prepared = await prepare_upload(client, sd_id, source, "raw")
    await put_whole(http, prepared["url"], source)
    err = await expect_error(client, "Volume.finalizeTransfer", {
        "transfer_id": prepared["transfer_id"], "sha256": "0" * 64},
        "FailedPrecondition", "checksum_mismatch")
    assert err.data["sha256"] == await asyncio.to_thread(sha256_of, source)
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert await images_in(tmp_path / "sd" / sd_id) == []
    assert (await wait_job(client, prepared["job_id"]))["state"] == "failed"


# --- hostile images ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["backing_shadow", "data_file", "beyond_space",
                                  "beyond_declared", "qcow2_as_raw", "vmdk_as_raw"])
async def test_a_hostile_image_is_refused_at_finalize_and_nothing_is_left(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path, kind: str) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    image = tmp_path / "hostile.img"
    fmt, extra, expected = "qcow2", {}, ("InvalidArgument", kind)
    if kind == "backing_shadow":
        options = ["-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw"]
        expected = ("InvalidArgument", "backing_file")
        size = str(MiB)
    elif kind == "data_file":
        options = ["-f", "qcow2", "-o", f"data_file={tmp_path / 'outside.raw'}"]
        expected = ("InvalidArgument", "external_data_file")
        size = str(MiB)
    elif kind == "beyond_space":
        st = await asyncio.to_thread(os.statvfs, tmp_path)
        options = ["-f", "qcow2"]
        size = str(2 * st.f_bavail * st.f_frsize // MiB * MiB)
        expected = ("ResourceExhausted", "no_space")
    elif kind == "beyond_declared":
        options, size = ["-f", "qcow2"], str(64 * MiB)
        extra = {"virtual_size": 32 * MiB}
        expected = ("InvalidArgument", "virtual_size_too_large")
    else:
        options = ["-f", "qcow2" if kind == "qcow2_as_raw" else "vmdk"]
        fmt, size = "raw", str(MiB)
        expected = ("InvalidArgument", "format_mismatch")
    (await run("qemu-img", "create", "-q", *options, str(image), size)).check()

    prepared = await prepare_upload(client, sd_id, image, fmt, **extra)
    await put_whole(http, prepared["url"], image)
    err = await expect_error(client, "Volume.finalizeTransfer",
                             {"transfer_id": prepared["transfer_id"]}, *expected)
    assert "shadow" not in json.dumps(err.error) or kind == "backing_shadow"
    assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
    assert await images_in(tmp_path / "sd" / sd_id) == []
    job = await wait_job(client, prepared["job_id"])
    assert (job["state"], job["error"]["data"]["reason"]) == ("failed", expected[1])
    async with http.head(prepared["url"]) as resp:
        assert resp.status == 404


# --- download ----------------------------------------------------------------------------------


async def test_download_whole_and_by_range(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    source = tmp_path / "disk.raw"
    content = os.urandom(3 * MiB + 123)
    await asyncio.to_thread(source.write_bytes, content)
    up = await prepare_upload(client, sd_id, source, "raw")
    await put_whole(http, up["url"], source)
    volume = (await client.call("Volume.finalizeTransfer",
                                {"transfer_id": up["transfer_id"]}))["volume"]
    ref = {k: volume[k] for k in ("sd_id", "image_id", "volume_id")}

    down = await client.call("Volume.prepareTransfer", {**ref, "direction": "download"})
    url, size = down["url"], len(content)
    assert down["size"] == size
    async with http.get(url) as resp:
        assert resp.status == 200 and resp.headers["Accept-Ranges"] == "bytes"
        assert await resp.read() == content
    for header, (start, end) in [("bytes=1000-1999", (1000, 2000)),
                                 (f"bytes={size - 10}-", (size - 10, size)),
                                 ("bytes=-100", (size - 100, size)),
                                 (f"bytes=5-{size * 2}", (5, size))]:
        async with http.get(url, headers={"Range": header}) as resp:
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
            assert await resp.read() == content[start:end], header
    for bad in (f"bytes={size}-", "bytes=0-1,5-6", "lines=1-2", "bytes=9-3"):
        async with http.get(url, headers={"Range": bad}) as resp:
            assert resp.status == 416, bad
            assert resp.headers["Content-Range"] == f"bytes */{size}"
    async with http.put(url, data=b"x") as resp:
        assert resp.status == 405  # a download is never written

    # Busy meanwhile: not deleted, not resized.
    await expect_error(client, "Volume.delete", ref, "FailedPrecondition", "volume_busy")
    await expect_error(client, "Volume.resize", {**ref, "size": 8 * MiB},
                       "FailedPrecondition", "volume_busy")
    # ... and no VM starts writing it.
    spec = {"name": "vn-transfer-dl", "memory_mib": 64, "disks": [{"volume": ref}]}
    err = await expect_error(client, "VM.create", {"spec": spec, "start": True},
                             "FailedPrecondition", "volume_busy")
    assert err.data["id"] == ref["volume_id"]
    digest = hashlib.sha256(content).hexdigest()
    done = await client.call("Volume.finalizeTransfer",
                             {"transfer_id": down["transfer_id"], "sha256": digest})
    assert (done["sha256"], done["size"]) == (digest, size)
    async with http.get(url) as resp:
        assert resp.status == 404
    await client.call("Volume.delete", ref)


# --- who may transfer --------------------------------------------------------------------------


async def test_readers_cannot_prepare_nor_use_a_transfer(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    admin = await checked_client(agent.unix_url)
    reader = await checked_client(agent.tcp_url)  # plain tcp callers are readers
    sd_id = await new_domain(admin, tmp_path / "sd")
    await expect_error(reader, "Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": MiB, "format": "raw"},
        "PermissionDenied")
    prepared = await admin.call("Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": MiB, "format": "raw"})
    url = agent.http_url + prepared["url"]
    async with aiohttp.ClientSession() as session:
        for method in ("PUT", "HEAD", "GET"):
            async with session.request(method, url, data=b"x" * MiB if method == "PUT"
                                       else None) as resp:
                assert resp.status == 403, method
    assert await upload_offset(http, prepared["url"]) == 0


async def test_a_page_of_another_origin_cannot_put(
        agent: AgentProcess, checked_client: ClientFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    prepared = await client.call("Volume.prepareTransfer", {
        "sd_id": sd_id, "direction": "upload", "size": MiB, "format": "raw"})
    for origin in ("http://evil.example", "null"):
        async with http.put(prepared["url"], data=b"x" * MiB,
                            headers={"Origin": origin}) as resp:
            assert resp.status == 403, origin
            assert (await resp.json())["error"]["data"]["reason"] == "bad_origin"
    assert await upload_offset(http, prepared["url"]) == 0


async def test_unknown_cancelled_and_expired_transfers(
        checked_client: ClientFactory, tmp_path: Path) -> None:
    # Long enough for the cancelled transfer to be cancelled before it expires, even on a
    # busy machine; short for the expired one.
    sections = {"storage": {"transfer_timeout": 3.0}}
    async with running_agent(tmp_path, sections=sections) as agent:
        client = await checked_client(agent.unix_url)
        sd_id = await new_domain(client, tmp_path / "sd")
        connector = aiohttp.UnixConnector(path=str(agent.unix_path))
        async with aiohttp.ClientSession("http://localhost", connector=connector) as http:
            async with http.put("/transfer/" + "A" * 43, data=b"x") as resp:
                assert resp.status == 404
            await expect_error(client, "Volume.finalizeTransfer",
                               {"transfer_id": "A" * 43}, "NotFound", "no_transfer")

            params = {"sd_id": sd_id, "direction": "upload", "size": 2 * MiB,
                      "format": "raw"}
            cancelled = await client.call("Volume.prepareTransfer", params)
            await put_chunk(http, cancelled["url"], b"y" * MiB, 0, 2 * MiB)
            await client.call("Volume.cancelTransfer",
                              {"transfer_id": cancelled["transfer_id"]})
            assert (await wait_job(client, cancelled["job_id"]))["state"] == "cancelled"
            async with http.head(cancelled["url"]) as resp:
                assert resp.status == 404

            expired = await client.call("Volume.prepareTransfer", params)
            job = await wait_job(client, expired["job_id"], timeout=10)
            assert (job["state"], job["error"]["data"]["reason"]) == (
                "failed", "transfer_expired")
            async with http.put(expired["url"], data=b"x" * 2 * MiB) as resp:
                assert resp.status == 404
            await expect_error(client, "Volume.finalizeTransfer",
                               {"transfer_id": expired["transfer_id"]}, "NotFound")
        assert (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"] == []
        assert await images_in(tmp_path / "sd" / sd_id) == []


# --- the command line --------------------------------------------------------------------------


async def test_volume_upload_and_download_commands(
        agent: AgentProcess, checked_client: ClientFactory, tmp_path: Path) -> None:
    client = await checked_client(agent.unix_url)
    sd_id = await new_domain(client, tmp_path / "sd")
    source = tmp_path / "disk.qcow2"
    await make_qcow2_with_data(source, 256 * MiB, blocks=24, seed=5)
    env = {**os.environ, "NO_COLOR": "1"}
    up = (await run(sys.executable, "-m", "virtnode", "volume", "upload", source,
                    "--sd", sd_id, "--chunk-size", "4", "--description", "cli",
                    "--url", agent.unix_url, env=env)).check()
    volume = json.loads(up)["volume"]
    assert (volume["format"], volume["legality"], volume["description"]) == (
        "qcow2", "legal", "cli")
    assert json.loads(up)["sha256"] == await asyncio.to_thread(sha256_of, source)

    # By volume id alone: the command finds its image by listing the domain.
    target = tmp_path / "back.qcow2"
    down = await run(sys.executable, "-m", "virtnode", "volume", "download", sd_id,
                     volume["volume_id"], "-o", target, "--url", agent.unix_url, env=env)
    assert json.loads(down.check())["size"] == (await asyncio.to_thread(source.stat)).st_size
    assert await asyncio.to_thread(target.read_bytes) == await asyncio.to_thread(
        source.read_bytes)
    assert "\x1b[" not in down.err  # no terminal: nothing drawn

    refused = await run(sys.executable, "-m", "virtnode", "volume", "upload", source,
                        "--sd", sd_id, "--format", "raw", "--url", agent.unix_url, env=env)
    assert refused.status == 1 and "format_mismatch" in refused.err
    assert len((await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]) == 1

"""``virtnode volume upload`` and ``virtnode volume download``: volume transfers from the
command line.

Both prepare a transfer with ``Volume.prepareTransfer``, move the bytes with plain HTTP on
the same listener (the unix socket, tcp:// or tls://, with the same TLS context), hash
them on the way, and end with ``Volume.finalizeTransfer`` and that SHA-256, so the agent
checks that what it holds is what the file held. An upload goes in chunks; a chunk whose
connection drops is resumed from the ``Upload-Offset`` the agent reports, a few times. A
download resumes with ``Range``. Anything that ends the command early cancels the
transfer (an upload's half-made volume is then removed).

Progress is drawn with rich on a terminal (stderr), without colour under ``NO_COLOR``;
elsewhere nothing is drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from virtnode.client.connection import Client, ClientError
from virtnode.util.jsontypes import JsonObject

if TYPE_CHECKING:
    from rich.progress import Progress

MiB = 1024 * 1024
#: Bytes sent per PUT; a dropped connection costs at most the rest of one chunk.
CHUNK = 64 * MiB
#: Bytes read from the file (and sent) at a time.
BLOCK = MiB
#: How often one chunk or the rest of a download is tried before giving up.
RETRIES = 5
QCOW2_MAGIC = b"QFI\xfb"

#: Told how many bytes are done (in all, not since the last call).
Report = Callable[[int], None]


class TransferFailed(ClientError):
    """The bytes could not be moved (the agent refused them, or kept dropping them)."""


def http_base(url: str) -> tuple[str, str | None]:
    """The HTTP base URL of the agent a client URL names, and its unix socket (or None).

    Raises ``ValueError`` for a URL the client cannot use.
    """
    if url.startswith("unix:"):
        return "http://localhost", url.removeprefix("unix:")
    parts = urlsplit(url)
    scheme = {"tcp": "http", "ws": "http", "tls": "https", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"unsupported URL {url!r}")
    return f"{scheme}://{parts.netloc}", None


#: Formats a volume cannot hold as they are: uploaded for Volume.import to convert.
FOREIGN = ("vmdk", "vdi", "vhdx")
#: What a file starts with (offset, bytes), per format; raw is anything else.
MAGIC = (("qcow2", 0, QCOW2_MAGIC), ("vhdx", 0, b"vhdxfile"), ("vmdk", 0, b"KDMV"),
         ("vmdk", 0, b"# Disk DescriptorFile"), ("vdi", 0x40, b"\x7f\x10\xda\xbe"))


def detect_format(path: Path) -> str:
    """The format the file's first bytes announce, raw for none (the agent checks)."""
    with path.open("rb") as handle:
        head = handle.read(0x44)
    for fmt, offset, magic in MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return "raw"


@contextlib.asynccontextmanager
async def http_session(url: str, tls: ssl.SSLContext | None) -> AsyncIterator[
        tuple[aiohttp.ClientSession, str]]:
    base, unix_path = http_base(url)
    connector: aiohttp.BaseConnector = (
        aiohttp.UnixConnector(path=unix_path) if unix_path
        else aiohttp.TCPConnector(ssl=tls if tls is not None else True))
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session, base


async def _refusal(resp: aiohttp.ClientResponse) -> TransferFailed:
    text = await resp.text()
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = json.loads(text)["error"]["message"]
    return TransferFailed(f"the agent answered {resp.status}: {text}")


# --- upload ---------------------------------------------------------------------------------


async def _offset(session: aiohttp.ClientSession, url: str) -> int:
    async with session.head(url) as resp:
        if resp.status != 200:
            raise await _refusal(resp)
        return int(resp.headers["Upload-Offset"])


async def _put(session: aiohttp.ClientSession, url: str, path: Path, *, start: int, end: int,
               size: int, report: Report) -> int:
    """PUT ``[start, end)`` of the file; returns the agent's Upload-Offset."""
    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as handle:
            handle.seek(start)
            position = start
            while position < end:
                block = await asyncio.to_thread(handle.read, min(BLOCK, end - position))
                if not block:
                    raise TransferFailed(f"{path} shrank while it was being sent")
                position += len(block)
                report(position)
                yield block

    headers = {"Content-Range": f"bytes {start}-{end - 1}/{size}",
               "Content-Length": str(end - start),
               "Content-Type": "application/octet-stream"}
    async with session.put(url, data=body(), headers=headers) as resp:
        if resp.status != 200:
            raise await _refusal(resp)
        return int(resp.headers["Upload-Offset"])


async def send_file(session: aiohttp.ClientSession, url: str, path: Path, size: int, *,
                    chunk: int = CHUNK, report: Report = lambda _: None,
                    retries: int = RETRIES) -> None:
    """Upload the file in chunks, resuming a chunk whose connection drops."""
    offset = 0
    while offset < size:
        end = min(offset + chunk, size)
        for attempt in range(retries + 1):
            try:
                offset = await _put(session, url, path, start=offset, end=end, size=size,
                                    report=report)
                break
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    TimeoutError) as exc:
                if attempt == retries:
                    raise TransferFailed(f"the connection kept dropping: {exc}") from None
                await asyncio.sleep(min(2 ** attempt * 0.5, 10))
                offset = await _offset(session, url)
                report(offset)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


async def upload(client: Client, url: str, tls: ssl.SSLContext | None, path: Path, *,
                 sd_id: str, fmt: str, description: str, chunk: int = CHUNK,
                 progress: Progress | None = None, content: str = "disk") -> JsonObject:
    """Upload ``path`` into a new volume of ``sd_id`` (an ISO image with ``content``
    ``iso``); returns the finalize result. A vmdk, vdi or vhdx file is sent to
    ``Volume.import``, which converts it into a qcow2 volume, and the result is the
    import's (``volume``), with the upload's ``size`` and ``sha256``."""
    size = (await asyncio.to_thread(path.stat)).st_size
    if fmt == "auto":
        fmt = await asyncio.to_thread(detect_format, path)
    digest = asyncio.create_task(asyncio.to_thread(_sha256, path), name="upload-sha256")
    if fmt in FOREIGN:
        started = await client.call("Volume.import", {
            "sd_id": sd_id, "upload": {"size": size}, "format": fmt,
            "description": description, "content": content})
        prepared = started["transfer"]
    else:
        prepared = await client.call("Volume.prepareTransfer", {
            "sd_id": sd_id, "direction": "upload", "size": size, "format": fmt,
            "description": description, "content": content})
    try:
        report = _reporter(progress, f"upload {path.name}", size)
        async with http_session(url, tls) as (session, base):
            await send_file(session, base + prepared["url"], path, size, chunk=chunk,
                            report=report)
        done = await client.call("Volume.finalizeTransfer", {
            "transfer_id": prepared["transfer_id"], "sha256": await digest}, timeout=3600)
    except BaseException:
        digest.cancel()
        with contextlib.suppress(ClientError, TimeoutError):
            await asyncio.shield(client.call("Volume.cancelTransfer",
                                             {"transfer_id": prepared["transfer_id"]},
                                             timeout=30))
        raise
    if "import_job_id" not in done:
        return done
    job = await _follow(client, done["import_job_id"], progress, f"convert {path.name}")
    if job["state"] != "succeeded":
        error = job.get("error") or {}
        raise TransferFailed(f"the agent could not import {path.name}: "
                             f"{error.get('message', job['state'])}")
    return {**job["result"], "size": done["size"], "sha256": done["sha256"]}


async def _follow(client: Client, job_id: str, progress: Progress | None,
                  what: str) -> JsonObject:
    """Wait for a job to end, drawing its progress; cancel it if interrupted."""
    task = progress.add_task(what, total=100) if progress is not None else None
    try:
        while True:
            job: JsonObject = (await client.call(
                "Job.wait", {"job_id": job_id, "timeout": 1.0}, timeout=31))["job"]
            if progress is not None and task is not None:
                progress.update(task, completed=job["progress"])
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
    except BaseException:
        with contextlib.suppress(ClientError, TimeoutError):
            await asyncio.shield(client.call("Job.cancel", {"job_id": job_id}, timeout=30))
        raise


# --- download -------------------------------------------------------------------------------


async def receive_file(session: aiohttp.ClientSession, url: str, path: Path, size: int, *,
                       report: Report = lambda _: None, retries: int = RETRIES) -> str:
    """Download into ``path``, resuming with Range after a drop; returns the SHA-256."""
    digest, position = hashlib.sha256(), 0
    with path.open("wb") as handle:
        for attempt in range(retries + 1):
            headers = {"Range": f"bytes={position}-"} if position else {}
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status not in (200, 206):
                        raise await _refusal(resp)
                    async for block in resp.content.iter_chunked(BLOCK):
                        await asyncio.to_thread(handle.write, block)
                        digest.update(block)
                        position += len(block)
                        report(position)
                if position == size:
                    break
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    TimeoutError) as exc:
                if attempt == retries:
                    raise TransferFailed(f"the connection kept dropping: {exc}") from None
                await asyncio.sleep(min(2 ** attempt * 0.5, 10))
        else:
            raise TransferFailed(f"got {position} of {size} bytes")
    return digest.hexdigest()


async def download(client: Client, url: str, tls: ssl.SSLContext | None, path: Path, *,
                   ref: JsonObject, progress: Progress | None = None) -> JsonObject:
    """Download a volume into ``path``; returns the finalize result."""
    prepared = await client.call("Volume.prepareTransfer", {**ref, "direction": "download"})
    try:
        size = prepared["size"]
        report = _reporter(progress, f"download {path.name}", size)
        async with http_session(url, tls) as (session, base):
            digest = await receive_file(session, base + prepared["url"], path, size,
                                        report=report)
        return await client.call("Volume.finalizeTransfer", {
            "transfer_id": prepared["transfer_id"], "sha256": digest}, timeout=3600)
    except BaseException:
        with contextlib.suppress(ClientError, TimeoutError):
            await asyncio.shield(client.call("Volume.cancelTransfer",
                                             {"transfer_id": prepared["transfer_id"]},
                                             timeout=30))
        raise


async def find_volume(client: Client, sd_id: str, volume: str) -> JsonObject:
    """``{sd_id, image_id, volume_id}`` of ``IMAGE/VOLUME``, or of a volume id alone."""
    image_id, _, volume_id = volume.rpartition("/")
    if image_id:
        return {"sd_id": sd_id, "image_id": image_id, "volume_id": volume_id}
    listed = (await client.call("Volume.list", {"sd_id": sd_id}))["volumes"]
    for item in listed:
        if item["volume_id"] == volume_id:
            return {"sd_id": sd_id, "image_id": item["image_id"], "volume_id": volume_id}
    raise TransferFailed(f"no volume {volume_id} in storage domain {sd_id}")


# --- progress and the command ---------------------------------------------------------------


def progress_display(stream: Any = None) -> Progress:
    """A transfer's progress bar on ``stream`` (stderr); drawn only on a terminal, and
    without colour under NO_COLOR (rich reads it)."""
    stream = stream if stream is not None else sys.stderr
    # Imported here: rich costs the agent's start (which imports the command line) 70 ms.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=stream, no_color=bool(os.environ.get("NO_COLOR")) or None)
    return Progress("[progress.description]{task.description}", BarColumn(),
                    DownloadColumn(binary_units=True), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console,
                    disable=not console.is_terminal)


def _reporter(progress: Progress | None, what: str, size: int) -> Report:
    if progress is None:
        return lambda _: None
    task = progress.add_task(what, total=size)
    return lambda done: progress.update(task, completed=done)


def add_parser(sub: Any, url_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("volume", help="upload and download volumes")
    volumes = p.add_subparsers(dest="volume_command", required=True)
    up = volumes.add_parser("upload", help="upload an image file into a new volume")
    up.add_argument("file", type=Path)
    up.add_argument("--sd", required=True, metavar="SD_ID", help="the storage domain")
    up.add_argument("--format", default="auto",
                    choices=("auto", "raw", "qcow2", *FOREIGN),
                    help="the file's format (default: told by its first bytes); vmdk, vdi "
                         "and vhdx are converted into qcow2 by the agent")
    up.add_argument("--description", default="")
    up.add_argument("--iso", action="store_true",
                    help="the file is an ISO image (install media): a shared raw volume "
                         "for CD-ROMs")
    up.add_argument("--chunk-size", type=int, default=CHUNK // MiB, metavar="MIB",
                    help=f"MiB per request (default {CHUNK // MiB})")
    down = volumes.add_parser("download", help="download a volume (without parent) into a file")
    down.add_argument("sd", metavar="SD_ID")
    down.add_argument("volume", metavar="[IMAGE_ID/]VOLUME_ID")
    down.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    for parser in (up, down):
        url_arg(parser)


async def run(args: argparse.Namespace, client: Client, tls: ssl.SSLContext | None
              ) -> JsonObject:
    """Run ``virtnode volume ...`` on a connected client; returns the finalize result."""
    with progress_display() as progress:
        if args.volume_command == "upload":
            if args.chunk_size < 1:
                raise ValueError("--chunk-size must be at least 1")
            return await upload(client, args.url, tls, args.file, sd_id=args.sd,
                                fmt=args.format, description=args.description,
                                chunk=args.chunk_size * MiB, progress=progress,
                                content="iso" if args.iso else "disk")
        ref = await find_volume(client, args.sd, args.volume)
        return await download(client, args.url, tls, args.output, ref=ref,
                              progress=progress)

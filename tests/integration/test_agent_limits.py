"""Connection floods against a real agent process.

The agent runs as ``virtnode serve`` with the usual 1,024-descriptor limit; the test opens
more connections than that, idle and slow ones, and checks that the agent keeps serving the
connections it has, answers other callers, keeps its log short, and frees what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess, start_agent
from tests.conftest import missing
from tests.polling import until
from virtnode.client import Client

pytestmark = pytest.mark.integration


def _enough_descriptors(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count), hard))


async def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _healthz(port: int, source: str) -> bytes:
    loop = asyncio.get_running_loop()
    sock = await _connect(port, source)
    try:
        await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = b""
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                head += chunk
        return head
    finally:
        sock.close()


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
async def limited_agent(tmp_path: Path) -> AgentProcess:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        missing("prlimit (util-linux) is not installed")
    _enough_descriptors(8192)
    agent = await start_agent(
        tmp_path, wrapper=(prlimit, "--nofile=1024:1024", "--"),
        sections={"server": {"idle_timeout": 2.0, "header_timeout": 1.0},
                  "log": {"level": "info"}})
    yield agent  # type: ignore[misc]
    assert await agent.stop() == 0


async def test_a_connection_flood_leaves_the_agent_serving(limited_agent: AgentProcess) -> None:
    agent = limited_agent
    client = await Client.connect(agent.tcp_url)
    held: list[socket.socket] = []
    try:
        for i in range(1100):
            held.append(await _connect(agent.tcp_port))
            if i % 5 == 0:  # a slow client: a header line now and then
                held[-1].send(b"GET /healthz HTTP/1.1\r\n")
        # The connection it already had is served throughout...
        assert await client.call("Host.ping", {}, timeout=5) is not None
        # ...and so is another caller, on a new connection.
        assert (await _healthz(agent.tcp_port, "127.0.0.2")).startswith(b"HTTP/1.1 200")
        assert _descriptors(agent.pid) < 1024 - 100
        for sock in held[::5]:
            with contextlib.suppress(OSError):
                sock.send(b"X-Slow: 1\r\n")
        # The flood's connections time out: the agent holds none of them afterwards.
        await until(lambda: _descriptors(agent.pid) < 100, 15,
                    "the agent closed the flood's connections")
        assert (await _healthz(agent.tcp_port, "127.0.0.1")).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
        await client.close()
    flood_lines = [line for line in agent.log_lines
                   if "refusing connections" in line or "accept" in line]
    assert len(flood_lines) <= 5, "".join(flood_lines)
    assert "Too many open files" not in agent.log


async def test_a_burst_of_unix_connects_fits_the_backlog(agent: AgentProcess) -> None:
    _enough_descriptors(8192)
    socks = []
    refused = 0
    started = time.monotonic()
    try:
        for _ in range(3000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(str(agent.unix_path))
            except BlockingIOError:
                refused += 1
            except OSError as exc:
                assert exc.errno == errno.EAGAIN, exc
                refused += 1
    finally:
        for sock in socks:
            sock.close()
    assert refused == 0, f"{refused} of 3000 connects refused in {time.monotonic() - started} s"

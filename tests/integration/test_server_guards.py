"""A hostile caller against a real in-process :class:`ApiServer`.

Clients that never read, batches and answers without end, connections that sit idle or
send a header line every so often, connection floods, and browsers: pages of another site
(Origin), DNS rebinding (Host) and cross-site form posts (Content-Type). Each test sends
what such a caller sends, over real sockets, and checks what the server does with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.wireserver import (
    MAX_INFLIGHT,
    Served,
    ServeFactory,
    assert_error,
    assert_result,
    call,
    request,
)
from tests.polling import until
from virtnode.config import AccessConfig, Role
from virtnode.rpc.connguard import AcceptErrors

SOFT = 256 * 1024
HARD = 4 * 1024 * 1024


# --- a WebSocket client that does not read ------------------------------------------------


def _frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455, 5.2)."""
    data = text.encode()
    mask = os.urandom(4)
    length = len(data)
    if length < 126:
        head = bytes((0x81, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x81, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def _raw_socket(port: int, source: str = "127.0.0.1",
                      buffers: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if buffers is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _read_head(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    head = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 1)
            if not chunk:
                break
            head += chunk
    return head


async def _raw_websocket(port: int, buffers: int = 16 * 1024) -> socket.socket:
    sock = await _raw_socket(port, buffers=buffers)
    key = base64.b64encode(os.urandom(16)).decode()
    await asyncio.get_running_loop().sock_sendall(sock, (
        f"GET /rpc HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    head = await _read_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _send_until_blocked(sock: socket.socket, frame: bytes, cap: int) -> int:
    """Send ``frame`` again and again without reading; the bytes sent once blocked for 1 s."""
    sent = 0
    view = memoryview(frame)
    offset = 0
    blocked_since: float | None = None
    while sent < cap:
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if now - blocked_since > 1.0:
                break
            await asyncio.sleep(0.02)
            continue
        blocked_since = None
        sent += n
        offset = (offset + n) % len(frame)
        await asyncio.sleep(0)  # one loop turn: the server, in this loop, reads meanwhile
    return sent


async def test_a_websocket_that_does_not_read_is_pushed_back(serve: ServeFactory) -> None:
    served = await serve(send_buffer_soft=SOFT, send_buffer_hard=64 * 1024 * 1024)
    sock = await _raw_websocket(served.port)
    value = "x" * 32 * 1024
    frame = _frame(request("Test.echo", {"value": value}, 1))
    cap = 48 * 1024 * 1024
    try:
        sent = await _send_until_blocked(sock, frame, cap)
        # The server stopped reading: the client's sends block long before the cap. What
        # the kernels buffer (a few MB each way on loopback) is all it got to send.
        assert sent < 24 * 1024 * 1024, f"{sent} bytes taken from a client that does not read"
        # And it holds little for the client: what it wrote before it stopped reading.
        bound = SOFT + (MAX_INFLIGHT + 1) * len(frame)
        assert served.server.unsent_bytes() <= bound
        # Everybody else is served meanwhile.
        other = await served.ws()
        assert assert_result(await call(other, "Test.echo", {"value": 1}), 1) == {"value": 1}
    finally:
        sock.close()
    await until(lambda: not served.server.unsent_bytes(), 5, "the server freed what it held")


async def test_a_websocket_past_the_hard_limit_is_closed(
        serve: ServeFactory, caplog: pytest.LogCaptureFixture) -> None:
    served = await serve(send_buffer_soft=SOFT, send_buffer_hard=HARD)
    ws = await served.ws()
    size, count = 64 * 1024, 600  # 38 MB of notifications for a client that reads none
    await ws.send_str(request("Test.flood", {"count": count, "size": size}, 1))
    await until(lambda: any("closing the WebSocket" in r.getMessage() for r in caplog.records),
                10, "the server gave up on the client")
    received = 0
    closed_with: Any = None
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                received += len(msg.data)
                continue
            closed_with = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else msg.type
            break
    assert received < HARD + 2 * size, received
    assert closed_with in (aiohttp.WSCloseCode.POLICY_VIOLATION, aiohttp.WSMsgType.CLOSED,
                           aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR), closed_with
    await until(lambda: not served.server.unsent_bytes(), 5, "the server freed what it held")
    other = await served.ws()
    assert assert_result(await call(other, "Test.echo", {"value": 2}), 1) == {"value": 2}


# --- batches and answers ------------------------------------------------------------------


async def test_a_batch_longer_than_the_limit_is_one_error(serve: ServeFactory) -> None:
    served = await serve(max_batch=10)
    ok = "[" + ",".join(request("Test.echo", {"value": i}, i) for i in range(10)) + "]"
    answer = await served.post(ok)
    assert len(answer.json()) == 10
    too_many = "[" + ",".join(request("Test.echo", {"value": i}, i) for i in range(11)) + "]"
    answer = await served.post(too_many)
    assert_error(answer.json(), -32600, None, name="InvalidRequest", reason="batch_too_large")


async def test_a_batch_of_a_million_is_refused_without_holding_the_loop(
        serve: ServeFactory) -> None:
    served = await serve(max_message_size=8 * 1024 * 1024)
    batch = "[" + ",".join(["1"] * 1_000_000) + "]"
    ws = await served.ws()
    await ws.send_str(batch)
    # Every callback on this loop (the server's too) is held to 0.5 s by loop_guard.
    health = served.session("tcp")
    started = time.perf_counter()
    async with health.get(served.url("tcp", "/healthz")) as resp:
        assert resp.status == 200
    assert time.perf_counter() - started < 2.0
    msg = await ws.receive(timeout=10)
    assert_error(json.loads(msg.data), -32600, None, reason="batch_too_large")


async def test_an_answer_larger_than_the_limit_is_an_error(serve: ServeFactory) -> None:
    served = await serve(max_answer_size=256 * 1024)
    ws = await served.ws()
    small = assert_result(await call(ws, "Test.blob", {"size": 1000}, "small"), "small")
    assert len(small["data"]) == 1000
    assert_error(await call(ws, "Test.blob", {"size": 300 * 1024}, "big"), 8, "big",
                 name="ResourceExhausted", reason="answer_too_large")
    # In a batch the answers share the limit: the ones past it become errors.
    batch = "[" + ",".join(request("Test.blob", {"size": 100 * 1024}, i) for i in range(4)) + "]"
    answers = (await served.post(batch)).json()
    assert [("result" in a) for a in answers] == [True, True, False, False]
    assert_error(answers[3], 8, 3, reason="answer_too_large")


# --- connections: timeouts and caps -------------------------------------------------------


async def _closed_within(sock: socket.socket, seconds: float,
                         drip: bytes | None = None) -> float:
    """Seconds until the server closes ``sock``; sends ``drip`` every 0.1 s meanwhile."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while True:
            if drip is not None:
                with contextlib.suppress(OSError):
                    sock.send(drip)
            try:
                async with asyncio.timeout(0.1):
                    data = await loop.sock_recv(sock, 4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return time.monotonic() - started
            if not data:
                return time.monotonic() - started


async def test_an_idle_connection_is_closed(serve: ServeFactory) -> None:
    served = await serve(idle_timeout=0.5, header_timeout=0.3)
    sock = await _raw_socket(served.port)
    try:
        assert await _closed_within(sock, 5) < 3
    finally:
        sock.close()


async def test_a_client_that_sends_headers_slowly_is_closed(serve: ServeFactory) -> None:
    served = await serve(idle_timeout=30.0, header_timeout=0.5)
    sock = await _raw_socket(served.port)
    try:
        sock.send(b"GET /healthz HTTP/1.1\r\n")
        # A header line every 0.1 s: never idle, never done.
        assert await _closed_within(sock, 5, drip=b"X-Slow: 1\r\n") < 3
    finally:
        sock.close()


async def test_keep_alive_connections_idle_out_but_websockets_stay(serve: ServeFactory) -> None:
    served = await serve(idle_timeout=0.5, header_timeout=0.5)
    ws = await served.ws()
    sock = await _raw_socket(served.port)
    try:
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await _closed_within(sock, 5) < 3
    finally:
        sock.close()
    assert assert_result(await call(ws, "Test.echo", {"value": 3}), 1) == {"value": 3}


async def _refused(sock: socket.socket) -> bool:
    """Whether the server answered ``sock`` with 503 too_many_connections."""
    head = await _read_head(sock)
    return head.startswith(b"HTTP/1.1 503")


async def test_connections_are_capped_per_caller_and_per_listener(serve: ServeFactory) -> None:
    served = await serve(max_connections=6, max_connections_per_caller=3)
    loop = asyncio.get_running_loop()
    held = [await _raw_socket(served.port) for _ in range(3)]
    try:
        extra = await _raw_socket(served.port)
        held.append(extra)
        assert await _refused(extra)
        # Another caller (another loopback address) is not held back by the first.
        for _ in range(3):
            held.append(await _raw_socket(served.port, source="127.0.0.2"))
        # The listener is full now: a third caller is refused too.
        third = await _raw_socket(served.port, source="127.0.0.3")
        held.append(third)
        assert await _refused(third)
        # Those it has keep being served.
        await loop.sock_sendall(held[0], b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await _read_head(held[0])).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    # Closed connections free their places.
    async with asyncio.timeout(5):
        while True:
            sock = await _raw_socket(served.port)
            try:
                await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                if (await _read_head(sock)).startswith(b"HTTP/1.1 200"):
                    break
            finally:
                sock.close()
            await asyncio.sleep(0.05)


def test_accept_errors_are_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        AcceptErrors.install(loop)
        with caplog.at_level(logging.ERROR):
            for _ in range(10_000):
                loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                })
            loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(accept) == 1
    assert any("something else" in r.getMessage() for r in caplog.records)


# --- browsers -----------------------------------------------------------------------------


@pytest.fixture
async def admin_tcp(serve: ServeFactory) -> Served:
    """The development set-up: loopback TCP callers are admins."""
    return await serve(AccessConfig(unix_admin_uids=(0,), tcp_role=Role.ADMIN))


@pytest.mark.parametrize("origin", [
    "http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}",
    "http://rebind.evil.example:{port}",
])
async def test_a_websocket_from_another_origin_is_refused(admin_tcp: Served,
                                                          origin: str) -> None:
    origin = origin.format(port=admin_tcp.port)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await admin_tcp.session("tcp").ws_connect(admin_tcp.url("tcp"),
                                                  headers={"Origin": origin})
    assert refused.value.status == 403


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:{port}", "http://localhost:{port}"])
async def test_the_listeners_own_origin_and_no_origin_are_served(admin_tcp: Served,
                                                                 origin: str | None) -> None:
    headers = {} if origin is None else {"Origin": origin.format(port=admin_tcp.port)}
    ws = await admin_tcp.session("tcp").ws_connect(admin_tcp.url("tcp"), headers=headers)
    assert assert_result(await call(ws, "Test.write", {"name": "n"}), 1) == {"written": "n"}


async def _post(served: Served, headers: dict[str, str], via: str = "tcp") -> tuple[int, Any]:
    body = request("Test.write", {"name": "n"}, 1)
    async with served.session(via).post(served.url(via), data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
async def test_a_post_that_is_not_json_is_refused(admin_tcp: Served,
                                                  content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, answer = await _post(admin_tcp, headers)
    assert status == 415
    assert_error(answer, -32600, None, reason="content_type")


async def test_a_cross_site_post_is_refused(admin_tcp: Served) -> None:
    status, answer = await _post(admin_tcp, {"Content-Type": "application/json",
                                             "Origin": "http://evil.example"})
    assert status == 403
    assert_error(answer, 7, None, name="PermissionDenied", reason="bad_origin")


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:{port}", ""])
async def test_a_host_that_is_not_the_listeners_is_refused(admin_tcp: Served,
                                                           host: str) -> None:
    status, answer = await _post(admin_tcp, {"Content-Type": "application/json",
                                             "Host": host.format(port=admin_tcp.port)})
    assert status == 403
    assert_error(answer, 7, None, name="PermissionDenied", reason="bad_host")


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  socket.gethostname()])
async def test_the_listeners_names_are_accepted_as_host(admin_tcp: Served, host: str) -> None:
    status, answer = await _post(admin_tcp, {"Content-Type": "application/json",
                                             "Host": host.format(port=admin_tcp.port)})
    assert status == 200
    assert assert_result(answer, 1) == {"written": "n"}


async def test_allowed_hosts_extend_the_names(serve: ServeFactory) -> None:
    served = await serve(allowed_hosts=("agent.example.org",))
    status, _ = await _post(served, {"Content-Type": "application/json",
                                     "Host": "agent.example.org"})
    assert status == 200


async def test_unix_clients_may_name_any_host(admin_tcp: Served) -> None:
    status, answer = await _post(admin_tcp, {"Content-Type": "application/json",
                                             "Host": "whatever"}, via="unix")
    assert status == 200
    assert assert_result(answer, 1) == {"written": "n"}


"""A blocking WebSocket client that sends any bytes: for fuzzing, where a real client
would refuse to write what the test means to send (invalid UTF-8, lone surrogates)."""

from __future__ import annotations

import base64
import contextlib
import os
import socket

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def _frame(opcode: int, data: bytes) -> bytes:
    """A masked client frame (RFC 6455, 5.2)."""
    mask = os.urandom(4)
    length = len(data)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return head + mask + masked


class BlockingWebSocket:
    """One WebSocket to ``GET /rpc`` over a unix or TCP socket."""

    def __init__(self, sock: socket.socket, host: str = "localhost") -> None:
        self._sock = sock
        self._buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /rpc HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"no WebSocket upgrade: {head[:200]!r}")

    @classmethod
    def unix(cls, path: str, timeout: float = 30.0) -> BlockingWebSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 30.0) -> BlockingWebSocket:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock, f"{host}:{port}")

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def send(self, data: bytes, opcode: int = BINARY) -> None:
        self._sock.sendall(_frame(opcode, data))

    def receive(self) -> tuple[int, bytes]:
        """The next data or close frame (opcode, payload); pings are answered on the way."""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self._read(2), "big")
            elif length == 127:
                length = int.from_bytes(self._read(8), "big")
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == PING:
                self.send(payload, PONG)
                continue
            if opcode in (TEXT, BINARY, CLOSE):
                return opcode, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"\x03\xe8", CLOSE)
        self._sock.close()

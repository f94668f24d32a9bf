"""What a VNC client sends to QEMU, checked and filtered: a pure state machine, no I/O.

The agent bridges a WebSocket to QEMU's VNC server (RFB, RFC 6143). It reads every byte a
client sends: the handshake must be the one the agent set up (no authentication, since
the agent opened the display with libvirt's SKIPAUTH), the shared flag is forced on (QEMU
would otherwise disconnect the other viewers: the agent's takeover rules decide who stays),
and after the handshake each message is parsed by its type so its length is known. A
view-only session drops the messages that act on the guest (keys, pointer, clipboard,
desktop size, power actions) and keeps those that only ask for pictures. A message type
the agent does not know ends the session: its length cannot be known, and passing bytes
on blind would let a view-only client smuggle input.

Server to client bytes are not parsed; they come from QEMU.
"""

from __future__ import annotations

import re
import struct

SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
XVP = 251
SET_DESKTOP_SIZE = 253
QEMU = 255
QEMU_EXTENDED_KEY = 0
QEMU_AUDIO = 1

#: Messages a viewer may send: they change what the agent's client is sent, not the guest.
VIEW_ONLY_ALLOWED = frozenset({SET_PIXEL_FORMAT, SET_ENCODINGS, FRAMEBUFFER_UPDATE_REQUEST,
                               ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE})
#: Longest clipboard text a client may send (QEMU itself takes up to 1 MiB).
MAX_CUT_TEXT = 1 << 20
#: Most encodings one SetEncodings may list (clients send a few dozen).
MAX_ENCODINGS = 1024
SECURITY_NONE = 1

_VERSION = re.compile(rb"RFB 00([0-9])\.00([0-9])\n")


class RfbError(Exception):
    """The client broke the protocol; the session must end."""


class ClientFilter:
    """Feed it what the client sent, in any pieces; it returns what QEMU may receive."""

    def __init__(self, *, view_only: bool) -> None:
        self.view_only = view_only
        self._buf = bytearray()
        self._phase = "version"
        #: Bytes of a clipboard message's text still to pass on (or drop).
        self._body_left = 0
        self._body_dropped = False
        #: Messages dropped (view-only), for the session's notice to its viewer.
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Raises :class:`RfbError` on anything that is not RFB as the agent set it up."""
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._body_left:
                n = min(self._body_left, len(self._buf))
                if not self._body_dropped:
                    out += self._buf[:n]
                del self._buf[:n]
                self._body_left -= n
                continue
            step = getattr(self, f"_{self._phase}")(out)
            if not step:
                break
        return bytes(out)

    def _version(self, out: bytearray) -> bool:
        if len(self._buf) < 12:
            if not b"RFB 00"[:len(self._buf)] == bytes(self._buf[:6]):
                raise RfbError("not an RFB client")
            return False
        match = _VERSION.fullmatch(bytes(self._buf[:12]))
        if match is None:
            raise RfbError("not an RFB protocol version")
        major, minor = int(match.group(1)), int(match.group(2))
        if major != 3:
            raise RfbError(f"RFB {major}.{minor} is not spoken here")
        out += self._buf[:12]
        del self._buf[:12]
        # RFB 3.3 has the server pick the security type; 3.7 and 3.8 the client.
        self._phase = "security" if minor >= 7 else "client_init"
        return True

    def _security(self, out: bytearray) -> bool:
        if self._buf[0] != SECURITY_NONE:
            raise RfbError(f"security type {self._buf[0]} was not offered")
        out.append(SECURITY_NONE)
        del self._buf[:1]
        self._phase = "client_init"
        return True

    def _client_init(self, out: bytearray) -> bool:
        out.append(1)  # shared: the agent decides who is disconnected, not QEMU
        del self._buf[:1]
        self._phase = "messages"
        return True

    def _messages(self, out: bytearray) -> bool:
        sizes = _message_size(self._buf)
        if sizes is None:
            return False
        head, body = sizes
        kind = self._buf[0]
        allowed = self._buf[1] == QEMU_AUDIO if kind == QEMU else kind in VIEW_ONLY_ALLOWED
        drop = self.view_only and not allowed
        if drop:
            self.dropped += 1
        else:
            out += self._buf[:head]
        del self._buf[:head]
        self._body_left, self._body_dropped = body, drop
        return True


def _message_size(buf: bytearray) -> tuple[int, int] | None:
    """``(header, body)`` lengths of the message at the start of ``buf``: the header is
    passed on whole, the body streamed. None: more bytes are needed to tell."""
    kind = buf[0]
    fixed = {SET_PIXEL_FORMAT: 20, FRAMEBUFFER_UPDATE_REQUEST: 10, KEY_EVENT: 8,
             POINTER_EVENT: 6, ENABLE_CONTINUOUS_UPDATES: 10, XVP: 4}
    if kind in fixed:
        return _whole(buf, fixed[kind])
    if kind == SET_ENCODINGS:
        if len(buf) < 4:
            return None
        (count,) = struct.unpack_from(">H", buf, 2)
        if count > MAX_ENCODINGS:
            raise RfbError(f"SetEncodings lists {count} encodings")
        return _whole(buf, 4 + 4 * count)
    if kind == CLIENT_CUT_TEXT:
        if len(buf) < 8:
            return None
        (length,) = struct.unpack_from(">i", buf, 4)
        # A negative length is the extended clipboard's: its size is the absolute value.
        if abs(length) > MAX_CUT_TEXT:
            raise RfbError(f"clipboard text of {abs(length)} bytes")
        return 8, abs(length)
    if kind == CLIENT_FENCE:
        if len(buf) < 9:
            return None
        length = buf[8]
        if length > 64:
            raise RfbError("fence payload longer than 64 bytes")
        return _whole(buf, 9 + length)
    if kind == SET_DESKTOP_SIZE:
        if len(buf) < 8:
            return None
        return _whole(buf, 8 + 16 * buf[6])
    if kind == QEMU:
        if len(buf) < 2:
            return None
        if buf[1] == QEMU_EXTENDED_KEY:
            return _whole(buf, 12)
        if buf[1] == QEMU_AUDIO:
            if len(buf) < 4:
                return None
            (operation,) = struct.unpack_from(">H", buf, 2)
            if operation in (0, 1):
                return _whole(buf, 4)
            if operation == 2:
                return _whole(buf, 10)
            raise RfbError(f"unknown QEMU audio operation {operation}")
        raise RfbError(f"unknown QEMU client message {buf[1]}")
    raise RfbError(f"unknown client message type {kind}")


def _whole(buf: bytearray, size: int) -> tuple[int, int] | None:
    return (size, 0) if len(buf) >= size else None

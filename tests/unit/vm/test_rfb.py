"""The VNC client filter: the handshake as the agent set it up, messages by their lengths."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnode.vm.rfb import ClientFilter, RfbError

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x00"
SET_PIXEL_FORMAT = b"\x00\x00\x00\x00" + bytes(16)
SET_ENCODINGS = b"\x02\x00\x00\x02" + struct.pack(">ii", 0, -223)
UPDATE_REQUEST = b"\x03\x01" + struct.pack(">HHHH", 0, 0, 640, 480)
KEY = b"\x04\x01\x00\x00" + struct.pack(">I", 0x61)
POINTER = b"\x05\x01" + struct.pack(">HH", 10, 10)
CUT_TEXT = b"\x06\x00\x00\x00" + struct.pack(">i", 5) + b"hello"
EXTENDED_CUT = b"\x06\x00\x00\x00" + struct.pack(">i", -4) + b"\x00\x00\x00\x01"
QEMU_KEY = b"\xff\x00\x00\x01" + struct.pack(">II", 0x61, 30)
XVP_REBOOT = b"\xfb\x00\x01\x03"
DESKTOP_SIZE = b"\xfd\x00" + struct.pack(">HH", 800, 600) + b"\x01\x00" + bytes(16)
FENCE = b"\xf8\x00\x00\x00" + struct.pack(">I", 0) + b"\x02ab"
VIEWING = SET_PIXEL_FORMAT + SET_ENCODINGS + UPDATE_REQUEST + FENCE
ACTING = KEY + POINTER + CUT_TEXT + EXTENDED_CUT + QEMU_KEY + XVP_REBOOT + DESKTOP_SIZE


def run(data: bytes, *, view_only: bool, pieces: int = 1) -> bytes:
    flt = ClientFilter(view_only=view_only)
    size = max(1, len(data) // pieces)
    return b"".join(flt.feed(data[at:at + size]) for at in range(0, len(data), size))


def test_a_writer_passes_everything_and_is_always_shared() -> None:
    sent = HANDSHAKE + VIEWING + ACTING
    assert run(sent, view_only=False) == b"RFB 003.008\n\x01\x01" + VIEWING + ACTING


def test_a_viewer_only_asks_for_pictures() -> None:
    sent = HANDSHAKE + KEY + VIEWING + ACTING + UPDATE_REQUEST
    assert run(sent, view_only=True) == b"RFB 003.008\n\x01\x01" + VIEWING + UPDATE_REQUEST


@given(st.integers(min_value=1, max_value=200))
def test_pieces_of_any_size_filter_the_same(pieces: int) -> None:
    sent = HANDSHAKE + KEY + VIEWING + ACTING + UPDATE_REQUEST
    assert run(sent, view_only=True, pieces=pieces) == run(sent, view_only=True)


def test_rfb_3_3_has_no_security_choice() -> None:
    assert run(b"RFB 003.003\n\x00" + UPDATE_REQUEST, view_only=True) == \
        b"RFB 003.003\n\x01" + UPDATE_REQUEST


@pytest.mark.parametrize("sent", [
    b"GET / HTTP/1.1\r\n", b"RFB 004.000\n", b"RFB 003.008\n\x02",
    HANDSHAKE + b"\x07" + bytes(20),
    HANDSHAKE + b"\x06\x00\x00\x00" + struct.pack(">i", 1 << 24),
    HANDSHAKE + b"\x02\x00\xff\xff",
    HANDSHAKE + b"\xff\x09\x00\x00",
], ids=["http", "version", "vnc-auth", "unknown-type", "huge-cut-text", "many-encodings",
        "unknown-qemu"])
def test_what_is_not_rfb_ends_the_session(sent: bytes) -> None:
    with pytest.raises(RfbError):
        run(sent, view_only=True)

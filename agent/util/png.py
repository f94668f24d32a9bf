"""Screenshots as PNG: reading a PNG's size, and PPM (what older QEMU gives) into PNG.

A PNG encoder is a signature and three chunks (RFC 2083): IHDR, the rows each behind a
filter byte, deflated (IDAT), IEND. That is a few lines of ``zlib`` and ``struct``: no
imaging library for it.
"""

from __future__ import annotations

import re
import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Widest and tallest picture taken (QEMU's displays stay far below).
MAX_SIDE = 16384

_PPM_HEADER = re.compile(rb"P6(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)"
                         rb"(?:\s+|#[^\n]*\n)+(\d+)\s")


class ImageError(ValueError):
    """Not an image of the kind expected, or too big."""


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header."""
    if not data.startswith(SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 24:
        raise ImageError("not a PNG image")
    width, height = struct.unpack_from(">II", data, 16)
    return int(width), int(height)


def ppm_to_png(data: bytes) -> tuple[bytes, int, int]:
    """A binary PPM (P6, 8 bits) as PNG: ``(png, width, height)``."""
    match = _PPM_HEADER.match(data)
    if match is None:
        raise ImageError("not a binary PPM image")
    width, height, maxval = (int(group) for group in match.groups())
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or maxval != 255:
        raise ImageError(f"a {width}x{height} PPM with maxval {maxval} is not taken")
    pixels = memoryview(data)[match.end():]
    stride = width * 3
    if len(pixels) < stride * height:
        raise ImageError("the PPM image is cut short")
    raw = b"".join(b"\x00" + pixels[row * stride:(row + 1) * stride]
                   for row in range(height))
    png = b"".join((SIGNATURE,
                    _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                    _chunk(b"IDAT", zlib.compress(raw, 6)),
                    _chunk(b"IEND", b"")))
    return png, width, height


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

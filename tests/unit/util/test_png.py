"""PPM to PNG, and a PNG's size."""

from __future__ import annotations

import struct
import zlib

import pytest

from virtnode.util.png import ImageError, png_size, ppm_to_png


def test_a_ppm_becomes_a_png_with_the_same_pixels() -> None:
    pixels = bytes(range(2 * 3 * 3))
    png, width, height = ppm_to_png(b"P6\n# made by QEMU\n3 2\n255\n" + pixels)
    assert (width, height) == (3, 2) == png_size(png)
    (length,) = struct.unpack_from(">I", png, 33)
    assert png[37:41] == b"IDAT"
    raw = zlib.decompress(png[41:41 + length])
    assert raw == b"\x00" + pixels[:9] + b"\x00" + pixels[9:]
    assert png.endswith(b"IEND\xaeB`\x82")


@pytest.mark.parametrize("data", [b"P5\n1 1\n255\n\x00", b"P6\n2 2\n255\n\x00",
                                  b"P6\n1 1\n65535\n\x00\x00\x00", b"P6\n0 1\n255\n",
                                  b"P6\n99999 1\n255\n"])
def test_what_is_not_a_whole_8_bit_ppm_is_refused(data: bytes) -> None:
    with pytest.raises(ImageError):
        ppm_to_png(data)


def test_png_size_wants_a_png() -> None:
    with pytest.raises(ImageError):
        png_size(b"GIF89a" + bytes(30))

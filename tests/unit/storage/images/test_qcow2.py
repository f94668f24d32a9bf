"""Reading what a qcow2 header names: its backing file and an external data file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from virtnode.storage.images import qcow2
from virtnode.storage.images.qcow2 import Header, NotQcow2


def header(*, version: int = 3, backing: bytes | None = None, features: int = 0,
           magic: bytes = qcow2.MAGIC) -> bytes:
    """The first bytes of a qcow2 image as qemu-img writes them (the fields read here)."""
    fixed = bytearray(104)
    offset = 0x200 if backing is not None else 0
    struct.pack_into(">4sIQI", fixed, 0, magic, version, offset,
                     len(backing) if backing is not None else 0)
    struct.pack_into(">Q", fixed, 72, features)
    data = bytes(fixed) + bytes(0x200 - len(fixed))
    return data + (backing or b"")


def parse(data: bytes) -> Header:
    return qcow2.parse(lambda offset, length: data[offset:offset + length])


def test_an_image_without_backing_file() -> None:
    assert parse(header()) == Header(3, None, False)
    assert parse(header(version=2)) == Header(2, None, False)


def test_the_backing_file_name_as_written() -> None:
    assert parse(header(backing=b"../img/vol")).backing_file == "../img/vol"
    assert parse(header(backing=b"json:{}")).backing_file == "json:{}"
    # Bytes that are not UTF-8 survive, and never equal a name the agent writes.
    assert parse(header(backing=b"/etc/\xffx")).backing_file == "/etc/\udcffx"


def test_an_external_data_file_is_seen() -> None:
    assert parse(header(features=qcow2.INCOMPAT_DATA_FILE)).data_file
    assert not parse(header(version=2, features=qcow2.INCOMPAT_DATA_FILE)).data_file


@pytest.mark.parametrize("data", [
    b"", b"QFI", header(magic=b"QFI\x00"), header(version=4), header(version=1),
    header()[:60], header(backing=b"x" * 1024), header(backing=b"abc")[:-1],
])
def test_what_is_not_a_qcow2_header_is_refused(data: bytes) -> None:
    with pytest.raises(NotQcow2):
        parse(data)


def test_read_header_reads_an_open_file(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(header(backing=b"base"))
    fd = os.open(image, os.O_RDONLY)
    try:
        assert qcow2.read_header(fd).backing_file == "base"
    finally:
        os.close(fd)

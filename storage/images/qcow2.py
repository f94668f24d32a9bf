"""What a qcow2 header says about other files: its backing file and external data file.

A qcow2 image names the files QEMU should open with it: a backing file (any string: a
path relative to the image, an absolute one, or a ``json:``/protocol name) and, in
version 3, an external data file. Whoever wrote the header chooses them, so the volume
layer compares them with its own metadata before it uses an image and never lets qemu-img
or libvirt follow them (see :class:`virtnode.storage.images.qemuimg.Chain`).

Only the fixed part of the header and the backing file name are read (big-endian)::

    0   magic "QFI\\xfb"          4   version (2 or 3)
    8   backing_file_offset       16  backing_file_size (at most 1023 bytes)
    72  incompatible_features     (version 3; bit 2: an external data file)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
#: The incompatible feature bit of an image whose data is in another file.
INCOMPAT_DATA_FILE = 1 << 2
#: QEMU refuses longer backing file names.
MAX_BACKING_NAME = 1023
_FIXED_V2 = struct.Struct(">4sIQI")
_V3_FEATURES = struct.Struct(">Q")
_V3_FEATURES_AT = 72


class NotQcow2(ValueError):
    """The file does not start with a qcow2 header this module understands."""


@dataclass(frozen=True)
class Header:
    version: int
    #: The backing file name as written (bytes that are not UTF-8 kept as surrogates).
    backing_file: str | None
    #: The image keeps its data in an external file named in a header extension.
    data_file: bool


def parse(read: Callable[[int, int], bytes]) -> Header:
    """Parse a header through ``read(offset, length)``, which returns what is there (less
    at the end of the file). Raises :class:`NotQcow2`."""
    fixed = read(0, _FIXED_V2.size)
    if len(fixed) < _FIXED_V2.size:
        raise NotQcow2("too short for a qcow2 header")
    magic, version, backing_offset, backing_size = _FIXED_V2.unpack(fixed)
    if magic != MAGIC:
        raise NotQcow2("no qcow2 magic")
    if version not in (2, 3):
        raise NotQcow2(f"qcow2 version {version}")
    data_file = False
    if version == 3:
        features = read(_V3_FEATURES_AT, _V3_FEATURES.size)
        if len(features) < _V3_FEATURES.size:
            raise NotQcow2("the version 3 header is cut short")
        data_file = bool(_V3_FEATURES.unpack(features)[0] & INCOMPAT_DATA_FILE)
    backing = None
    if backing_offset:
        if backing_size > MAX_BACKING_NAME:
            raise NotQcow2(f"a backing file name of {backing_size} bytes")
        name = read(backing_offset, backing_size)
        if len(name) < backing_size:
            raise NotQcow2("the backing file name lies past the end of the file")
        backing = name.decode("utf-8", "surrogateescape")
    return Header(version, backing, data_file)


def read_header(fd: int) -> Header:
    """Read the header of the file open as ``fd`` (the caller opened and checked it).
    Raises :class:`NotQcow2` and ``OSError``."""
    return parse(lambda offset, length: os.pread(fd, length, offset))

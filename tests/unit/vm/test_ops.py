"""Blocking helpers of the VM service that need no libvirt."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from virtnode.vm.ops import names_backing


def qcow2_header(backing_offset: int) -> bytes:
    # magic, version, backing_file_offset, backing_file_size: all qemu-img reads here.
    return b"QFI\xfb" + struct.pack(">IQI", 3, backing_offset, 8) + bytes(100)


def test_a_qcow2_image_naming_a_backing_file(tmp_path: Path) -> None:
    (tmp_path / "overlay.qcow2").write_bytes(qcow2_header(512))
    (tmp_path / "alone.qcow2").write_bytes(qcow2_header(0))
    assert names_backing(str(tmp_path / "overlay.qcow2"))
    assert not names_backing(str(tmp_path / "alone.qcow2"))


def test_anything_else_names_none(tmp_path: Path) -> None:
    (tmp_path / "raw.img").write_bytes(b"\0" * 4096)
    (tmp_path / "short").write_bytes(b"QFI\xfb")
    os.mkfifo(tmp_path / "fifo")  # must not block
    for name in ("raw.img", "short", "fifo", "absent"):
        assert not names_backing(str(tmp_path / name))

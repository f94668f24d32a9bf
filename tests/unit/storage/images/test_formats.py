"""The format an image's first bytes announce, told without qemu-img."""

from __future__ import annotations

import pytest

from virtnode.storage.images import formats


@pytest.mark.parametrize(("head", "expected"), [
    (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
    (b"KDMV\x01\x00\x00\x00", "vmdk"),
    (b"# Disk DescriptorFile\nversion=1\n", formats.VMDK_DESCRIPTOR),
    (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + b"\x7f\x10\xda\xbe",
     "vdi"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"LUKS\xba\xbe\x00\x02", "luks"),
    (b"\xeb\x63\x90" + bytes(509), "raw"),  # a boot sector
    (b"", "raw"),
])
def test_sniff(head: bytes, expected: str) -> None:
    assert formats.sniff(head) == expected


def test_only_plain_one_file_formats_are_importable() -> None:
    assert formats.VMDK_DESCRIPTOR not in formats.IMPORTABLE
    assert "luks" not in formats.IMPORTABLE

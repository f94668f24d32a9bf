"""Which image format a file's first bytes announce, read by the agent itself.

qemu-img can guess a format (``qemu-img info`` without ``-f``), but it tries every driver
it has, and some of them open other files named inside the image (a VMDK descriptor names
its extents by path). Images from outside the agent (uploads, imports) are sniffed here
instead: the formats the agent takes in are told by their magic, anything else that
announces a format is refused by name, and only a file that announces none is raw. The
format found is then passed to qemu-img with ``-f``.
"""

from __future__ import annotations

#: How many bytes of the file :func:`sniff` wants.
HEAD_SIZE = 512

#: (offset, magic, format). The five formats imports take come first; the others are
#: here so that a file in one of them is never taken for raw.
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),  # hosted sparse extent (monolithicSparse, streamOptimized)
    (0, b"COWD", "vmdk"),  # ESX sparse extent
    (0, b"# Disk DescriptorFile", "vmdk-descriptor"),  # it names the files of its data
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)

#: A VMDK that is only a descriptor: its data lies in the files it names.
VMDK_DESCRIPTOR = "vmdk-descriptor"
#: Formats whose images the agent converts into volumes.
IMPORTABLE = ("raw", "qcow2", "vmdk", "vdi", "vhdx")


def sniff(head: bytes) -> str:
    """The format the first bytes of a file announce (``raw`` when none does)."""
    for offset, magic, name in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "raw"

"""Checks of images that come from outside the agent (uploads, imports) before anything
uses them.

Whoever made such a file chose every byte of it, headers included, so before it becomes
a volume or the source of one it must be one self-contained image in the format it is
taken for:

1. :func:`examine` (blocking) reads the first bytes and, for qcow2, the header itself:
   the format the file announces (:func:`formats.sniff`), and any backing file or
   external data file the header names. Nothing else has opened the file yet.
2. :func:`probe` runs ``qemu-img info -f FORMAT`` (a qcow2 opened with no backing, so
   the header's name is never followed) and refuses a backing file, an external data
   file, a VMDK whose data lies in other files, and encryption.
3. :func:`verify` runs ``qemu-img check`` on a qcow2 and refuses corruption (leaks, mere
   lost space, are accepted).

Every refusal is a :class:`Refused` with a stable ``reason``; the volume layer turns it
into the API's error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from virtnode.storage.images import formats, qcow2, qemuimg


class Refused(ValueError):
    """The image is not acceptable; ``reason`` says why in a word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Examined:
    """What the agent read of the file itself."""

    format: str
    size: int


#: Where an ISO 9660 image says what it is: its first volume descriptor (sector 16 of
#: 2048 bytes) starts with a type byte, then "CD001".
ISO9660_MAGIC_AT = 16 * 2048 + 1
ISO9660_MAGIC = b"CD001"


def require_iso9660(fd: int) -> None:
    """Refuse (``not_iso``) a file that is not an ISO 9660 image. Blocking."""
    if os.pread(fd, len(ISO9660_MAGIC), ISO9660_MAGIC_AT) != ISO9660_MAGIC:
        raise Refused("not_iso", "the image is not an ISO 9660 image (no CD001 volume "
                      "descriptor at sector 16)")


def examine(fd: int) -> Examined:
    """Sniff the format of the file open as ``fd`` and check a qcow2 header for files it
    names. Blocking. Raises :class:`Refused` (``backing_file``, ``external_data_file``,
    ``unsupported_format``) and ``OSError``."""
    head = os.pread(fd, formats.HEAD_SIZE, 0)
    found = formats.sniff(head)
    size = os.fstat(fd).st_size
    if found == "qcow2":
        try:
            header = qcow2.read_header(fd)
        except qcow2.NotQcow2 as exc:
            raise Refused("unsupported_format", f"a qcow2 header this agent cannot read "
                          f"({exc})") from None
        if header.backing_file is not None:
            raise Refused("backing_file", "the image names a backing file "
                          f"({header.backing_file[:200]!r}); only self-contained images "
                          "are taken in")
        if header.data_file:
            raise Refused("external_data_file", "the image keeps its data in an external "
                          "data file; only self-contained images are taken in")
    elif found == formats.VMDK_DESCRIPTOR:
        raise Refused("external_extents", "a VMDK descriptor keeps its data in other "
                      "files; take in a one-file VMDK (monolithicSparse or "
                      "streamOptimized)")
    return Examined(found, size)


async def probe(path: str, fmt: str, *, timeout: float) -> qemuimg.ImageInfo:
    """``qemu-img info`` of the image at the absolute ``path`` in a known format, refusing
    what makes it depend on other files or a key. Raises :class:`Refused` and
    :class:`qemuimg.QemuImgError`."""
    image: str | qemuimg.Chain = path
    if fmt in qemuimg.CHAIN_FORMATS:
        image = qemuimg.Chain.of((path, fmt))
    try:
        info = await qemuimg.info(image, fmt=None if isinstance(image, qemuimg.Chain) else fmt,
                                  backing_chain=False, timeout=timeout)
    except qemuimg.Timeout:
        raise
    except qemuimg.QemuImgError as exc:
        raise Refused("unreadable_image", f"qemu-img cannot read it as {fmt}: "
                      f"{exc.stderr[-500:]}") from None
    if info.backing_file is not None:
        raise Refused("backing_file", "the image names a backing file "
                      f"({info.backing_file[:200]!r}); only self-contained images are "
                      "taken in")
    if info.data_file is not None:
        raise Refused("external_data_file", "the image keeps its data in an external data "
                      "file; only self-contained images are taken in")
    # qemu-img names an extent as it opened it: the image itself by the name it was given.
    if any(extent != path for extent in info.extents):
        raise Refused("external_extents", "the VMDK keeps data in other files")
    if info.encrypted:
        raise Refused("encrypted", "the image is encrypted; the agent has no key for it")
    return info


async def verify(path: str, fmt: str, *, timeout: float) -> None:
    """``qemu-img check`` of a qcow2 (other formats have nothing to check). Raises
    :class:`Refused` (``image_corrupt``) and :class:`qemuimg.QemuImgError`."""
    if fmt != "qcow2":
        return
    result = await qemuimg.check(qemuimg.Chain.of((path, fmt)), timeout=timeout)
    if result.corruptions or result.check_errors:
        raise Refused("image_corrupt", f"qemu-img check found {result.corruptions} "
                      f"corruptions and {result.check_errors} errors in the image")

"""Blocking file work on volumes: finding them, their chains and children, making and
removing their files, and the crash-recovery scan. Run it off the event loop.

A volume's metadata names its parent by volume id only. The parent lies in the same image
(a snapshot layer) or, for a clone, in another image of the same domain: the parent is then
a template (role ``shared``) and is found by looking through the domain's images. Volume
ids are UUIDs the agent generates, so one id names one volume in a domain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from virtnode.errors import FailedPrecondition
from virtnode.storage import layout as lay
from virtnode.storage.images import qcow2
from virtnode.storage.layout import DomainLayout, MetadataError, VolumeMetadata
from virtnode.util.files import fsync_dir, fsync_file, make_dir

log = logging.getLogger(__name__)

#: Longest chain followed; a longer one is a loop in damaged metadata.
MAX_CHAIN = 128


@dataclass(frozen=True)
class Listed:
    """A volume with readable metadata; its data file has not been looked at, and may be
    missing or damaged. Enough to know the volume's place in its chain, to change its
    metadata and to remove it."""

    image_id: str
    volume_id: str
    metadata: VolumeMetadata


@dataclass(frozen=True)
class Found(Listed):
    """A volume with readable metadata, and where its data is.

    ``path`` is the volume's data file, checked (inside the domain, no symlink on the way,
    a regular file with one link) in the I/O thread that read the volume: code on the
    event loop uses it as it is and never checks a path itself (that reads the
    filesystem, which may hang).
    """

    path: Path

    @classmethod
    def at(cls, layout: DomainLayout, image_id: str, volume_id: str,
           metadata: VolumeMetadata) -> Found:
        """The volume with its checked path. Blocking; raises :class:`UnsafePath`."""
        return cls(image_id, volume_id, metadata, layout.volume_path(image_id, volume_id))

    @classmethod
    def of(cls, layout: DomainLayout, listed: Listed) -> Found:
        """``listed`` with its data file checked. Raises :class:`UnsafePath`."""
        return cls.at(layout, listed.image_id, listed.volume_id, listed.metadata)


V = TypeVar("V", bound=Listed)


def locate(layout: DomainLayout, volume_id: str, image_hint: str | None = None) -> Listed:
    """The volume ``volume_id``, looked for first in ``image_hint`` then in every image.

    Raises ``FileNotFoundError`` when no image holds it, and what reading metadata raises.
    """
    volume_id = lay.check_uuid(volume_id, "volume_id")
    if image_hint is not None:
        with contextlib.suppress(FileNotFoundError):
            return read_listed(layout, image_hint, volume_id)
    for image_id in lay.list_images(layout):
        if image_id == image_hint:
            continue
        try:
            return read_listed(layout, image_id, volume_id)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no volume {volume_id} in domain {layout.sd_id}")


def find(layout: DomainLayout, volume_id: str, image_hint: str | None = None) -> Found:
    """:func:`locate`, with the data file checked (raises :class:`UnsafePath` too)."""
    return Found.of(layout, locate(layout, volume_id, image_hint))


def read_listed(layout: DomainLayout, image_id: str, volume_id: str) -> Listed:
    """One volume's metadata by its full id. Raises ``FileNotFoundError`` and metadata
    errors."""
    return Listed(image_id, volume_id, lay.read_volume_metadata(layout, image_id, volume_id))


def read(layout: DomainLayout, image_id: str, volume_id: str) -> Found:
    """One volume by its full id, its data file checked. Raises ``FileNotFoundError``,
    metadata errors and :class:`UnsafePath`."""
    return Found.of(layout, read_listed(layout, image_id, volume_id))


def chain(layout: DomainLayout, leaf: Found) -> list[Found]:
    """``leaf`` and every volume below it, leaf first. Raises :class:`MetadataError` for a
    missing parent or a loop, and what reading metadata raises."""
    result = [leaf]
    while (parent := result[-1].metadata.parent) is not None:
        if len(result) >= MAX_CHAIN or any(f.volume_id == parent for f in result):
            raise MetadataError(f"volume {leaf.volume_id}: its chain loops or is longer than "
                                f"{MAX_CHAIN}", reason="metadata_corrupt")
        try:
            result.append(find(layout, parent, result[-1].image_id))
        except FileNotFoundError:
            raise MetadataError(f"volume {result[-1].volume_id}: parent {parent} is missing",
                                reason="broken_chain") from None
    return result


class HeaderMismatch(FailedPrecondition):
    """A volume's data file names other files than its metadata allows: a backing file
    other than its parent's, or an external data file."""


def check_headers(layout: DomainLayout, volumes: list[Found]) -> None:
    """Check that each qcow2 image of a chain (leaf first) names as its backing file
    exactly its parent (as :func:`backing_name` writes it), or none at the bottom, and
    keeps its data in itself; a raw image cannot have a parent.

    Raises :class:`HeaderMismatch` (reason ``backing_mismatch``, ``external_data_file`` or
    ``format_mismatch``, for the first volume that differs), :class:`UnsafePath` for a
    data file that is a link or not a regular file, and ``OSError``.
    """
    for below, found in enumerate(volumes, start=1):
        parent = volumes[below] if below < len(volumes) else None
        expected = None if parent is None else backing_name(layout, found.image_id, parent)
        if found.metadata.format == "raw":
            if parent is not None:
                raise _mismatch(found, "backing_mismatch", "is raw, which has no backing "
                                f"file, yet its metadata names parent {parent.volume_id}")
            continue
        fd = lay.open_file(found.path)
        try:
            header = qcow2.read_header(fd)
        except qcow2.NotQcow2 as exc:
            raise _mismatch(found, "format_mismatch", f"is not a qcow2 image ({exc})") from None
        finally:
            os.close(fd)
        if header.data_file:
            raise _mismatch(found, "external_data_file", "keeps its data in another file "
                            "(an external data file); volumes never do")
        if header.backing_file != expected:
            named = "none" if header.backing_file is None else repr(header.backing_file[:200])
            raise _mismatch(found, "backing_mismatch", f"names backing file {named} in its "
                            f"header, but its metadata says {expected or 'none'}")


def _mismatch(found: Found, reason: str, what: str) -> HeaderMismatch:
    return HeaderMismatch(f"volume {found.volume_id} {what}; refusing to use it",
                          reason=reason, object="volume", id=found.volume_id)


def usable_chain(layout: DomainLayout, leaf: Found) -> list[Found]:
    """:func:`chain`, with the header of every image in it checked (:func:`check_headers`):
    the chain to hand to qemu-img or libvirt, as a whole."""
    volumes = chain(layout, leaf)
    check_headers(layout, volumes)
    return volumes


def all_volumes(layout: DomainLayout) -> list[Listed]:
    """Every volume of the domain whose metadata can be read, whatever its data file."""
    found = []
    for image_id in lay.list_images(layout):
        with contextlib.suppress(FileNotFoundError):
            for entry in lay.list_volumes(layout, image_id):
                if entry.metadata is not None:
                    found.append(Listed(image_id, entry.volume_id, entry.metadata))
    return found


def children(layout: DomainLayout, volume_id: str) -> list[Listed]:
    """The volumes whose parent is ``volume_id``, in any image of the domain."""
    return [f for f in all_volumes(layout) if f.metadata.parent == volume_id]


def free_bytes(layout: DomainLayout) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of the domain."""
    st = os.statvfs(layout.images_dir)
    return st.f_bavail * st.f_frsize


def backing_name(layout: DomainLayout, image_id: str, parent: Found) -> str:
    """How a layer in ``image_id`` names its parent in its qcow2 header: relative, so that
    the domain can be mounted anywhere."""
    if parent.image_id == image_id:
        return parent.volume_id
    return f"../{parent.image_id}/{parent.volume_id}"


def start_new(layout: DomainLayout, image_id: str, volume_id: str, metadata: VolumeMetadata,
              *, new_image: bool) -> Found:
    """Write a new volume's metadata (``illegal``) before its data exists; returns it.

    Makes the image directory when ``new_image`` (refusing one that exists). Raises
    ``FileExistsError`` when the image (new) or the volume exists.
    """
    assert metadata.legality == "illegal"
    image_dir = layout.image_dir(image_id)
    if new_image:
        make_dir(image_dir)
    elif not image_dir.is_dir():
        raise FileNotFoundError(f"no image {image_id}")
    found = Found.at(layout, image_id, volume_id, metadata)
    if (os.path.lexists(found.path)
            or os.path.lexists(layout.volume_meta_path(image_id, volume_id))):
        raise FileExistsError(f"volume {volume_id} exists")
    lay.write_volume_metadata(layout, image_id, volume_id, metadata)
    return found


def update(layout: DomainLayout, found: V, **changes: object) -> V:
    """Write ``found``'s metadata with ``changes`` and the generation raised."""
    metadata = dataclasses.replace(found.metadata, generation=found.metadata.generation + 1,
                                   **changes)  # type: ignore[arg-type]
    lay.write_volume_metadata(layout, found.image_id, found.volume_id, metadata)
    return dataclasses.replace(found, metadata=metadata)


def write_new_data(path: Path, data: bytes) -> None:
    """Write a new volume's data file (which must not exist yet) and make it durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    sync_data(path)


def sync_data(path: Path) -> None:
    """Make a volume's data durable: fsync the file, then its directory."""
    fsync_file(path)
    fsync_dir(path.parent)


def remove(layout: DomainLayout, image_id: str, volume_id: str) -> None:
    """Remove a volume: its data first, its metadata last (a crash in between leaves an
    illegal volume with no data, which the start-up scan removes), then the image
    directory if nothing is left in it.

    The names are unlinked whatever they are: a symlink goes, not what it leads to; a
    file with other names keeps them. Only the way to the image is checked."""
    image_dir = layout.image_dir(image_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.entry_path(image_id, volume_id))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.entry_path(image_id, volume_id + lay.VOLUME_META_SUFFIX))
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(image_dir)
    with contextlib.suppress(FileNotFoundError, OSError):
        image_dir.rmdir()  # only when empty


def restore_parent_role(layout: DomainLayout, parent_id: str, image_hint: str) -> None:
    """A parent left ``internal`` with no child in its image becomes the image's leaf."""
    try:
        parent = locate(layout, parent_id, image_hint)
    except (FileNotFoundError, MetadataError, lay.UnsafePath):
        return
    if parent.metadata.role == "internal" and not any(
            c.image_id == parent.image_id for c in children(layout, parent_id)):
        update(layout, parent, role="leaf")


@dataclass(frozen=True)
class Illegal:
    """A volume found ``illegal`` by the start-up scan, and what was done with it."""

    image_id: str
    volume_id: str
    removed: bool
    why: str


def scan_illegal(layout: DomainLayout) -> list[Illegal]:
    """Find volumes a crash left ``illegal`` and remove the half-made ones.

    The rule: an illegal volume with no children whose parent is legal (or that has no
    parent) was being made by create or copy, or being deleted; it holds nothing anyone
    needs, and is removed (its parent, left ``internal``, becomes the leaf again). Any
    other illegal volume (one with children, or whose parent is illegal too) belongs to an
    interrupted merge: the parent may be half written, so the chain is kept illegal and
    reported; ``Volume.merge`` of the same layer can be run again to finish it.
    """
    volumes = all_volumes(layout)
    by_id = {f.volume_id: f for f in volumes}
    parents = {f.metadata.parent for f in volumes}
    result = []
    for found in volumes:
        if found.metadata.legality != "illegal":
            continue
        parent = by_id.get(found.metadata.parent or "")
        if found.volume_id not in parents and (parent is None
                                               or parent.metadata.legality == "legal"):
            remove(layout, found.image_id, found.volume_id)
            if parent is not None:
                restore_parent_role(layout, parent.volume_id, parent.image_id)
            result.append(Illegal(found.image_id, found.volume_id, True,
                                  "half-made by an interrupted create, copy or delete"))
        else:
            result.append(Illegal(found.image_id, found.volume_id, False,
                                  "part of an interrupted merge; run Volume.merge again"))
    return result

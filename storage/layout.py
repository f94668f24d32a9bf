"""The on-disk layout of a storage domain and its metadata files.

A domain is self-describing, so that another host can attach it from the files alone::

    <root>/<sd_id>/dom_md/metadata.json                    the domain's metadata
    <root>/<sd_id>/images/<image_id>/<volume_id>           a volume's data
    <root>/<sd_id>/images/<image_id>/<volume_id>.meta.json the volume's metadata

Everything here is plain code over paths and bytes. Every id is checked to be a UUID in
canonical form before it becomes part of a path, and every path handed out is checked to
stay inside the domain's directory with no symbolic link on the way, and to be a
directory or a regular file with a single link (:meth:`DomainLayout.safe`).

Metadata is parsed strictly: a file that is not a JSON object, lacks a field, has a field
of the wrong type or one this version does not know, or declares a newer layout version is
refused with :class:`MetadataError` (reason ``metadata_corrupt`` or ``metadata_newer``).
Nothing here ever rewrites a file it could not read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from virtnode.errors import FailedPrecondition, InvalidArgument
from virtnode.util.files import atomic_write, make_dir
from virtnode.util.jsontypes import JsonObject

#: The layout version this agent writes for domains and disk volumes; older agents read it.
LAYOUT_VERSION = 1
#: The newest volume layout version this agent reads. Version 2 adds a volume's ``content``: a
#: volume is written as version 2 only when it holds something version 1 cannot say (an
#: ISO image), so agents that know only version 1 refuse exactly those volumes.
NEWEST_VERSION = 2
DOM_MD = "dom_md"
METADATA_FILE = "metadata.json"
IMAGES = "images"
VOLUME_META_SUFFIX = ".meta.json"
#: Metadata files are small; anything larger is not ours.
MAX_METADATA_BYTES = 64 * 1024
NAME_MAX = 64

DomainType = Literal["localfs", "posixfs"]
VolumeFormat = Literal["raw", "qcow2"]
Allocation = Literal["sparse", "preallocated"]
Role = Literal["leaf", "internal", "shared"]
Legality = Literal["legal", "illegal"]
Content = Literal["disk", "iso", "memory"]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MetadataError(FailedPrecondition):
    """A metadata file cannot be used: corrupt, of another kind, or from a newer version."""


class UnsafePath(FailedPrecondition):
    """A path inside a domain is a symbolic link, or leads outside the domain."""


def check_uuid(value: object, what: str = "id") -> str:
    """Return ``value`` as a lower-case canonical UUID, or raise :class:`InvalidArgument`.

    Only the 36-character hyphenated form is accepted: braces, ``urn:uuid:`` prefixes and
    hex without hyphens (which ``uuid.UUID`` would take) never reach a path.
    """
    if isinstance(value, str) and is_uuid(value.lower()):
        return value.lower()
    shown = repr(value)[:80]
    raise InvalidArgument(f"{what} {shown} is not a UUID", reason="invalid_id", field=what)


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID as the layout names files: lower case, hyphenated."""
    return len(value) == 36 and _UUID.fullmatch(value) is not None


def check_name(value: object) -> str:
    """Return a valid domain name or raise :class:`InvalidArgument` (reason ``invalid_name``).

    1 to 64 characters, no ``/``, no control characters, not only blanks.
    """
    if (not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX
            or "/" in value or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)):
        raise InvalidArgument(
            f"name {str(value)[:80]!r} is not acceptable: 1 to {NAME_MAX} characters, "
            "no '/' and no control characters", reason="invalid_name", field="name")
    return value


# --- metadata -----------------------------------------------------------------------------


def _field_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from JSON) fits the annotation ``hint`` of a metadata field."""
    if hint == "int":
        return type(value) is int and value >= 0
    if hint == "float":
        return type(value) in (int, float) and value >= 0
    if hint == "str":
        return isinstance(value, str)
    if hint == "str | None":
        return value is None or isinstance(value, str)
    choices = get_args(globals()[hint])  # one of the Literal aliases above
    return value in choices


def _parse(cls: type[Any], data: bytes, where: str, newest: int = LAYOUT_VERSION,
           since: Mapping[str, tuple[int, Any]] | None = None) -> JsonObject:
    """Decode ``data`` into the fields of ``cls``, refusing anything unexpected.

    ``since`` maps a field added by a later layout version to ``(that version, its value
    in older files)``: an older file must not have it, and gets that value.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataError(f"{where}: larger than {MAX_METADATA_BYTES} bytes",
                            reason="metadata_corrupt")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{where}: not JSON ({exc})", reason="metadata_corrupt") from None
    if not isinstance(raw, dict):
        raise MetadataError(f"{where}: not a JSON object", reason="metadata_corrupt")
    version = raw.get("version")
    if type(version) is not int or version < 1:
        raise MetadataError(f"{where}: no valid version", reason="metadata_corrupt")
    if version > newest:
        raise MetadataError(
            f"{where}: layout version {version} was written by a newer virtnode (this one "
            f"reads up to {newest}); refusing to use it", reason="metadata_newer",
            version=version)
    known = {f.name: f.type for f in fields(cls)}
    for name, (added, old_value) in (since or {}).items():
        if version < added:
            if name in raw:
                raise MetadataError(f"{where}: unknown field {name!r} in a version "
                                    f"{version} file", reason="metadata_corrupt")
            raw[name] = old_value
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MetadataError(f"{where}: unknown field {unknown[0]!r}", reason="metadata_corrupt")
    for name, hint in known.items():
        if name not in raw:
            raise MetadataError(f"{where}: field {name!r} is missing",
                                reason="metadata_corrupt")
        if not _field_ok(raw[name], hint):
            raise MetadataError(f"{where}: field {name!r} has an invalid value "
                                f"{str(raw[name])[:80]!r}", reason="metadata_corrupt")
    return raw


def _encode(obj: Any) -> bytes:
    return (json.dumps(asdict(obj), indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class DomainMetadata:
    """``dom_md/metadata.json``: what a domain is, readable by any host that attaches it."""

    uuid: str
    name: str
    version: int
    type: DomainType
    created_by: str
    block_size: int
    created: float

    @classmethod
    def new(cls, sd_id: str, name: str, type: DomainType, host_id: str,
            block_size: int) -> DomainMetadata:
        return cls(uuid=check_uuid(sd_id, "sd_id"), name=check_name(name),
                   version=LAYOUT_VERSION, type=type, created_by=host_id,
                   block_size=block_size, created=round(time.time(), 3))

    @classmethod
    def parse(cls, data: bytes, where: str = "metadata.json") -> DomainMetadata:
        """Parse the file's bytes; raises :class:`MetadataError`."""
        raw = _parse(cls, data, where)
        for key in ("uuid", "created_by"):
            if not _UUID.fullmatch(raw[key]):
                raise MetadataError(f"{where}: {key} is not a UUID", reason="metadata_corrupt")
        try:
            check_name(raw["name"])
        except InvalidArgument:
            raise MetadataError(f"{where}: name is not valid", reason="metadata_corrupt") from None
        if raw["block_size"] not in (512, 4096):
            raise MetadataError(f"{where}: block_size must be 512 or 4096",
                                reason="metadata_corrupt")
        return cls(**raw)

    def encode(self) -> bytes:
        return _encode(self)

    def to_api(self) -> JsonObject:
        return asdict(self)


@dataclass(frozen=True)
class VolumeMetadata:
    """``<volume_id>.meta.json``: a volume's format, place in its chain and legality."""

    version: int
    format: VolumeFormat
    allocation: Allocation
    virtual_size: int
    parent: str | None
    role: Role
    legality: Legality
    generation: int
    description: str
    ctime: float
    #: ``disk`` (a VM's disk), ``iso`` (an ISO image: raw, shared, attached read-only as
    #: CD-ROM media) or ``memory`` (a VM's memory at a snapshot, libvirt's save image
    #: format: raw, no parent). Layout version 2; version 1 files are disks.
    content: Content = "disk"

    @classmethod
    def new(cls, format: VolumeFormat, allocation: Allocation, virtual_size: int, *,
            parent: str | None, shared: bool, description: str,
            content: Content = "disk") -> VolumeMetadata:
        """A volume about to be made: ``illegal`` until its data is complete and durable,
        a template (``shared``) or its image's leaf. An ISO image is always ``shared``."""
        return cls(version=_VOLUME_VERSIONS[content], format=format, allocation=allocation,
                   virtual_size=virtual_size, parent=parent,
                   role="shared" if shared or content == "iso" else "leaf",
                   legality="illegal", generation=0, description=description,
                   ctime=round(time.time(), 3), content=content)

    @classmethod
    def parse(cls, data: bytes, where: str = "volume metadata") -> VolumeMetadata:
        """Parse the file's bytes; raises :class:`MetadataError`."""
        raw = _parse(cls, data, where, NEWEST_VERSION, since={"content": (2, "disk")})
        if raw["content"] == "iso" and (raw["format"] != "raw" or raw["parent"] is not None
                                        or raw["role"] != "shared"):
            raise MetadataError(f"{where}: an ISO image is a raw, shared volume without a "
                                "parent", reason="metadata_corrupt")
        if raw["content"] == "memory" and (raw["format"] != "raw"
                                           or raw["parent"] is not None):
            raise MetadataError(f"{where}: a memory image is a raw volume without a parent",
                                reason="metadata_corrupt")
        parent = raw["parent"]
        if parent is not None and not _UUID.fullmatch(parent):
            raise MetadataError(f"{where}: parent is not a UUID", reason="metadata_corrupt")
        if len(raw["description"]) > 1024:
            raise MetadataError(f"{where}: description is too long", reason="metadata_corrupt")
        return cls(**raw)

    def encode(self) -> bytes:
        if self.version < 2:
            data = asdict(self)
            del data["content"]  # version 1 has no such field: older agents read it
            return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        return _encode(self)

    def to_api(self) -> JsonObject:
        data = asdict(self)
        del data["version"]
        return data


#: The layout version a volume of each content is written as.
_VOLUME_VERSIONS: dict[str, int] = {"disk": LAYOUT_VERSION, "iso": 2, "memory": 2}


# --- paths --------------------------------------------------------------------------------


def _check_file(path: Path, st: os.stat_result) -> None:
    """Refuse what a domain never holds: a symlink, a special file (FIFO, socket, device)
    or a file with more than one link. A hard link makes a file outside the domain (on
    the same filesystem) look like a volume: whatever the agent did to the volume, it
    would do to that file."""
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link; a domain holds none",
                         reason="unsafe_path")
    if stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is not a regular file or a directory",
                         reason="unsafe_path")
    if st.st_nlink > 1:
        raise UnsafePath(f"{path} has {st.st_nlink} links (hard links); a domain's files "
                         "have one", reason="unsafe_path")


def _no_links(base: Path, path: Path) -> None:
    """Refuse ``path`` if it escapes ``base`` or a component below ``base`` is a symlink,
    a special file or a file with more than one link (:func:`_check_file`).

    Components that do not exist yet are fine (they are about to be made). Lexically
    inside ``base``, with no ``..`` and no symlink below it, ``path`` cannot lead out of
    it, so nothing is resolved: one ``lstat`` per component is all it reads.
    """
    if not path.is_relative_to(base) or ".." in path.relative_to(base).parts:
        raise UnsafePath(f"{path} is outside {base}", reason="unsafe_path")
    current = base
    for part in path.relative_to(base).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        _check_file(current, st)


@dataclass(frozen=True)
class DomainLayout:
    """Paths of one domain under its root. The root is resolved once, when attaching."""

    root: Path
    sd_id: str

    @classmethod
    def of(cls, root: Path, sd_id: str) -> DomainLayout:
        """Raises :class:`InvalidArgument` for a bad id or a relative root."""
        if not root.is_absolute():
            raise InvalidArgument(f"{root} is not an absolute path", reason="invalid_path")
        return cls(root, check_uuid(sd_id, "sd_id"))

    @property
    def domain_dir(self) -> Path:
        return self.root / self.sd_id

    @property
    def metadata_path(self) -> Path:
        return self.safe(self.domain_dir / DOM_MD / METADATA_FILE)

    @property
    def images_dir(self) -> Path:
        return self.safe(self.domain_dir / IMAGES)

    def image_dir(self, image_id: str) -> Path:
        return self.safe(self.domain_dir / IMAGES / check_uuid(image_id, "image_id"))

    def volume_path(self, image_id: str, volume_id: str) -> Path:
        return self.safe(self.domain_dir / IMAGES / check_uuid(image_id, "image_id")
                         / check_uuid(volume_id, "volume_id"))

    def volume_name(self, image_id: str, volume_id: str) -> Path:
        """Where a volume's data file is named, built from the ids alone (nothing is read or
        checked): for comparing with paths VMs use, never for opening."""
        return (self.domain_dir / IMAGES / check_uuid(image_id, "image_id")
                / check_uuid(volume_id, "volume_id"))

    def volume_meta_path(self, image_id: str, volume_id: str) -> Path:
        name = check_uuid(volume_id, "volume_id") + VOLUME_META_SUFFIX
        return self.safe(self.domain_dir / IMAGES / check_uuid(image_id, "image_id") / name)

    def entry_path(self, image_id: str, name: str) -> Path:
        """The entry ``name`` of an image directory, with the way to the directory checked
        but not the entry itself: for unlinking it (which never follows it), never for
        opening it. Raises :class:`UnsafePath` and :class:`InvalidArgument`."""
        if "/" in name or name in ("", ".", ".."):
            raise InvalidArgument(f"{name!r} is not a file name", reason="invalid_id")
        return self.image_dir(image_id) / name

    def safe(self, path: Path) -> Path:
        """``path`` if it lies in this domain's directory with no symlink on the way, and
        is (when it exists) a directory or a regular file with one link.

        The domain directory itself must not be a symlink either. Raises
        :class:`UnsafePath`. Reads the filesystem (``lstat``): call it off the loop.
        """
        if os.path.islink(self.domain_dir):
            raise UnsafePath(f"{self.domain_dir} is a symbolic link", reason="unsafe_path")
        _no_links(self.domain_dir, path)
        return path


# --- reading and writing (blocking: run off the event loop) --------------------------------


def open_file(path: Path) -> int:
    """Open a domain's file for reading: not through a symlink at its last component,
    without waiting on a FIFO, and only if it is a regular file with one link (checked on
    the file opened, whatever was there when its path was checked). Returns the fd.
    Raises :class:`UnsafePath` and ``OSError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; a domain holds none",
                             reason="unsafe_path") from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{path} is a directory", reason="unsafe_path")
        _check_file(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_small(path: Path) -> bytes:
    """Read a metadata file (:func:`open_file`)."""
    fd = open_file(path)
    try:
        return os.read(fd, MAX_METADATA_BYTES + 1)
    finally:
        os.close(fd)


def read_domain_metadata(layout: DomainLayout) -> DomainMetadata:
    """Read and check a domain's metadata.

    Raises ``FileNotFoundError`` when there is none, :class:`MetadataError` when it is not
    usable or names another domain, :class:`UnsafePath`, and ``OSError``.
    """
    path = layout.metadata_path
    metadata = DomainMetadata.parse(_read_small(path), str(path))
    if metadata.uuid != layout.sd_id:
        raise MetadataError(f"{path} describes domain {metadata.uuid}, not {layout.sd_id}",
                            reason="metadata_mismatch")
    return metadata


def format_domain(layout: DomainLayout, metadata: DomainMetadata) -> None:
    """Make a new domain's directories, then write its metadata last.

    A crash before the metadata is written leaves a directory that is not a domain (attach
    refuses it; create with ``force`` reuses it). Raises ``OSError``.
    """
    domain_dir = layout.domain_dir
    make_dir(domain_dir, exist_ok=True)
    make_dir(layout.safe(domain_dir / DOM_MD), exist_ok=True)
    make_dir(layout.images_dir, exist_ok=True)
    atomic_write(layout.metadata_path, metadata.encode())


def read_volume_metadata(layout: DomainLayout, image_id: str, volume_id: str) -> VolumeMetadata:
    """Read one volume's metadata. Raises ``FileNotFoundError``, :class:`MetadataError`,
    :class:`UnsafePath`, :class:`InvalidArgument` for bad ids, and ``OSError``."""
    path = layout.volume_meta_path(image_id, volume_id)
    return VolumeMetadata.parse(_read_small(path), str(path))


def write_volume_metadata(layout: DomainLayout, image_id: str, volume_id: str,
                          metadata: VolumeMetadata) -> None:
    """Write one volume's metadata atomically (temp file, fsync, rename, fsync dir)."""
    atomic_write(layout.volume_meta_path(image_id, volume_id), metadata.encode())


@dataclass(frozen=True)
class VolumeEntry:
    """A volume found in an image: its metadata, or why it could not be read."""

    volume_id: str
    metadata: VolumeMetadata | None
    error: str | None = None


def list_images(layout: DomainLayout) -> list[str]:
    """The image ids of a domain, sorted. Entries that are not UUIDs are not images."""
    images = layout.images_dir
    try:
        names = os.listdir(images)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _UUID.fullmatch(n) and not os.path.islink(images / n))


def list_volumes(layout: DomainLayout, image_id: str) -> list[VolumeEntry]:
    """Every volume of an image that has a metadata file, sorted by id.

    A volume whose metadata cannot be read is listed with ``error`` set instead of being
    left out, so half-made or damaged volumes are seen. Raises ``FileNotFoundError`` for a
    missing image and :class:`UnsafePath`.
    """
    image_dir = layout.image_dir(image_id)
    entries: list[VolumeEntry] = []
    for name in sorted(os.listdir(image_dir)):
        volume_id = name.removesuffix(VOLUME_META_SUFFIX)
        if volume_id == name or not _UUID.fullmatch(volume_id):
            continue
        try:
            entries.append(VolumeEntry(volume_id,
                                       read_volume_metadata(layout, image_id, volume_id)))
        except (MetadataError, UnsafePath) as exc:
            entries.append(VolumeEntry(volume_id, None, exc.message))
        except OSError as exc:
            entries.append(VolumeEntry(volume_id, None, f"{name}: {exc.strerror}"))
    return entries


def has_volumes(layout: DomainLayout) -> bool:
    """Whether any image of the domain holds a file (a volume or its metadata)."""
    for image_id in list_images(layout):
        with os.scandir(layout.image_dir(image_id)) as it:
            if any(not entry.name.startswith(".") for entry in it):
                return True
    return False

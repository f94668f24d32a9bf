"""The storage domain layout: ids, paths that cannot escape, strict metadata."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from virtnode.errors import InvalidArgument
from virtnode.storage import layout as lay
from virtnode.storage.layout import (
    DomainLayout,
    DomainMetadata,
    MetadataError,
    UnsafePath,
    VolumeMetadata,
)

SD = str(uuid.uuid4())
IMG = str(uuid.uuid4())
VOL = str(uuid.uuid4())


def volume_meta(**changes: object) -> VolumeMetadata:
    values: dict[str, object] = {
        "version": 1, "format": "qcow2", "allocation": "sparse", "virtual_size": 1 << 30,
        "parent": None, "role": "leaf", "legality": "legal", "generation": 0,
        "description": "boot disk", "ctime": 1700000000.0,
    }
    values.update(changes)
    return VolumeMetadata(**values)  # type: ignore[arg-type]


@pytest.fixture
def domain(tmp_path: Path) -> DomainLayout:
    layout = DomainLayout.of(tmp_path, SD)
    lay.format_domain(layout, DomainMetadata.new(SD, "data", "localfs", str(uuid.uuid4()), 512))
    return layout


@pytest.mark.parametrize("bad", [
    "../x", "a/b", "..", "", "not-a-uuid", SD + "/..", "/" + SD, SD[:-1] + "/",
    "{" + SD + "}", SD.replace("-", ""), "urn:uuid:" + SD, SD + "\n", 42, None,
])
def test_ids_that_are_not_canonical_uuids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        lay.check_uuid(bad, "volume_id")
    assert err.value.reason == "invalid_id"


def test_uuids_are_lower_cased() -> None:
    assert lay.check_uuid(SD.upper()) == SD


@pytest.mark.parametrize("bad", ["", " ", "a/b", "x" * 65, "tab\there", "nl\n", "del\x7f"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        lay.check_name(bad)


def test_paths_of_a_domain(domain: DomainLayout, tmp_path: Path) -> None:
    assert domain.metadata_path == tmp_path / SD / "dom_md" / "metadata.json"
    assert domain.volume_path(IMG, VOL) == tmp_path / SD / "images" / IMG / VOL
    assert domain.volume_meta_path(IMG, VOL).name == f"{VOL}.meta.json"
    for bad in ("../x", "a/b", "..", "."):
        with pytest.raises(InvalidArgument):
            domain.volume_path(IMG, bad)
        with pytest.raises(InvalidArgument):
            domain.image_dir(bad)


def test_relative_root_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        DomainLayout.of(Path("relative"), SD)


def test_a_symlinked_image_dir_is_refused(domain: DomainLayout, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, domain.domain_dir / "images" / IMG)
    with pytest.raises(UnsafePath) as err:
        domain.volume_path(IMG, VOL)
    assert err.value.reason == "unsafe_path"
    with pytest.raises(UnsafePath):
        lay.write_volume_metadata(domain, IMG, VOL, volume_meta())
    assert list(outside.iterdir()) == []
    assert IMG not in lay.list_images(domain)


def test_a_symlinked_domain_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / SD)
    with pytest.raises(UnsafePath):
        DomainLayout.of(tmp_path, SD).metadata_path  # noqa: B018


def test_a_symlinked_metadata_file_is_not_followed(domain: DomainLayout,
                                                   tmp_path: Path) -> None:
    (domain.domain_dir / "images" / IMG).mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_bytes(volume_meta().encode())
    os.symlink(target, domain.domain_dir / "images" / IMG / f"{VOL}.meta.json")
    with pytest.raises(UnsafePath):
        lay.read_volume_metadata(domain, IMG, VOL)
    [entry] = lay.list_volumes(domain, IMG)
    assert entry.metadata is None and entry.error


def test_a_hard_linked_volume_file_is_refused(domain: DomainLayout, tmp_path: Path) -> None:
    (domain.domain_dir / "images" / IMG).mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the domain's")
    os.link(outside, domain.domain_dir / "images" / IMG / VOL)
    with pytest.raises(UnsafePath, match="links") as err:
        domain.volume_path(IMG, VOL)
    assert err.value.reason == "unsafe_path"
    assert outside.read_bytes() == b"not the domain's"


def test_a_hard_linked_metadata_file_is_refused(domain: DomainLayout, tmp_path: Path) -> None:
    (domain.domain_dir / "images" / IMG).mkdir()
    lay.write_volume_metadata(domain, IMG, VOL, volume_meta())
    meta = domain.domain_dir / "images" / IMG / f"{VOL}.meta.json"
    os.link(meta, tmp_path / "elsewhere.json")
    with pytest.raises(UnsafePath, match="links"):
        lay.read_volume_metadata(domain, IMG, VOL)
    [entry] = lay.list_volumes(domain, IMG)
    assert entry.metadata is None and entry.error is not None and "links" in entry.error


def test_open_file_checks_the_file_it_opened(domain: DomainLayout, tmp_path: Path) -> None:
    image_dir = domain.domain_dir / "images" / IMG
    image_dir.mkdir()
    (image_dir / VOL).write_bytes(b"data")
    os.close(lay.open_file(image_dir / VOL))
    os.link(image_dir / VOL, tmp_path / "second-name")
    with pytest.raises(UnsafePath, match="links"):
        lay.open_file(image_dir / VOL)
    os.unlink(image_dir / VOL)
    os.symlink(tmp_path / "second-name", image_dir / VOL)
    with pytest.raises(UnsafePath, match="symbolic link"):
        lay.open_file(image_dir / VOL)
    os.unlink(image_dir / VOL)
    os.mkfifo(image_dir / VOL)
    with pytest.raises(UnsafePath, match="regular file"):
        lay.open_file(image_dir / VOL)  # without waiting for a writer


def test_a_special_file_is_refused_without_blocking(domain: DomainLayout) -> None:
    (domain.domain_dir / "images" / IMG).mkdir()
    os.mkfifo(domain.domain_dir / "images" / IMG / f"{VOL}.meta.json")
    with pytest.raises(UnsafePath, match="regular file"):
        lay.read_volume_metadata(domain, IMG, VOL)
    with pytest.raises(UnsafePath, match="regular file"):
        domain.volume_meta_path(IMG, VOL)


def test_domain_metadata_round_trip(domain: DomainLayout) -> None:
    metadata = lay.read_domain_metadata(domain)
    assert metadata.uuid == SD and metadata.name == "data" and metadata.version == 1
    assert DomainMetadata.parse(metadata.encode()) == metadata


def test_metadata_of_another_domain_is_refused(tmp_path: Path) -> None:
    layout = DomainLayout.of(tmp_path, SD)
    other = DomainMetadata.new(str(uuid.uuid4()), "x", "localfs", str(uuid.uuid4()), 512)
    lay.format_domain(layout, other)
    with pytest.raises(MetadataError) as err:
        lay.read_domain_metadata(layout)
    assert err.value.reason == "metadata_mismatch"


def _domain_dict() -> dict[str, object]:
    return json.loads(DomainMetadata.new(SD, "d", "posixfs", SD, 4096).encode())


@pytest.mark.parametrize(("change", "reason"), [
    ({"version": 2}, "metadata_newer"),
    ({"version": "1"}, "metadata_corrupt"),
    ({"block_size": "512"}, "metadata_corrupt"),
    ({"block_size": 1000}, "metadata_corrupt"),
    ({"type": "nfs"}, "metadata_corrupt"),
    ({"uuid": "../etc"}, "metadata_corrupt"),
    ({"name": "a/b"}, "metadata_corrupt"),
    ({"created": True}, "metadata_corrupt"),
    ({"extra": 1}, "metadata_corrupt"),
])
def test_domain_metadata_is_parsed_strictly(change: dict[str, object], reason: str) -> None:
    raw = {**_domain_dict(), **change}
    with pytest.raises(MetadataError) as err:
        DomainMetadata.parse(json.dumps(raw).encode())
    assert err.value.reason == reason


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", b"null", b"x" * 70000])
def test_corrupt_files_are_refused(data: bytes) -> None:
    with pytest.raises(MetadataError) as err:
        DomainMetadata.parse(data)
    assert err.value.reason == "metadata_corrupt"


def test_missing_field_is_refused() -> None:
    raw = _domain_dict()
    del raw["created_by"]
    with pytest.raises(MetadataError, match="created_by"):
        DomainMetadata.parse(json.dumps(raw).encode())


def test_a_newer_domain_is_not_rewritten(domain: DomainLayout) -> None:
    raw = json.loads(domain.metadata_path.read_bytes())
    raw["version"] = 7
    text = json.dumps(raw).encode()
    domain.metadata_path.write_bytes(text)
    with pytest.raises(MetadataError) as err:
        lay.read_domain_metadata(domain)
    assert err.value.details["version"] == 7
    assert domain.metadata_path.read_bytes() == text


def test_volume_metadata_helpers(domain: DomainLayout) -> None:
    (domain.domain_dir / "images" / IMG).mkdir()
    base, top = str(uuid.uuid4()), str(uuid.uuid4())
    lay.write_volume_metadata(domain, IMG, base, volume_meta(role="internal"))
    lay.write_volume_metadata(domain, IMG, top, volume_meta(parent=base))
    (domain.domain_dir / "images" / IMG / "junk.meta.json").write_text("{}")
    assert lay.read_volume_metadata(domain, IMG, top).parent == base
    entries = {e.volume_id: e for e in lay.list_volumes(domain, IMG)}
    assert set(entries) == {base, top}
    assert entries[base].metadata == volume_meta(role="internal")
    assert lay.list_images(domain) == [IMG]
    assert lay.has_volumes(domain)
    assert "version" not in volume_meta().to_api()


def test_disk_volumes_stay_version_1_and_iso_images_are_version_2() -> None:
    disk = VolumeMetadata.new("qcow2", "sparse", 1 << 20, parent=None, shared=False,
                              description="")
    written = json.loads(disk.encode())
    assert written["version"] == 1 and "content" not in written
    assert VolumeMetadata.parse(disk.encode()) == disk and disk.content == "disk"
    iso = VolumeMetadata.new("raw", "sparse", 1 << 20, parent=None, shared=False,
                             description="installer", content="iso")
    written = json.loads(iso.encode())
    assert written["version"] == 2 and written["content"] == "iso"
    assert iso.role == "shared"  # many VMs may use it
    assert VolumeMetadata.parse(iso.encode()) == iso
    assert iso.to_api()["content"] == "iso"


@pytest.mark.parametrize("change", [
    {"content": "disk"},  # version 1 has no such field
    {"version": 2, "content": "iso", "format": "qcow2"},
    {"version": 2, "content": "iso", "role": "leaf"},
    {"version": 2, "content": "iso", "parent": IMG},
    {"version": 2, "content": "floppy"},
    {"version": 2},  # version 2 names its content
])
def test_content_is_parsed_strictly(change: dict[str, object]) -> None:
    raw = {**json.loads(volume_meta(role="shared", format="raw").encode()), **change}
    with pytest.raises(MetadataError) as err:
        VolumeMetadata.parse(json.dumps(raw).encode())
    assert err.value.reason == "metadata_corrupt"


@pytest.mark.parametrize(("change", "reason"), [
    ({"format": "vmdk"}, "metadata_corrupt"),
    ({"legality": "maybe"}, "metadata_corrupt"),
    ({"parent": "../../x"}, "metadata_corrupt"),
    ({"virtual_size": -1}, "metadata_corrupt"),
    ({"generation": 1.5}, "metadata_corrupt"),
    ({"version": 3}, "metadata_newer"),
])
def test_volume_metadata_is_parsed_strictly(domain: DomainLayout, change: dict[str, object],
                                            reason: str) -> None:
    raw = {**json.loads(volume_meta().encode()), **change}
    with pytest.raises(MetadataError) as err:
        VolumeMetadata.parse(json.dumps(raw).encode())
    assert err.value.reason == reason
    (domain.domain_dir / "images" / IMG).mkdir()
    domain.volume_meta_path(IMG, VOL).write_text(json.dumps(raw))
    [entry] = lay.list_volumes(domain, IMG)
    assert entry.metadata is None and entry.error is not None

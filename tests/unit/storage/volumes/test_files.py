"""The start-up scan for volumes a crash left illegal: what it removes, what it keeps."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from virtnode.storage import layout as lay
from virtnode.storage.layout import DomainLayout, DomainMetadata, VolumeMetadata
from virtnode.storage.volumes import files as volfiles

SD = str(uuid.uuid4())


@pytest.fixture
def domain(tmp_path: Path) -> DomainLayout:
    layout = DomainLayout.of(tmp_path, SD)
    lay.format_domain(layout, DomainMetadata.new(SD, "data", "localfs", str(uuid.uuid4()), 512))
    return layout


def make(layout: DomainLayout, image_id: str, *, parent: str | None = None,
         role: str = "leaf", legality: str = "legal", data: bool = True) -> str:
    """A volume written the way the agent writes one (data file optional); its id."""
    volume_id = str(uuid.uuid4())
    metadata = VolumeMetadata(
        version=1, format="qcow2" if parent else "raw", allocation="sparse",
        virtual_size=1 << 20, parent=parent, role=role, legality=legality, generation=0,
        description="", ctime=1700000000.0)
    os.makedirs(layout.image_dir(image_id), exist_ok=True)
    lay.write_volume_metadata(layout, image_id, volume_id, metadata)
    if data:
        layout.volume_path(image_id, volume_id).write_bytes(b"\0" * 512)
    return volume_id


def state(layout: DomainLayout) -> dict[str, tuple[str, str]]:
    """Every volume left: its id -> (role, legality)."""
    return {f.volume_id: (f.metadata.role, f.metadata.legality)
            for f in volfiles.all_volumes(layout)}


def test_a_clean_domain_has_nothing_to_report(domain: DomainLayout) -> None:
    image = str(uuid.uuid4())
    base = make(domain, image, role="internal")
    top = make(domain, image, parent=base)
    assert volfiles.scan_illegal(domain) == []
    assert state(domain) == {base: ("internal", "legal"), top: ("leaf", "legal")}


def test_a_half_made_new_volume_is_removed_with_its_image(domain: DomainLayout) -> None:
    image = str(uuid.uuid4())
    keep = make(domain, str(uuid.uuid4()))
    half = make(domain, image, legality="illegal")
    found = volfiles.scan_illegal(domain)
    assert [(f.image_id, f.volume_id, f.removed) for f in found] == [(image, half, True)]
    assert state(domain) == {keep: ("leaf", "legal")}
    assert not domain.image_dir(image).exists()


def test_a_half_made_snapshot_is_removed_and_its_parent_is_the_leaf_again(
        domain: DomainLayout) -> None:
    image = str(uuid.uuid4())
    base = make(domain, image, role="internal")
    half = make(domain, image, parent=base, legality="illegal")
    found = volfiles.scan_illegal(domain)
    assert [(f.volume_id, f.removed) for f in found] == [(half, True)]
    assert state(domain) == {base: ("leaf", "legal")}
    assert lay.read_volume_metadata(domain, image, base).generation == 1


def test_a_half_made_clone_leaves_the_template_shared(domain: DomainLayout) -> None:
    template_image = str(uuid.uuid4())
    template = make(domain, template_image, role="shared")
    other = make(domain, str(uuid.uuid4()), parent=template)
    half = make(domain, str(uuid.uuid4()), parent=template, legality="illegal")
    assert [(f.volume_id, f.removed) for f in volfiles.scan_illegal(domain)] == [(half, True)]
    assert state(domain) == {template: ("shared", "legal"), other: ("leaf", "legal")}


def test_a_delete_cut_short_after_its_data_went_is_finished(domain: DomainLayout) -> None:
    image = str(uuid.uuid4())
    base = make(domain, image, role="internal")
    gone = make(domain, image, parent=base, legality="illegal", data=False)
    assert [(f.volume_id, f.removed) for f in volfiles.scan_illegal(domain)] == [(gone, True)]
    assert state(domain) == {base: ("leaf", "legal")}
    assert sorted(os.listdir(domain.image_dir(image))) == sorted(
        [base, f"{base}.meta.json"])


def test_an_interrupted_merge_is_kept_and_reported(domain: DomainLayout) -> None:
    # Merge marks the parent illegal, then the leaf; a crash after either is kept.
    image = str(uuid.uuid4())
    base = make(domain, image, role="internal", legality="illegal")
    top = make(domain, image, parent=base, legality="illegal")
    image2 = str(uuid.uuid4())
    base2 = make(domain, image2, role="internal", legality="illegal")
    top2 = make(domain, image2, parent=base2)
    found = {f.volume_id: f for f in volfiles.scan_illegal(domain)}
    assert set(found) == {base, top, base2}
    assert not any(f.removed for f in found.values())
    assert all("Volume.merge" in f.why for f in found.values())
    before = state(domain)
    assert before[top] == ("leaf", "illegal") and before[top2] == ("leaf", "legal")
    # Running the scan again changes nothing: it is safe at every start.
    assert len(volfiles.scan_illegal(domain)) == 3
    assert state(domain) == before


def test_unreadable_metadata_is_left_alone(domain: DomainLayout) -> None:
    image = str(uuid.uuid4())
    base = make(domain, image)
    broken = domain.volume_meta_path(image, str(uuid.uuid4()))
    broken.write_text("{not json")
    assert volfiles.scan_illegal(domain) == []
    assert broken.read_text() == "{not json"
    assert state(domain) == {base: ("leaf", "legal")}


def test_a_volume_whose_data_file_is_a_link_counts_and_is_removed_by_name(
        domain: DomainLayout, tmp_path: Path) -> None:
    """A damaged data file does not hide the volume (it may be a parent), and the scan
    removes a half-made one by unlinking its names, never touching what they lead to."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    image = str(uuid.uuid4())
    base = make(domain, image, role="internal")
    top = make(domain, image, parent=base, legality="illegal", data=False)
    os.symlink(outside, domain.image_dir(image) / top)
    linked_image = str(uuid.uuid4())
    linked = make(domain, linked_image, data=False)
    os.link(outside, domain.image_dir(linked_image) / linked)

    assert [c.volume_id for c in volfiles.children(domain, base)] == [top]
    assert set(state(domain)) == {base, top, linked}
    assert [(f.volume_id, f.removed) for f in volfiles.scan_illegal(domain)] == [(top, True)]
    assert state(domain) == {base: ("leaf", "legal"), linked: ("leaf", "legal")}
    assert not os.path.lexists(domain.image_dir(image) / top)
    volfiles.remove(domain, linked_image, linked)
    assert not domain.image_dir(linked_image).exists()
    assert outside.read_bytes() == b"keep me" and outside.stat().st_nlink == 1

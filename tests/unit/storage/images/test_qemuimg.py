"""The pure parts of storage.qemuimg: output parsing and progress throttling."""

from __future__ import annotations

import logging

import pytest

from tests.fakes.clock import Clock
from virtnode.storage.images.qemuimg import (
    Chain,
    ProgressParser,
    ProgressThrottle,
    parse_check,
    parse_info,
)

# Real qemu-img 7.2 output (info --backing-chain --output=json of a qcow2 over a raw file).
CHAIN = [
    {
        "backing-filename-format": "raw",
        "virtual-size": 1048576,
        "filename": "/d/top.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 200704,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": False}},
        "full-backing-filename": "/d/base.raw",
        "backing-filename": "base.raw",
        "dirty-flag": False,
    },
    {
        "virtual-size": 1048576,
        "filename": "/d/base.raw",
        "format": "raw",
        "actual-size": 4096,
        "dirty-flag": False,
    },
]


def test_info_of_a_chain_lists_the_images_below_nearest_first() -> None:
    top = parse_info(CHAIN)
    assert (top.format, top.virtual_size, top.cluster_size) == ("qcow2", 1048576, 65536)
    assert (top.backing_file, top.backing_format) == ("base.raw", "raw")
    assert top.full_backing_file == "/d/base.raw"
    assert not top.dirty and not top.encrypted and not top.corrupt
    (base,) = top.backing_chain
    assert (base.filename, base.format, base.cluster_size, base.backing_file) == (
        "/d/base.raw", "raw", None, None)


def test_info_of_one_image_has_no_chain() -> None:
    document = {**CHAIN[0], "dirty-flag": True, "encrypted": True}
    document["format-specific"] = {"type": "qcow2", "data": {"corrupt": True}}
    image = parse_info(document)
    assert image.backing_chain == ()
    assert image.dirty and image.encrypted and image.corrupt


def test_check_counts() -> None:
    result = parse_check({"image-end-offset": 262144, "check-errors": 0, "leaks": 3,
                          "filename": "x", "format": "qcow2"})
    assert (result.leaks, result.corruptions, result.image_end_offset) == (3, 0, 262144)
    assert not result.clean


def test_progress_takes_the_newest_complete_update() -> None:
    parser = ProgressParser()
    assert parser.feed(b"    (0.00/100%)\r    (2.00/100%)\r    (4.") == 2.0
    assert parser.feed(b"00/100%)\r") == 4.0
    assert parser.feed(b"    (9") is None
    assert parser.feed(b"9.00/100%)\r    (100.00/100%)\r\r\n") == 100.0
    assert parser.feed(b"Image committed.\n") is None


def test_progress_keeps_a_bounded_partial_line() -> None:
    parser = ProgressParser()
    assert parser.feed(b"x" * 100_000) is None
    assert parser.feed(b"(50.00/100%)\r") == 50.0


def test_throttle_sends_at_most_once_per_interval_and_flushes_the_last() -> None:
    sent: list[float] = []
    clock = Clock()
    throttle = ProgressThrottle(sent.append, 0.5, clock)
    throttle.update(1.0)
    clock.now = 0.2
    throttle.update(2.0)
    clock.now = 0.6
    throttle.update(3.0)
    throttle.update(4.0)
    assert sent == [1.0, 3.0]
    throttle.flush()
    throttle.flush()
    assert sent == [1.0, 3.0, 4.0]


def test_a_failing_progress_callback_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(value: float) -> None:
        raise RuntimeError("consumer broke")

    throttle = ProgressThrottle(broken, 0.5, Clock())
    with caplog.at_level(logging.ERROR, logger="virtnode.storage.images.qemuimg"):
        throttle.update(1.0)
        throttle.flush()
    [record] = caplog.records
    assert record.getMessage() == "qemu-img progress callback failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "consumer broke"


def test_a_chain_spells_out_every_backing() -> None:
    chain = Chain.of(("/d/top", "qcow2"), ("/d/mid", "qcow2"), ("/d/base:x", "raw"))
    assert chain.node() == {
        "driver": "qcow2", "file": {"driver": "file", "filename": "/d/top"},
        "backing": {
            "driver": "qcow2", "file": {"driver": "file", "filename": "/d/mid"},
            "backing": {"driver": "raw", "file": {"driver": "file", "filename": "/d/base:x"}},
        },
    }
    assert Chain.of(("/d/only", "qcow2")).node()["backing"] is None
    assert chain.filename().startswith('json:{"driver":"qcow2",')


@pytest.mark.parametrize("layers", [
    (), (("d/relative", "qcow2"),), (("/d/a", "vmdk"),), (("/d/a", "raw"), ("/d/b", "raw")),
])
def test_a_chain_that_cannot_be_is_refused(layers: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError):
        Chain(layers)

"""HTTP byte ranges as transfers read them: Content-Range on PUT, Range on GET."""

from __future__ import annotations

import pytest

from virtnode.rpc.httpranges import RangeError, byte_range, content_range


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 0-99/1000", (0, 100)),
    ("bytes 900-999/1000", (900, 1000)),
    ("bytes 5-5/*", (5, 6)),
])
def test_content_range(value: str, expected: tuple[int, int]) -> None:
    assert content_range(value, 1000) == expected


@pytest.mark.parametrize(("value", "status"), [
    ("bytes 0-99", 400), ("bytes=0-99/1000", 400), ("bytes 9-3/1000", 400),
    ("bytes -1-3/1000", 400), ("bytes 0-1000/1000", 416), ("bytes 0-9/999", 416),
    ("items 0-9/1000", 400),
])
def test_bad_content_range(value: str, status: int) -> None:
    with pytest.raises(RangeError) as caught:
        content_range(value, 1000)
    assert caught.value.status == status


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes=0-0", (0, 1)), ("bytes=10-19", (10, 20)), ("bytes=990-", (990, 1000)),
    ("bytes=-10", (990, 1000)), ("bytes=-5000", (0, 1000)), ("bytes=5-99999", (5, 1000)),
])
def test_range(value: str, expected: tuple[int, int]) -> None:
    assert byte_range(value, 1000) == expected


@pytest.mark.parametrize("value", ["bytes=1000-", "bytes=0-1,3-4", "bytes=-0", "bytes=-",
                                   "bytes=9-3", "bits=0-1", "bytes=a-b"])
def test_unsatisfiable_range(value: str) -> None:
    with pytest.raises(RangeError) as caught:
        byte_range(value, 1000)
    assert caught.value.status == 416

"""The bytes an upload has received, as chunks arrive in any order, twice or cut short."""

from __future__ import annotations

import random

import pytest

from virtnode.storage.volumes.ranges import Received


def test_chunks_in_order_grow_the_prefix() -> None:
    received = Received(100)
    received.add(0, 40)
    received.add(40, 70)
    assert (received.contiguous, received.total, received.complete) == (70, 70, False)
    received.add(70, 100)
    assert received.complete and received.ranges() == [(0, 100)]


def test_a_gap_stops_the_prefix_until_it_is_filled() -> None:
    received = Received(100)
    received.add(50, 100)
    received.add(0, 20)
    assert (received.contiguous, received.total) == (20, 70)
    assert received.ranges() == [(0, 20), (50, 100)]
    received.add(10, 60)  # overlaps both sides
    assert received.ranges() == [(0, 100)] and received.complete


def test_bytes_sent_twice_count_once() -> None:
    received = Received(10)
    for _ in range(3):
        received.add(2, 8)
    assert received.total == 6 and received.contiguous == 0


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, 11)])
def test_ranges_outside_the_upload_are_refused(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        Received(10).add(start, end)


def test_matches_a_set_of_bytes_whatever_the_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        size = rng.randrange(1, 60)
        received, bytes_in = Received(size), set[int]()
        for _ in range(rng.randrange(1, 12)):
            start = rng.randrange(0, size)
            end = rng.randrange(start, size + 1)
            received.add(start, end)
            bytes_in.update(range(start, end))
            prefix = next((i for i in range(size) if i not in bytes_in), size)
            assert (received.total, received.contiguous) == (len(bytes_in), prefix)
            assert all(s < e for s, e in received.ranges())
            assert all(a[1] < b[0] for a, b in zip(received.ranges(),
                                                   received.ranges()[1:], strict=False))

"""Which bytes of an upload have arrived: a set of half-open ranges, merged as they come.

Chunks of an upload may arrive in any order, twice, or cut short by a dropped connection;
what counts is which bytes were written. ``contiguous`` is what a client resuming a
sequential upload needs (the first byte still missing), ``complete`` what finalizing
needs.
"""

from __future__ import annotations

import bisect


class Received:
    """Disjoint, sorted ``[start, end)`` ranges of the bytes ``0 .. size`` written so far."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be at least 0")
        self.size = size
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        """Record that ``[start, end)`` was written. Raises ``ValueError`` outside the size."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range {start}-{end} is outside 0-{self.size}")
        if start == end:
            return
        # The first range that ends at or after start, and the first that starts after end:
        # every range between them touches [start, end) and is merged into it.
        low = bisect.bisect_left(self._ends, start)
        high = bisect.bisect_right(self._starts, end)
        if low < high:
            start = min(start, self._starts[low])
            end = max(end, self._ends[high - 1])
        self._starts[low:high] = [start]
        self._ends[low:high] = [end]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def total(self) -> int:
        """Bytes received, each counted once."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    @property
    def contiguous(self) -> int:
        """The length of the prefix received without a gap: where a sequential client
        resumes."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    @property
    def complete(self) -> bool:
        return self.contiguous == self.size

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any byte of ``[start, end)`` was received already."""
        index = bisect.bisect_right(self._ends, start)
        return index < len(self._starts) and self._starts[index] < end

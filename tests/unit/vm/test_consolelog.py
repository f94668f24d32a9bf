"""The serial output ring."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virtnode.vm.consolelog import ConsoleLog


@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(min_value=1, max_value=64))
def test_the_log_is_the_last_bytes_written(chunks: list[bytes], size: int) -> None:
    log = ConsoleLog(size)
    for chunk in chunks:
        log.append(chunk)
    everything = b"".join(chunks)
    assert log.snapshot() == everything[-size:]
    assert log.total == len(everything)


def test_clear_starts_again() -> None:
    log = ConsoleLog(4)
    log.append(b"abcdef")
    log.clear()
    assert log.snapshot() == b"" and log.total == 0 and len(log) == 0

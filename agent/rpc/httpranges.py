"""The byte ranges of HTTP (RFC 9110, section 14) as transfers use them: ``Range`` on a GET,
``Content-Range`` on a PUT. Plain functions; every range is half-open ``(start, end)``.

Only single ranges are served: a ``Range`` with several is refused like one that cannot be
satisfied (416), so a client never has to take a multipart answer apart.
"""

from __future__ import annotations

import re

_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")
_RANGE = re.compile(r"bytes=(\d{0,20})-(\d{0,20})")


class RangeError(ValueError):
    """A range header that is refused: ``status`` 400 (malformed) or 416 (not satisfiable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def content_range(value: str, size: int) -> tuple[int, int]:
    """The bytes a PUT with ``Content-Range: bytes a-b/total`` carries, in a file of
    ``size`` bytes. ``total`` must be ``size`` (or ``*``). Raises :class:`RangeError`."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise RangeError(400, f"Content-Range {value[:100]!r} is not 'bytes FIRST-LAST/SIZE'")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if first > last:
        raise RangeError(400, f"Content-Range {value!r}: the first byte is after the last")
    if total != "*" and int(total) != size:
        raise RangeError(416, f"Content-Range {value!r}: the upload is {size} bytes")
    if last >= size:
        raise RangeError(416, f"Content-Range {value!r}: the upload is {size} bytes")
    return first, last + 1


def byte_range(value: str, size: int) -> tuple[int, int]:
    """The bytes a GET with ``Range: bytes=...`` asks for, in a file of ``size`` bytes:
    ``a-b`` (``b`` past the end is cut to it), ``a-`` or the last ``n`` bytes ``-n``.
    Raises :class:`RangeError` (416) for several ranges, a malformed one, or one that
    starts past the end."""
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        raise RangeError(416, f"Range {value[:100]!r} is not one 'bytes=FIRST-LAST' range")
    first, last = match[1], match[2]
    if not first:
        if not last or int(last) == 0:
            raise RangeError(416, f"Range {value!r} asks for no bytes")
        return max(0, size - int(last)), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        raise RangeError(416, f"Range {value!r}: the first byte is after the last")
    if start >= size:
        raise RangeError(416, f"Range {value!r} starts past the end ({size} bytes)")
    return start, end

"""The recent output of a VM's serial console: a byte ring of fixed size.

A guest writes arbitrary bytes; the ring keeps the last ``size`` of them, whatever they
are, so that a client that connects late sees the recent past and ``VM.getConsoleLog``
can return it. ``total`` counts every byte ever written, so a reader can tell how much
fell off the front.
"""

from __future__ import annotations


class ConsoleLog:
    """The last ``size`` bytes written; older bytes are dropped."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a console log holds at least one byte")
        self._size = size
        self._data = bytearray()
        self.total = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self._size:
            self._data[:] = data[-self._size:]
            return
        self._data += data
        excess = len(self._data) - self._size
        if excess > 0:
            del self._data[:excess]

    def clear(self) -> None:
        """Forget the output (a new boot); ``total`` starts again too."""
        self._data.clear()
        self.total = 0

    def snapshot(self) -> bytes:
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)

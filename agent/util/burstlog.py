"""One log line for a burst of like events, instead of one per event."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class BurstLog:
    """Logs the first of a burst of like events, then at most one line per ``period``.

    The line that ends a quiet period says how many events it held back.
    """

    def __init__(self, logger: logging.Logger, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._period = period
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def __call__(self, level: int, message: str, *args: object) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._period:
            self.suppressed += 1
            return
        if self.suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, self.suppressed)
        self._last, self.suppressed = now, 0
        self._logger.log(level, message, *args)

"""A clock that stands still until the test moves it.

Code that takes its time from a callable (``time.time``, ``time.monotonic``) gets a
:class:`Clock` instead, and the test sets or advances :attr:`Clock.now`: a job's age, a
retention cutoff or a throttle's interval then passes in one assignment, with no waiting.

How faithfully: it answers what time it is and nothing more. It never moves by itself, and
nothing waits on it: the event loop's timers, sleeps and timeouts keep the real clock. It
suits code that reads the time to decide (timestamps, expiry, throttling), not code that
sleeps until a time comes.
"""

from __future__ import annotations


class Clock:
    """Returns :attr:`now` when called; the test sets it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

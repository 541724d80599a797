"""Test doubles shared by the in-memory runtime tests.

Rule: a fake here implements a production protocol exactly and nothing more, so a test that
passes against it says something about the real object. `FakeClock` is the coordinator's
`Clock` (`now`, `monotonic`, `wait`): time moves only when a test says so (`advance`) or when
something waits on it (`wait` advances by the timeout and returns at once: nothing sleeps).
"""

from __future__ import annotations

import threading


class FakeClock:
    """A clock that moves only when told. Thread-safe: a driver thread may read it while the
    test advances it.

    Also callable (`clock()` is `clock.now()`), so it fits a `Callable[[], float]` clock
    parameter as well as the `Clock` protocol."""

    def __init__(self, now: float = 1e9) -> None:
        self._lock = threading.Lock()
        self._now = float(now)
        self._monotonic = 0.0
        self.waits = 0  # how many times something waited on this clock

    def now(self) -> float:
        """Unix seconds (round log, deadlines, certificates)."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Seconds since the clock was made; moves with `now`."""
        with self._lock:
            return self._monotonic

    def __call__(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> float:
        """Move time forward by `seconds` (>= 0); returns the new `now`."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        with self._lock:
            self._now += seconds
            self._monotonic += seconds
            return self._now

    def wait(self, cond: threading.Condition, timeout_s: float) -> None:
        """What `cond.wait(timeout_s)` would cost in time, without the wait: the clock moves
        by `timeout_s` and the caller (holding `cond`'s lock) goes on at once. Whoever waits
        re-checks its condition, as after any wake-up."""
        del cond  # nothing to wait for: the caller re-checks its condition
        with self._lock:
            self.waits += 1
        self.advance(max(0.0, timeout_s))

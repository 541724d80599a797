"""The runtime's only source of time: wall clock, monotonic clock, and waiting on a condition.

Rule: the hub, its driver, uploads, recorder and final evaluation read time and wait only
through a `Clock`, so tests drive them with a fake one that advances instead of sleeping
(tests/fakes.py). The transport keeps real time: it is tested over real gRPC.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds: the round log, deadlines, certificate validity."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: how long to keep waiting."""
        ...

    def wait(self, cond: threading.Condition, timeout_s: float) -> None:
        """Wait on `cond` (its lock held) until notified or `timeout_s` passed."""
        ...


class SystemClock:
    """The real clock: `time.time`, `time.monotonic`, `Condition.wait`."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout_s: float) -> None:
        cond.wait(timeout_s)


SYSTEM_CLOCK = SystemClock()  # stateless: one is enough

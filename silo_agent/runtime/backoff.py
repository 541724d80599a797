"""Reconnect delays: exponential backoff with full jitter, capped.

Rule: pure. The random source is a parameter (`rng() -> float in [0, 1)`), so tests are exact;
`reset()` after a successful connection starts over from `initial_s`.
Full jitter (delay uniform in [0, min(max, initial * 2^attempt)]) keeps many silos that lost
the coordinator at the same moment from reconnecting in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    initial_s: float
    max_s: float
    rng: Callable[[], float]
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power would overflow for very long outages.
        return min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, 60))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to `max_s`."""
        delay = self.rng() * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

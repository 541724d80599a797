"""Fault injection for tests: `[debug] pause_after_phase` freezes the coordinator at one point.

Rule: off unless the configuration names a point (never set it in production). The first time
a round reaches that point, the thread that reached it writes `<state_dir>/paused-<point>`,
logs one warning and blocks until the coordinator is stopped by a signal, so a test can SIGKILL
it exactly there. The phase points are reached inside the hub's lock (by whichever thread closed
the phase: a silo's stream reader or the round driver on a deadline), so the round driver and
every stream's reader wait behind the paused thread: nothing moves the round on.

The points, in round order:
  offer        the round's offers are queued to the silos
  advertise    the secagg phase of that name closed (the next phase's frames are queued)
  share_keys   ditto
  masked       ditto: the masked uploads are in the accumulator
  consistency  ditto
  unmask       the round's outcome is the next model (secagg: the unmasking shares were
               collected); the model is not checkpointed or applied yet
  checkpoint   the new model's checkpoint file is written; the round log does not record it yet
  roundlog     the round log records the round completed; no silo was sent its RoundResult yet
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from coordinator.config import PAUSE_POINTS, CoordinatorConfig
from coordinator.rounds.phases import Event, PhaseEnded

log = logging.getLogger("silofed.coordinator")

POINTS = PAUSE_POINTS  # the configuration checks `[debug] pause_after_phase` against them
# The points that are the end of a secagg phase (a PhaseEnded event of that name).
PHASE_POINTS = frozenset({"advertise", "share_keys", "masked", "consistency"})


def configured_point(config: CoordinatorConfig) -> str | None:
    """The pause point `config` asks for (`[debug] pause_after_phase`), None for none."""
    return config.debug.pause_after_phase


class DebugPause:
    """Blocks at `point` (None: never) until `stop` is set (the coordinator's stop signal)."""

    def __init__(self, point: str | None, state_dir: Path, stop: threading.Event) -> None:
        if point is not None and point not in POINTS:
            raise ValueError(f"pause point must be one of {list(POINTS)}, got {point!r}")
        self.point = point
        self.state_dir = state_dir
        self.stop = stop
        self._reached = threading.Event()

    @classmethod
    def from_config(cls, config: CoordinatorConfig, stop: threading.Event) -> DebugPause:
        return cls(configured_point(config), config.state_dir, stop)

    def at(self, point: str) -> None:
        """Called where `point` is reached: blocks there if it is the configured point."""
        if point != self.point or self._reached.is_set():
            return
        self._reached.set()  # once: after a signal the coordinator goes on and stops
        # The marker before the line: whoever sees the line finds the marker (tests wait for
        # the line, then check the marker).
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / f"paused-{point}").write_text(f"{time.time()}\n")
        log.warning(
            "[debug] pause_after_phase = %s: paused; the coordinator does nothing more", point
        )
        self.stop.wait()

    def after_phases(self, events: Sequence[Event]) -> None:
        """Called with the events a protocol step produced: blocks if a phase that is the
        configured point has just ended."""
        if self.point not in PHASE_POINTS:
            return
        for event in events:
            if isinstance(event, PhaseEnded) and event.phase == self.point:
                self.at(event.phase)

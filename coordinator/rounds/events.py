"""What a round hands back to the hub after each input: frames to send and events to record.

Rule: plain values, no behaviour. A round kind (coordinator.rounds.kind) answers every input
with one `Step`: the protocol frames it produced for silos (the hub wraps each in a
`SecAggFrame` of the round), the round-log events (`coordinator.rounds.phases`: dropouts and
phase ends, in order), and what it did not take (`Ignored`: a stray or late message, logged
rate-limited by `cause`, never a dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.rounds.phases import Event

# (silo id, protocol frame payload): one frame for one silo.
Send = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message the round did not take; the silo stays in the round."""

    silo_id: str
    cause: str  # a short stable key ("stray report"): the hub rate-limits its log per cause
    detail: str  # the log line
    warning: bool = False  # a silo doing something it must not (else a late message: info)


@dataclass(frozen=True, slots=True)
class Step:
    """Given any sequences, holds tuples: two Steps are equal when they say the same."""

    sends: Sequence[Send] = ()
    events: Sequence[Event] = ()
    ignored: Sequence[Ignored] = ()

    def __post_init__(self) -> None:
        for name in ("sends", "events", "ignored"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def ignoring(silo_id: str, cause: str, detail: str, *, warning: bool = False) -> Step:
    """The Step of a message the round did not take."""
    return Step(ignored=(Ignored(silo_id, cause, detail, warning),))

"""What a round hands back to the hub after each input: frames to send and events to record.

Rule: plain values, no behaviour. A round kind (coordinator.rounds.kind) answers every input
with one `Step`: the protocol frames it produced for silos (the hub wraps each in a
`SecAggFrame` of the round), the round-log events (`coordinator.rounds.phases`: dropouts and
phase ends, in order), and what it did not take (`Ignored`: a stray or late message, logged
rate-limited by `cause`, never a dropout). `PrivacyRecord` is what a completed private round
hands over for the round log (storage reads it back as the same type).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.rounds.phases import Event

# (silo id, protocol frame payload): one frame for one silo.
Send = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message the round did not take; the silo stays in the round."""

    silo_id: str
    cause: str  # a short stable key ("stray report"): the hub rate-limits its log per cause
    template: str  # the log line's %-template (log records keep it: operators grep for it)
    args: tuple[object, ...] = ()
    warning: bool = False  # a silo doing something it must not (else a late message: info)

    @property
    def detail(self) -> str:
        """The log line."""
        return self.template % self.args


@dataclass(frozen=True, slots=True)
class Step:
    """Given any sequences, holds tuples: two Steps are equal when they say the same."""

    sends: Sequence[Send] = ()
    events: Sequence[Event] = ()
    ignored: Sequence[Ignored] = ()

    def __post_init__(self) -> None:
        for name in ("sends", "events", "ignored"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def ignoring(silo_id: str, cause: str, template: str, *args: object, warning: bool = False) -> Step:
    """The Step of a message the round did not take, logged as `template % args`."""
    return Step(ignored=(Ignored(silo_id, cause, template, args, warning),))


@dataclass(frozen=True, slots=True)
class PrivacyRecord:
    """Differential-privacy figures of a round: the noise added and the privacy spent so far
    (the round log's `privacy` row)."""

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    epsilon: float
    delta: float
    details: Mapping[str, object] = field(default_factory=dict)

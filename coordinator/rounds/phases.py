"""One round's lifecycle as a pure state machine: phases, deadlines, dropouts, abort.

Rule: nothing here touches the network, files or the clock. The driver feeds events
(`start`, `done`, `failed`, `disconnected`, `tick`) with the current time and gets back what
happened (`Event`s) to act on: record a dropout, start or end a phase, finish or abort.
Messages for another round, from silos not expected in the current phase, or after a silo
dropped, are refused (`accepted=False`) so the driver ignores their payloads.

A round runs the phases `offer` (the model reaches the silo) and then the aggregation
protocol's own phases. Each silo goes through them in order, and may run ahead of the round (a
fast silo can finish training while a slow one still downloads). The round's phase ends when
every silo still in it has finished it, or at its deadline; silos that have not finished by
then drop out for the round with that phase as the reason. Whenever fewer than `min_silos`
remain, the round aborts and nothing is aggregated.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NewType

RoundId = NewType("RoundId", int)

OFFER_PHASE = "offer"


class Stage(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    READY = "ready"  # every phase over with enough survivors: the driver aggregates
    ABORTED = "aborted"


class DropReason(enum.Enum):
    TIMEOUT = "TIMEOUT"
    DISCONNECTED = "DISCONNECTED"
    INVALID = "INVALID"


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    deadline_s: float

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ValueError(f"phase {self.name!r} deadline must be > 0")


@dataclass(frozen=True, slots=True)
class Dropped:
    silo_id: str
    phase: str
    reason: DropReason
    detail: str


@dataclass(frozen=True, slots=True)
class PhaseEnded:
    """`participant_set`: the round-log name of the set `survivors` is (secagg's U1..U5), ""
    for a phase whose survivors the log does not keep as a set."""

    phase: str
    started_at: float
    ended_at: float
    survivors: tuple[str, ...]
    participant_set: str = ""


@dataclass(frozen=True, slots=True)
class RoundReady:
    survivors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoundAborted:
    reason: str


Event = Dropped | PhaseEnded | RoundReady | RoundAborted


class RoundError(RuntimeError):
    """The driver called the machine out of order (a bug, not a silo's fault)."""


@dataclass(slots=True)
class RoundMachine:
    """The state of one round. Build one per round; `events` accumulate in order."""

    round_id: RoundId
    phases: Sequence[Phase]
    min_silos: int
    stage: Stage = Stage.IDLE
    phase_index: int = 0
    phase_started_at: float = 0.0
    active: list[str] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)  # phases each silo has finished
    dropped: dict[str, Dropped] = field(default_factory=dict)
    abort_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a round needs at least one phase")
        if self.min_silos < 1:
            raise ValueError("min_silos must be >= 1")

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    @property
    def deadline(self) -> float:
        return self.phase_started_at + self.phase.deadline_s

    @property
    def over(self) -> bool:
        return self.stage in (Stage.READY, Stage.ABORTED)

    def start(self, invited: Sequence[str], now: float) -> list[Event]:
        if self.stage is not Stage.IDLE:
            raise RoundError(f"round {self.round_id} already started")
        self.stage = Stage.RUNNING
        self.active = list(dict.fromkeys(invited))
        self.progress = dict.fromkeys(self.active, 0)
        self.phase_index = 0
        self.phase_started_at = now
        if len(self.active) < self.min_silos:
            return self._abort(f"only {len(self.active)} silos invited, need {self.min_silos}")
        return []

    def _phase_index(self, phase: str) -> int | None:
        for index, candidate in enumerate(self.phases):
            if candidate.name == phase:
                return index
        return None

    def expects(self, silo_id: str, round_id: int, phase: str) -> bool:
        """Whether a message from `silo_id` for (`round_id`, `phase`) belongs here and now:
        the silo is still in the round and `phase` is the next one it has to finish."""
        return (
            self.stage is Stage.RUNNING
            and round_id == self.round_id
            and silo_id in self.active
            and self._phase_index(phase) == self.progress[silo_id]
        )

    def done(self, silo_id: str, round_id: int, phase: str, now: float) -> tuple[bool, list[Event]]:
        """`silo_id` finished `phase`. Returns (accepted, events); late or stray = not accepted."""
        if not self.expects(silo_id, round_id, phase):
            return False, []
        self.progress[silo_id] += 1
        return True, self._advance(now)

    def _behind(self) -> list[str]:
        return [s for s in self.active if self.progress[s] <= self.phase_index]

    def _advance(self, now: float) -> list[Event]:
        """End every phase that all remaining silos have finished."""
        events: list[Event] = []
        while self.stage is Stage.RUNNING and not self._behind():
            events += self._end_phase(now)
        return events

    def failed(self, silo_id: str, detail: str, now: float) -> list[Event]:
        """`silo_id` sent something invalid for this round: it drops out."""
        return self._drop(silo_id, DropReason.INVALID, detail, now)

    def disconnected(self, silo_id: str, now: float) -> list[Event]:
        return self._drop(silo_id, DropReason.DISCONNECTED, "stream closed", now)

    def tick(self, now: float) -> list[Event]:
        """Advance time: at a phase deadline, silos that have not finished it drop out."""
        if self.stage is not Stage.RUNNING or now < self.deadline:
            return []
        events: list[Event] = []
        phase = self.phase.name
        for silo_id in self._behind():
            self.active.remove(silo_id)
            drop = Dropped(silo_id, phase, DropReason.TIMEOUT, f"missed the {phase} deadline")
            self.dropped[silo_id] = drop
            events.append(drop)
        events += self._end_phase(now)
        return events + self._advance(now)

    def _drop(self, silo_id: str, reason: DropReason, detail: str, now: float) -> list[Event]:
        if self.stage is not Stage.RUNNING or silo_id not in self.active:
            return []
        self.active.remove(silo_id)
        drop = Dropped(silo_id, self.phase.name, reason, detail)
        self.dropped[silo_id] = drop
        events: list[Event] = [drop]
        if len(self.active) < self.min_silos:
            return events + self._abort(
                f"only {len(self.active)} silos left in phase {self.phase.name}, "
                f"need {self.min_silos}"
            )
        return events + self._advance(now)

    def _end_phase(self, now: float) -> list[Event]:
        survivors = tuple(self.active)
        events: list[Event] = [PhaseEnded(self.phase.name, self.phase_started_at, now, survivors)]
        if len(survivors) < self.min_silos:
            return events + self._abort(
                f"only {len(survivors)} silos finished phase {self.phase.name}, "
                f"need {self.min_silos}"
            )
        if self.phase_index + 1 == len(self.phases):
            self.stage = Stage.READY
            return events + [RoundReady(survivors)]
        self.phase_index += 1
        self.phase_started_at = now
        return events

    def cancel(self, reason: str) -> list[Event]:
        """Abort from outside (the coordinator is stopping)."""
        if self.over:
            return []
        return self._abort(reason)

    def _abort(self, reason: str) -> list[Event]:
        self.stage = Stage.ABORTED
        self.abort_reason = reason
        return [RoundAborted(reason)]

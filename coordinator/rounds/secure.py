"""One secure-aggregation round as the hub drives it: `secagg.CoordinatorRound` plus deadlines.

Rule: pure (no gRPC, no files; the clock comes in as `now`). The hub hands over what arrived on
the silos' streams (protocol frames, complete masked vectors, broken streams) and the passing
of time; it gets back the frames to send and, in the runtime's own terms
(`coordinator.rounds.phases`
events), what to record: each phase that ended with its participant set (U1..U5) and timings,
and each silo that dropped out, with the phase and why. Each phase has its own deadline
(`[deadlines]`): `offer_s` covers the model download and the key advertisement, `train_s` the
local training and the masked upload.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from coordinator.rounds.phases import Dropped, DropReason, Event, PhaseEnded
from secagg.config import RoundConfig
from secagg.coordinator import CoordinatorRound, Phase, RoundOutcome, Send
from secagg.trust import Trust

# Each secagg phase, the [deadlines] key bounding it, and the participant set it produces.
PHASE_DEADLINE_KEYS: Mapping[Phase, str] = {
    Phase.ADVERTISE: "offer_s",
    Phase.SHARE_KEYS: "share_keys_s",
    Phase.MASKED: "train_s",
    Phase.CONSISTENCY: "consistency_s",
    Phase.UNMASK: "unmask_s",
}
PARTICIPANT_SET_OF: Mapping[Phase, str] = {
    Phase.ADVERTISE: "U1",
    Phase.SHARE_KEYS: "U2",
    Phase.MASKED: "U3",
    Phase.CONSISTENCY: "U4",
    Phase.UNMASK: "U5",
}


@dataclass(frozen=True, slots=True)
class Step:
    sends: list[Send] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


class SecureRound:
    """A `CoordinatorRound` with per-phase deadlines and round-log events. Not thread-safe."""

    def __init__(
        self,
        config: RoundConfig,
        trust: Trust,
        deadlines_s: Mapping[str, float],
        *,
        now: float,
        dp_rounds_before: int = 0,
    ) -> None:
        self.round = CoordinatorRound(
            config, trust, now=_utc(now), dp_rounds_before=dp_rounds_before
        )
        self.config = config
        self.deadlines_s = {p: float(deadlines_s[k]) for p, k in PHASE_DEADLINE_KEYS.items()}
        self.phase = self.round.phase
        self.phase_started_at = now
        self._why: dict[str, tuple[DropReason, str]] = {}
        self._reported: set[str] = set()
        self._aborted_in = ""
        self._cancelled = ""

    # ---- what the hub asks -----------------------------------------------------------------

    @property
    def phase_name(self) -> str:
        return self.phase.value

    @property
    def over(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    @property
    def result(self) -> RoundOutcome | None:
        return self.round.result

    @property
    def abort_reason(self) -> str | None:
        if self._cancelled:
            return f"{self._cancelled} (in phase {self._aborted_in})"
        reason = self.round.abort_reason
        return None if reason is None else f"{reason.name} in phase {self._aborted_in}"

    @property
    def deadline(self) -> float:
        return self.phase_started_at + self.deadlines_s.get(self.phase, 0.0)

    # ---- what happened ---------------------------------------------------------------------

    def handle(self, silo_id: str, data: bytes, now: float) -> Step:
        before = len(self.round.rejected)
        sends = self.round.handle(silo_id, data, now=_utc(now))
        self._note_rejections(before)
        return self._step(sends, now)

    def masked_vector(
        self,
        silo_id: str,
        header: bytes,
        vector: np.ndarray,
        now: float,
        *,
        vector_sha256: bytes | None = None,
    ) -> Step:
        before = len(self.round.rejected)
        sends = self.round.add_masked_vector(silo_id, header, vector, vector_sha256=vector_sha256)
        self._note_rejections(before)
        return self._step(sends, now)

    def lost(self, silo_id: str, now: float, why: str = "stream closed") -> Step:
        self._why.setdefault(silo_id, (DropReason.DISCONNECTED, why))
        return self._step(self.round.silo_lost(silo_id), now)

    def failed(self, silo_id: str, now: float, why: str) -> Step:
        """The hub refused what `silo_id` sent (outside the protocol's own checks)."""
        self._why.setdefault(silo_id, (DropReason.INVALID, why))
        return self._step(self.round.silo_lost(silo_id), now)

    def tick(self, now: float) -> Step:
        if self.over or now < self.deadline:
            return Step()
        for silo_id in self.round.waiting_for():
            missed = f"missed the {self.phase_name} deadline"
            self._why.setdefault(silo_id, (DropReason.TIMEOUT, missed))
        return self._step(self.round.deadline_passed(_utc(now)), now)

    def cancel(self, now: float, why: str) -> Step:
        """Abort from outside (the coordinator is stopping): nothing is unmasked."""
        if self.over:
            return Step()
        # The CoordinatorRound is dropped with this object: its accumulator and shares go too.
        self._aborted_in, self._cancelled = self.phase_name, why
        events: list[Event] = [PhaseEnded(self.phase_name, self.phase_started_at, now, ())]
        self.phase = Phase.ABORTED
        return Step([], events)

    # ---- translation -----------------------------------------------------------------------

    def _note_rejections(self, before: int) -> None:
        for r in self.round.rejected[before:]:
            self._why.setdefault(r.silo_id, (DropReason.INVALID, r.why))

    def _step(self, sends: list[Send], now: float) -> Step:
        if self._cancelled:
            return Step()
        events: list[Event] = []
        for silo_id, phase in self.round.dropouts.items():
            if silo_id in self._reported:
                continue
            self._reported.add(silo_id)
            reason, detail = self._why.get(
                silo_id, (DropReason.TIMEOUT, f"missed the {phase.value} deadline")
            )
            events.append(Dropped(silo_id, phase.value, reason, detail))
        if self.round.phase is not self.phase:
            ended = self.phase
            if self.round.phase is Phase.ABORTED:
                self._aborted_in = ended.value
            survivors = self.round.participants.get(PARTICIPANT_SET_OF.get(ended, ""), ())
            events.append(PhaseEnded(ended.value, self.phase_started_at, now, tuple(survivors)))
            self.phase = self.round.phase
            self.phase_started_at = now
        return Step(sends, events)

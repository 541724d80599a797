"""Secure aggregation as a round kind: `secagg.CoordinatorRound` plus deadlines and the outcome.

Rule: pure (no gRPC, no files; the clock comes in as `now`). The hub hands over what arrived on
the silos' streams (protocol frames, complete masked vectors, broken streams) and the passing
of time; it gets back the frames to send and, in the runtime's own terms
(`coordinator.rounds.phases` events), what to record: each phase that ended with its
participant set (U1..U5) and timings, and each silo that dropped out, with the phase and why.
Each phase has its own deadline (`[deadlines]`): `offer_s` covers the model download and the key
advertisement, `train_s` the local training and the masked upload. The unmask runs at the
driver's `tick` once the protocol has the shares it needs (`CoordinatorRound.unmask_ready`),
not while the last share is handled on a silo's stream.

`SecureRound` is the protocol with its deadlines; `SecureKind` is that round behind
`RoundKind` (what the hub drives): it keeps the metrics of the invited silos' reports and the
reason codes of the silos that refused the round, says who may upload a masked vector
(`status().uploads`: the masked phase waits for it, exactly the ring vector's size), and builds
the outcome: the decoded aggregate ḡ is applied only if clipped
inputs can produce it and the new model is finite (else the round is aborted and the model
kept); an abort caused by an out-of-range weight names the silos it proves sent one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from coordinator.rounds.events import PrivacyRecord, Step
from coordinator.rounds.kind import (
    Aborted,
    Completed,
    Frame,
    Loss,
    ModelDelivered,
    Outcome,
    PlaintextUpdate,
    Reported,
    RoundStatus,
    Upload,
    UploadSpec,
    stray,
)
from coordinator.rounds.phases import Dropped, DropReason, Event, PhaseEnded, RoundId
from coordinator.rounds.secure_config import (
    SECAGG,
    SecureRoundError,
    apply_aggregate,
    check_aggregate,
    check_finite,
)
from secagg.config import RoundConfig
from secagg.coordinator import CoordinatorRound, Phase, RoundOutcome, Send
from secagg.errors import MalformedMessage
from secagg.messages import AbortNotice as SecAggAbort
from secagg.messages import decode_message
from secagg.primitives import ring_dtype
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
    def cancelled(self) -> bool:
        return bool(self._cancelled)

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

    def drop(self, silo_id: str, reason: DropReason, why: str, now: float) -> Step:
        """`silo_id` will not answer again this round, for `reason`."""
        self._why.setdefault(silo_id, (reason, why))
        return self._step(self.round.silo_lost(silo_id), now)

    def tick(self, now: float) -> Step:
        if self.over:
            return Step()
        if self.round.unmask_ready:
            # The unmask runs here, on the driver's thread, never on a silo's reader: the last
            # share only makes the round ready. A wrong share may send it back to waiting.
            return self._step(self.round.finish(), now)
        if now < self.deadline:
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
        u = PARTICIPANT_SET_OF.get(self.phase, "")
        events: list[Event] = [PhaseEnded(self.phase_name, self.phase_started_at, now, (), u)]
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
            u = PARTICIPANT_SET_OF.get(ended, "")
            survivors = tuple(self.round.participants.get(u, ()))
            events.append(PhaseEnded(ended.value, self.phase_started_at, now, survivors, u))
            self.phase = self.round.phase
            self.phase_started_at = now
        return Step(sends, events)


class SecureKind:
    """A secure-aggregation round behind `RoundKind` (coordinator.rounds.kind). Not thread-safe."""

    aggregation = SECAGG
    train_params_json = ""  # inside the signed round config

    def __init__(
        self,
        config: RoundConfig,
        trust: Trust,
        deadlines_s: Mapping[str, float],
        global_state: Mapping[str, torch.Tensor],
        *,
        now: float,
        dp_rounds_before: int = 0,
    ) -> None:
        self.driver = SecureRound(
            config, trust, deadlines_s, now=now, dp_rounds_before=dp_rounds_before
        )
        self.round_id = RoundId(config.round_id)
        self.offer_config = config.encode()
        self._config = config
        self._invited = frozenset(config.invited)
        self._global_state = global_state
        self._ring = ring_dtype(config.ring_bits)
        self._metrics: dict[str, dict[str, float]] = {}
        self._refusals: dict[str, str] = {}
        self._outcome: Outcome | None = None

    # ---- inputs ----------------------------------------------------------------------------

    def start(self, invited: Sequence[str], now: float) -> Step:
        del invited  # the signed config names them
        self.driver.phase_started_at = now  # the offer is queued: the first deadline begins
        return Step()

    def frame(self, silo_id: str, frame: Frame, now: float) -> Step:
        if isinstance(frame, ModelDelivered):
            return Step()  # the advertisement proves it
        if isinstance(frame, Reported):
            # Under secagg a report carries evaluation metrics only (plaintext by design: the
            # silo's score of the global model it received, not its update).
            if frame.round_id == self.round_id and silo_id in self._invited:
                self._metrics[silo_id] = dict(frame.metrics)
            return Step()
        if frame.round_id != self.round_id:
            return stray(silo_id, frame)
        if self.driver.over:
            return Step()
        try:
            decoded = decode_message(frame.payload)
        except MalformedMessage:
            decoded = None  # the protocol refuses it, with the reason
        if isinstance(decoded, SecAggAbort) and silo_id in self._invited:
            self._refusals[silo_id] = decoded.reason.name[:64]
        return self.driver.handle(silo_id, frame.payload, now)

    def upload(self, silo_id: str, upload: Upload, now: float) -> Step:
        refusal = self._upload_refusal(silo_id)
        if isinstance(upload, PlaintextUpdate) or refusal is not None:
            return stray(silo_id, upload, refusal or "")
        if not upload.header:
            return self._failed(silo_id, "masked vector header without its protocol_header", now)
        if upload.round_id != self.round_id:
            why = f"masked vector for round {upload.round_id} during round {self.round_id}"
            return self._failed(silo_id, why, now)
        vector, length = upload.vector, self._config.length
        if vector.dtype != self._ring or vector.shape != (length,):
            why = (
                f"bad masked vector header: a masked vector has {length} elements of "
                f"{self._ring}, it has {vector.shape} of {vector.dtype}"
            )
            return self._failed(silo_id, why, now)
        # The transport hashed exactly these bytes as they arrived: no second pass.
        return self.driver.masked_vector(
            silo_id, upload.header, vector, now, vector_sha256=upload.sha256
        )

    def _upload_refusal(self, silo_id: str) -> str | None:
        """Why `silo_id` may not upload a masked vector now; None when the masked phase waits
        for its vector (it is in U2, not dropped, not uploaded yet)."""
        d = self.driver
        if d.over or d.round.phase is not Phase.MASKED:
            return f"round {self.round_id} is in phase {d.phase_name}, not masked"
        if silo_id not in d.round.waiting_for():
            return (
                f"round {self.round_id} waits for no masked vector from it (not in U2, "
                "dropped, or already uploaded)"
            )
        return None

    def lost(self, silo_id: str, loss: Loss, now: float) -> Step:
        if silo_id not in self._invited or self.driver.over:
            return Step()  # a connected silo that is not in this round
        if loss.refusal is not None:
            self._refusals[silo_id] = loss.refusal[:64]
        return self.driver.drop(silo_id, loss.reason, loss.detail, now)

    def _failed(self, silo_id: str, detail: str, now: float) -> Step:
        return self.lost(silo_id, Loss(DropReason.INVALID, detail), now)

    def tick(self, now: float) -> Step:
        return self.driver.tick(now)

    def cancel(self, why: str, now: float) -> Step:
        return self.driver.cancel(now, why)

    # ---- what the hub asks -----------------------------------------------------------------

    def outcome(self) -> Outcome | None:
        if not self.driver.over:
            return None
        if self._outcome is None:
            self._outcome = self._finish()
        return self._outcome

    def _finish(self) -> Outcome:
        d, cfg = self.driver, self._config
        metrics, refusals = dict(self._metrics), dict(self._refusals)
        result = None if d.cancelled else d.result
        if result is None:
            # silo id -> its encoded Blame: empty unless the round proved who sent a bad weight
            blamed = {} if d.cancelled else {str(k): v for k, v in d.round.blamed.items()}
            return Aborted(d.abort_reason or "aborted", metrics, blamed, refusals)
        survivors = tuple(str(s) for s in result.survivors)
        try:
            # ḡ is the weighted mean of the survivors' updates: all the coordinator ever
            # decodes. Applied only if clipped inputs can produce it and the new model is
            # finite; else the round is aborted, the model kept.
            check_aggregate(cfg, result.aggregate, result.weight_sum, len(survivors))
            # Into ḡ's memory (the accumulator's): ḡ is not needed after.
            new_state = apply_aggregate(
                self._global_state, result.aggregate, cfg.layout, in_place=True
            )
            check_finite(new_state)
        except SecureRoundError as exc:
            return Aborted(str(exc), metrics, refusals=refusals)
        finally:
            # The round keeps no reference to the accumulator (ḡ, now the new state, lives in
            # it): it is freed with the new state once that is saved and mapped from its file.
            d.round.result = dataclasses.replace(result, aggregate=np.empty(0, np.float32))
        report = result.dp_report
        privacy = None
        if report is not None:
            privacy = PrivacyRecord(
                mechanism="distributed discrete Gaussian",
                noise_multiplier=report.noise_multiplier,
                clip_norm=cfg.clip_l2,
                epsilon=report.epsilon,
                delta=report.delta,
                details={
                    "noise_divisor": report.noise_divisor,
                    "honest_survivors": report.honest_survivors,
                    "effective_multiplier": report.effective_multiplier,
                    "rounds_composed": report.rounds,
                },
            )
        weight_sum = result.weight_sum / cfg.weight_scale * cfg.weight_max
        protocol = d.round

        def announce(new_model_sha256: bytes) -> Step:
            return Step(protocol.announce(new_model_sha256))

        # Not a bound method: the cached outcome must not keep this round (its buffers, the
        # old model) alive in a reference cycle once the hub drops it.
        return Completed(new_state, weight_sum, survivors, metrics, privacy, announce)

    def status(self) -> RoundStatus:
        d = self.driver
        waiting = frozenset() if d.over else frozenset(str(s) for s in d.round.waiting_for())
        uploads: dict[str, UploadSpec] = {}
        if not d.over and d.round.phase is Phase.MASKED:
            size = self._config.length * self._ring.itemsize
            spec = UploadSpec(size, size, self._ring, self._config.length)
            uploads = dict.fromkeys(waiting, spec)
        return RoundStatus(
            self.round_id, d.phase_name, d.phase_started_at, d.deadline, d.over, waiting, uploads
        )

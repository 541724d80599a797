"""The plaintext baseline as a round kind: `RoundMachine` phases + FedAvg over accepted updates.

Rule: pure (values in, `Step`s out; `now` is an argument). The round runs the phases `offer`
(the model reaches the silo: its delivery marker or its train report proves it) and `train`
(the report, then the update it announced). An update is taken only from a silo that reported
in this round's train phase, with the digest it reported, and is checked WHOLE before any of it
is folded into the accumulator (fedavg.check_update): a refused update drops the silo
(INVALID) and leaves the accumulator as it was. A silo's metrics are kept when its update is
accepted, and the outcome is FedAvg over the accepted updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from coordinator.rounds.events import Step
from coordinator.rounds.fedavg import AggregationError, AggregationProtocol
from coordinator.rounds.kind import (
    Aborted,
    Completed,
    Frame,
    Loss,
    MaskedVector,
    ModelDelivered,
    Outcome,
    PlaintextUpdate,
    Reported,
    RoundStatus,
    SecAggPayload,
    Upload,
    UploadSpec,
    stray,
)
from coordinator.rounds.phases import (
    OFFER_PHASE,
    DropReason,
    Event,
    Phase,
    RoundId,
    RoundMachine,
    Stage,
)
from silofed.tensors import StateDecodeError, state_from_bytes

# What an update blob may add to the model's own size (header, names): beyond it, refused.
UPDATE_OVERHEAD = 1 << 20


def _no_announcement(new_model_sha256: bytes) -> Step:
    del new_model_sha256  # the RoundResult alone tells the silos
    return Step()


class PlaintextRound:
    """One plaintext-insecure round. Not thread-safe (the hub holds its lock around it)."""

    def __init__(
        self,
        round_id: RoundId,
        aggregation: AggregationProtocol,
        global_state: Mapping[str, torch.Tensor],
        *,
        deadlines_s: Mapping[str, float],
        min_silos: int,
        model_bytes: int,
        offer_config: bytes,
        train_params_json: str,
    ) -> None:
        phases = [Phase(OFFER_PHASE, deadlines_s["offer_s"])] + [
            Phase(name, float(deadlines_s[key])) for name, key in aggregation.phases
        ]
        self.round_id = round_id
        self.aggregation = aggregation.name
        self.offer_config = offer_config
        self.train_params_json = train_params_json
        self.machine = RoundMachine(round_id, phases, min_silos)
        self._protocol = aggregation
        self._train = aggregation.phases[0][0]  # the phase of the report and the update
        self._max_update_bytes = 2 * model_bytes + UPDATE_OVERHEAD
        self._reports: dict[str, Reported] = {}
        self._metrics: dict[str, dict[str, float]] = {}
        self._refusals: dict[str, str] = {}
        self._outcome: Outcome | None = None
        aggregation.begin(global_state)

    # ---- inputs ----------------------------------------------------------------------------

    def start(self, invited: Sequence[str], now: float) -> Step:
        return Step(events=self.machine.start(invited, now))

    def frame(self, silo_id: str, frame: Frame, now: float) -> Step:
        m = self.machine
        if isinstance(frame, ModelDelivered):
            return Step(events=m.done(silo_id, frame.round_id, OFFER_PHASE, now)[1])
        if isinstance(frame, SecAggPayload):
            return stray(silo_id, frame)
        events: list[Event] = []
        if m.expects(silo_id, frame.round_id, OFFER_PHASE):
            # A report proves the model arrived, even before the stream's delivery marker.
            events += m.done(silo_id, frame.round_id, OFFER_PHASE, now)[1]
        if not m.expects(silo_id, frame.round_id, self._train):
            return Step(events=events, ignored=stray(silo_id, frame).ignored)
        self._reports[silo_id] = frame  # a second report replaces the first
        return Step(events=events)

    def upload(self, silo_id: str, upload: Upload, now: float) -> Step:
        if isinstance(upload, MaskedVector):
            return stray(silo_id, upload)
        return self._update(silo_id, upload, now)

    def _update(self, silo_id: str, upload: PlaintextUpdate, now: float) -> Step:
        report = self._reports.get(silo_id)
        if report is None or not self.machine.expects(silo_id, upload.round_id, self._train):
            return stray(silo_id, upload)
        if upload.sha256 != report.update_sha256:
            return self._failed(silo_id, "update blob does not match its train report", now)
        if len(upload.data) > self._max_update_bytes:
            return self._failed(
                silo_id,
                f"bad update header: blob of {len(upload.data)} bytes exceeds the limit of "
                f"{self._max_update_bytes} bytes",
                now,
            )
        try:
            update = state_from_bytes(upload.data)
            # Checked whole before any of it is added: a refused update leaves the accumulator
            # as it was.
            self._protocol.contribute(silo_id, int(report.num_examples), update)
        except (AggregationError, StateDecodeError) as exc:
            return self._failed(silo_id, f"update refused: {exc}", now)
        self._metrics[silo_id] = dict(report.metrics)
        return Step(events=self.machine.done(silo_id, upload.round_id, self._train, now)[1])

    def lost(self, silo_id: str, loss: Loss, now: float) -> Step:
        if loss.refusal is not None:
            self._refusals[silo_id] = loss.refusal[:64]
        if loss.reason is DropReason.DISCONNECTED:
            return Step(events=self.machine.disconnected(silo_id, now))
        return Step(events=self.machine._drop(silo_id, loss.reason, loss.detail, now))

    def _failed(self, silo_id: str, detail: str, now: float) -> Step:
        return Step(events=self.machine.failed(silo_id, detail, now))

    def tick(self, now: float) -> Step:
        return Step(events=self.machine.tick(now))

    def cancel(self, why: str, now: float) -> Step:
        del now  # the machine's abort carries no time
        return Step(events=self.machine.cancel(why))

    # ---- what the hub asks -----------------------------------------------------------------

    def outcome(self) -> Outcome | None:
        m = self.machine
        if not m.over:
            return None
        if self._outcome is None:
            self._outcome = self._finish()
        return self._outcome

    def _finish(self) -> Outcome:
        metrics = dict(self._metrics)
        if self.machine.stage is not Stage.READY:
            reason = self.machine.abort_reason or "aborted"
            return Aborted(reason, metrics, refusals=dict(self._refusals))
        try:
            result = self._protocol.finish()
        except AggregationError as exc:  # NON_FINITE_MODEL: the old model is kept
            return Aborted(str(exc), metrics, refusals=dict(self._refusals))
        return Completed(
            result.new_state,
            result.weight_sum,
            result.contributors,
            metrics,
            None,
            _no_announcement,
        )

    def status(self) -> RoundStatus:
        m = self.machine
        running = m.stage is Stage.RUNNING
        behind = frozenset(s for s in m.active if m.progress[s] <= m.phase_index) if running else ()
        uploads = {
            silo_id: UploadSpec(self._max_update_bytes, sha256=report.update_sha256)
            for silo_id, report in self._reports.items()
            if m.expects(silo_id, self.round_id, self._train)
        }
        return RoundStatus(
            self.round_id,
            m.phase.name,
            m.phase_started_at,
            m.deadline,
            m.over,
            frozenset(behind),
            uploads,
        )

"""The final evaluation: once the federation finished, the silos score its last model.

Rule: `FinalEvaluationRun` is the evaluation's state and its rules, with no I/O and no clock of
its own; `run_final_evaluation` (the driver thread, via `Hub.run_final_evaluation`) sends the
offers, the hub feeds the silos' answers into the run under its lock, and
`record_final_evaluation` writes the result to the round log. It is not a round: nothing is
trained or aggregated, no round id is taken, and nothing in it counts as a completed round.

What is asked: every connected silo gets a RoundOffer with `aggregation = "evaluate"`, the
completed round's id and model (a GLOBAL_MODEL blob), and an empty config. What is accepted: per
asked silo, the first TrainReport for that round id whose metrics are all `eval_*` (a late
report of the round itself also carries `train_*` figures; it is not an answer), or an
AbortNotice for that round id, recorded as a refusal with its reason code unless an answer
follows. The wait ends when every asked silo answered, refused or left, or at the deadline
([deadlines] offer_s + train_s).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.runtime.driver import TICK_S
from coordinator.runtime.stream import Blob
from coordinator.storage.checkpoints import CheckpointCorrupt
from protos import federation_pb2 as pb
from protos.names import abort_name, aggregation_value

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub

log = logging.getLogger("silofed.coordinator")

EVALUATE = "evaluate"  # RoundOffer.aggregation of the final evaluation
EVAL_PREFIX = "eval_"


@dataclass
class FinalEvaluationRun:
    """One final evaluation in progress (mutated only under the hub's lock)."""

    round_id: int
    model_sha256: str  # hex
    asked: frozenset[str]
    started_at: float
    deadline: float  # on the same clock as `started_at`
    answers: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)

    def take(self, silo_id: str, message: pb.SiloMessage) -> bool:
        """Consume `message` if it answers this evaluation; False leaves it to the rounds."""
        if silo_id not in self.asked or silo_id in self.answers:
            return False
        kind = message.WhichOneof("kind")
        if kind == "train_report":
            report = message.train_report
            metrics = dict(report.metrics)
            if report.round_id != self.round_id or not metrics:
                return False
            if not all(k.startswith(EVAL_PREFIX) for k in metrics):
                return False  # a late report of the round itself (train_* too): not an answer
            self.answers[silo_id] = metrics
            self.refusals.pop(silo_id, None)  # a late notice of the round itself was no refusal
            return True
        if kind == "abort" and message.abort.round_id == self.round_id:
            if silo_id in self.refusals:
                return False
            self.refusals[silo_id] = (
                abort_name(message.abort.code) if message.abort.code else "REFUSED"
            )
            return True
        return False

    def waiting_for(self, connected: Iterable[str]) -> frozenset[str]:
        """Asked silos still connected that have neither answered nor refused."""
        return (self.asked & frozenset(connected)) - set(self.answers) - set(self.refusals)

    def over(self, now: float, connected: Iterable[str]) -> bool:
        return now >= self.deadline or not self.waiting_for(connected)

    def global_metrics(self) -> dict[str, float]:
        return mean_eval(self.answers.values())


def mean_eval(per_silo: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Global metric = unweighted mean over silos of each `eval_*` metric they reported (the
    same rule as a round's `global_metrics`)."""
    sums: dict[str, list[float]] = {}
    for metrics in per_silo:
        for key, value in metrics.items():
            if key.startswith(EVAL_PREFIX):
                sums.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def run_final_evaluation(hub: Hub) -> None:
    """Have the connected silos evaluate the last completed round's model, and record it in
    the round log, once per model. Skipped when the log already holds it; not recorded when
    the coordinator stops meanwhile (the next start runs it). Never raises for a silo's or a
    checkpoint's fault: the federation's rounds are done whatever happens here."""
    target = hub.roundlog.latest_checkpoint()
    if target is None or target.round_id < 1:
        return
    if hub.roundlog.final_evaluation(target.round_id) is not None:
        log.info("the final model (round %d) was already evaluated", target.round_id)
        return
    if not hub.ran_any:  # restarted after the last round: wait for the silos to return
        cfg = hub.config.rounds
        hub.wait_for_silos(cfg.start_silos or cfg.min_silos, cfg.start_timeout_s)
    if hub.stopping.is_set():
        return
    try:
        model = hub.checkpoints.load_bytes(target.path, target.sha256)
    except CheckpointCorrupt as exc:
        log.error("final evaluation not run: %s", exc)
        return
    with hub.lock:
        # An excluded silo's figures would enter the global metrics: it is not asked.
        asked = {k: hub.sessions[k] for k in hub.eligible()}
        if not asked:
            log.warning(
                "final evaluation not run: no silo connected; start the coordinator again to run it"
            )
            return
        d = hub.config.deadlines
        now = hub.clock.now()
        run = FinalEvaluationRun(
            target.round_id, target.sha256, frozenset(asked), now, now + d.offer_s + d.train_s
        )
        digest = bytes.fromhex(target.sha256)
        offer = pb.RoundOffer(
            round_id=target.round_id,
            aggregation=aggregation_value(EVALUATE),
            model_sha256=digest,
            model_bytes=len(model),
        )
        for s in asked.values():
            s.send(pb.CoordinatorMessage(round_offer=offer))
            s.send(Blob(target.round_id, pb.GLOBAL_MODEL, model, digest))
        del model
        hub.final = run
        log.info(
            "final evaluation of round %d's model %s: asking %d silos",
            target.round_id,
            target.sha256[:12],
            len(asked),
        )
        try:
            while not hub.stopping.is_set():
                # A silo that left or reconnected (a new stream never got the offer) is
                # no longer waited for.
                same = [k for k, s in hub.sessions.items() if asked.get(k) is s]
                if run.over(hub.clock.now(), same):
                    break
                hub.clock.wait(hub.changed, TICK_S)
        finally:
            hub.final = None
        if hub.stopping.is_set():
            log.warning("final evaluation interrupted; the next start runs it")
            return
        record_final_evaluation(hub, run)


def record_final_evaluation(hub: Hub, run: FinalEvaluationRun) -> None:
    global_metrics = run.global_metrics()
    hub.roundlog.record_final_evaluation(
        run.round_id,
        model_sha256=run.model_sha256,
        started_at=run.started_at,
        ended_at=hub.clock.now(),
        asked=run.asked,
        silo_metrics=run.answers,
        refusals=run.refusals,
        global_metrics=global_metrics,
    )
    for silo_id, reason in sorted(run.refusals.items()):
        log.warning("final evaluation: %s declined (%s)", silo_id, reason)
    silent = sorted(run.asked - set(run.answers) - set(run.refusals))
    if silent:
        log.warning("final evaluation: no answer from %s", ", ".join(silent))
    shown = " ".join(f"{k}={v:.4f}" for k, v in global_metrics.items())
    log.info(
        "final evaluation of round %d's model: %d of %d silos answered %s",
        run.round_id,
        len(run.answers),
        len(run.asked),
        shown,
    )

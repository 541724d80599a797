"""The final evaluation: once the federation finished, the silos score its last model.

Rule: this module is the evaluation's state and its rules, with no I/O and no clock of its own;
`Hub.run_final_evaluation` (serve.py) sends the offers, feeds the silos' answers in here under
the hub's lock and writes the result to the round log. It is not a round: nothing is trained or
aggregated, no round id is taken, and nothing in it counts as a completed round.

What is asked: every connected silo gets a RoundOffer with `aggregation = "evaluate"`, the
completed round's id and model (a GLOBAL_MODEL blob), and an empty config. What is accepted: per
asked silo, the first TrainReport for that round id whose metrics are all `eval_*` (a late
report of the round itself also carries `train_*` figures; it is not an answer), or an
AbortNotice for that round id, recorded as a refusal with its reason code unless an answer
follows. The wait ends when every asked silo answered, refused or left, or at the deadline
([deadlines] offer_s + train_s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from protos import federation_pb2 as pb

EVALUATE = "evaluate"  # RoundOffer.aggregation of the final evaluation
EVAL_PREFIX = "eval_"
REASON_MAX = 64  # refusal codes are short; a longer text is cut, never stored whole


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
            self.refusals[silo_id] = (message.abort.reason or "REFUSED")[:REASON_MAX]
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

"""The coordinator's rules for answers to the final evaluation
(coordinator/runtime/final_evaluation.py)."""

from __future__ import annotations

from coordinator.runtime.final_evaluation import FinalEvaluationRun, mean_eval
from protos import federation_pb2 as pb
from protos.names import abort_value

A, B, C, D = (f"spiffe://r/silo/{n}" for n in "abcd")


def report(round_id: int, **metrics: float) -> pb.SiloMessage:
    return pb.SiloMessage(train_report=pb.TrainReport(round_id=round_id, metrics=metrics))


def abort(round_id: int, reason: str) -> pb.SiloMessage:
    return pb.SiloMessage(abort=pb.AbortNotice(round_id=round_id, code=abort_value(reason)))


def test_only_eval_answers_of_asked_silos_for_the_round_count() -> None:
    run = FinalEvaluationRun(5, "ab" * 32, frozenset({A, B, C}), started_at=0.0, deadline=10.0)
    assert run.waiting_for([A, B, C, D]) == {A, B, C}
    # A late report of round 5 itself (train_* figures too), another round, an unasked silo:
    # none is an answer, and each is left to the round logic.
    assert not run.take(A, report(5, eval_acc=0.1, train_loss=2.0))
    assert not run.take(A, report(4, eval_acc=0.1))
    assert not run.take(D, report(5, eval_acc=0.1))
    assert not run.take(A, pb.SiloMessage(secagg=pb.SecAggFrame(round_id=5, payload=b"x")))
    assert run.take(A, report(5, eval_acc=0.9))
    assert not run.take(A, report(5, eval_acc=0.1))  # the first answer stands
    assert run.take(B, abort(5, "NOT_THE_FINAL_MODEL"))
    assert run.waiting_for([A, B, C]) == {C}
    assert not run.over(1.0, [A, B, C])
    assert run.over(1.0, [A, B])  # C left: nobody to wait for
    assert run.over(10.0, [A, B, C])  # the deadline
    # A late notice of the round itself is overridden by the answer that follows it.
    assert run.take(C, abort(5, "TIMEOUT")) and run.take(C, report(5, eval_acc=0.5))
    assert run.refusals == {B: "NOT_THE_FINAL_MODEL"}
    assert run.answers == {A: {"eval_acc": 0.9}, C: {"eval_acc": 0.5}}
    assert run.global_metrics() == {"eval_acc": 0.7}


def test_mean_eval_averages_each_eval_metric_over_the_silos_reporting_it() -> None:
    got = mean_eval([{"eval_a": 1.0, "eval_b": 4.0}, {"eval_a": 3.0}, {"train_x": 9.0}])
    assert got == {"eval_a": 2.0, "eval_b": 4.0}

"""The coordinator's stall watch (coordinator/rounds/stall.py): backoff, causes, the diagnosis."""

from __future__ import annotations

import pytest

from coordinator.rounds.stall import Diagnosis, Proceed, RoundEnd, StallWatch


def _aborted(
    round_id: int, reason: str = "THRESHOLD_VIOLATION in phase consistency", **kw: object
) -> RoundEnd:
    return RoundEnd(round_id, False, reason, **kw)  # type: ignore[arg-type]


def test_backoff_doubles_up_to_the_cap_and_a_completed_round_resets_it() -> None:
    watch = StallWatch(limit=10, initial_s=1.0, max_s=5.0)
    waits = [watch.observe(_aborted(r)) for r in range(1, 6)]
    assert [v.wait_s for v in waits if isinstance(v, Proceed)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert watch.observe(RoundEnd(6, True)) == Proceed(0.0, 0)
    first = watch.observe(_aborted(7))
    assert isinstance(first, Proceed) and first.wait_s == 1.0 and first.aborted_in_a_row == 1


def test_the_same_cause_limit_times_in_a_row_stops_with_a_diagnosis() -> None:
    watch = StallWatch(limit=3, initial_s=0.1, max_s=1.0)
    verdicts = [
        watch.observe(_aborted(1, dropped=("spiffe://f/silo/c",))),
        watch.observe(_aborted(2)),
        watch.observe(_aborted(3, dropped=("spiffe://f/silo/c",))),
    ]
    assert all(isinstance(v, Proceed) for v in verdicts[:2])
    diagnosis = verdicts[2]
    assert isinstance(diagnosis, Diagnosis)
    assert diagnosis.cause == "THRESHOLD_VIOLATION"
    assert diagnosis.rounds == (1, 2, 3)
    assert diagnosis.silos == ("spiffe://f/silo/c",)
    text = str(diagnosis)
    assert "3 rounds in a row (1-3)" in text and "spiffe://f/silo/c" in text
    assert "bring the missing silos back" in text  # the operator's options for this cause


def test_a_new_cause_starts_its_own_count() -> None:
    watch = StallWatch(limit=2, initial_s=0.1, max_s=1.0)
    assert isinstance(watch.observe(_aborted(1)), Proceed)
    assert isinstance(watch.observe(_aborted(2, "TIMEOUT in phase masked")), Proceed)
    assert isinstance(watch.observe(_aborted(3, "TIMEOUT in phase unmask")), Diagnosis)


def test_the_silos_own_reason_is_the_cause_when_most_refusers_agree() -> None:
    refused = {"a": "REPLAY", "b": "REPLAY", "c": "TIMEOUT"}
    end = _aborted(1, "THRESHOLD_VIOLATION in phase advertise", refusals=refused)
    assert end.cause == "REPLAY"
    split = _aborted(
        2, "THRESHOLD_VIOLATION in phase advertise", refusals={"a": "X", "b": "Y", "c": "Z"}
    )
    assert split.cause == "THRESHOLD_VIOLATION"
    assert _aborted(3, "CANNOT_CONFIGURE: [secagg] threshold 4").cause == "CANNOT_CONFIGURE"
    assert _aborted(4, "aborted").cause == "ABORTED"


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        StallWatch(limit=0, initial_s=1.0, max_s=1.0)
    with pytest.raises(ValueError):
        StallWatch(limit=3, initial_s=2.0, max_s=1.0)


def test_too_few_survivors_because_silos_are_gone_is_one_cause_with_not_enough_silos() -> None:
    watch = StallWatch(limit=2, initial_s=0.1, max_s=1.0)
    lost = _aborted(1, dropped=("s3",), absent=("s3",))
    assert lost.cause == "NOT_ENOUGH_SILOS"
    assert _aborted(1, dropped=("s3",)).cause == "THRESHOLD_VIOLATION"  # it came back
    assert isinstance(watch.observe(lost), Proceed)
    waited = _aborted(2, "NOT_ENOUGH_SILOS: 2 silos connected, 3 needed", dropped=("s3",))
    verdict = watch.observe(waited)
    assert isinstance(verdict, Diagnosis) and verdict.rounds == (1, 2)
    assert verdict.silos == ("s3",) and "start their agents again" in verdict.options


def test_a_round_that_blamed_a_silo_clears_the_count_and_retries_at_once() -> None:
    # The blamed silo is excluded by the driver: its round is no step towards a stall, and the
    # retry without it need not wait. Without a blame the same abort counts as usual.
    watch = StallWatch(limit=2, initial_s=1.0, max_s=5.0)
    reason = "OVERFLOW_RULE in phase unmask"
    assert isinstance(watch.observe(_aborted(1, reason)), Proceed)
    blamed = watch.observe(_aborted(2, reason, blamed=("spiffe://f/silo/evil",)))
    assert blamed == Proceed(0.0, 0, "OVERFLOW_RULE")
    assert watch.aborted_in_a_row == 0
    again = watch.observe(_aborted(3, reason))
    assert isinstance(again, Proceed) and again.aborted_in_a_row == 1 and again.wait_s == 1.0
    assert isinstance(watch.observe(_aborted(4, reason)), Diagnosis)

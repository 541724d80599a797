"""The round state machine with a fake clock: deadlines, dropouts by phase, aborts, late input."""

from __future__ import annotations

import pytest

from coordinator.rounds.phases import (
    Dropped,
    DropReason,
    Phase,
    PhaseEnded,
    RoundAborted,
    RoundError,
    RoundId,
    RoundMachine,
    RoundReady,
    Stage,
)

PHASES = (Phase("offer", 10.0), Phase("train", 30.0))
SILOS = ("a", "b", "c")


def machine(min_silos: int = 2) -> RoundMachine:
    m = RoundMachine(RoundId(7), PHASES, min_silos)
    assert m.start(SILOS, now=100.0) == []
    return m


def test_all_silos_finish_every_phase() -> None:
    m = machine()
    for s in SILOS[:2]:
        assert m.done(s, 7, "offer", 101.0) == (True, [])
    ok, events = m.done("c", 7, "offer", 102.0)
    assert ok and events == [PhaseEnded("offer", 100.0, 102.0, SILOS)]
    assert m.phase.name == "train" and m.deadline == 132.0
    for s in SILOS[:2]:
        assert m.done(s, 7, "train", 110.0)[0]
    ok, events = m.done("c", 7, "train", 111.0)
    assert events == [PhaseEnded("train", 102.0, 111.0, SILOS), RoundReady(SILOS)]
    assert m.stage is Stage.READY


def test_deadline_drops_the_slow_silo_in_that_phase_and_round_goes_on() -> None:
    m = machine()
    m.done("a", 7, "offer", 101.0)
    m.done("b", 7, "offer", 101.0)
    m.done("c", 7, "offer", 101.0)
    m.done("a", 7, "train", 120.0)
    m.done("b", 7, "train", 125.0)
    assert m.tick(130.9) == []  # just before the deadline nothing happens
    events = m.tick(131.0)
    assert events[0] == Dropped("c", "train", DropReason.TIMEOUT, "missed the train deadline")
    assert events[-1] == RoundReady(("a", "b"))
    assert m.dropped["c"].phase == "train"


def test_dropout_in_offer_phase_is_recorded_with_that_phase() -> None:
    m = machine()
    m.done("a", 7, "offer", 101.0)
    m.done("b", 7, "offer", 101.0)
    events = m.tick(110.0)
    assert [e for e in events if isinstance(e, Dropped)] == [
        Dropped("c", "offer", DropReason.TIMEOUT, "missed the offer deadline")
    ]
    assert m.phase.name == "train" and m.active == ["a", "b"]
    # c's late train message is refused: its payload must be ignored
    assert m.done("c", 7, "train", 111.0) == (False, [])


def test_abort_below_min_silos() -> None:
    m = machine(min_silos=3)
    m.done("a", 7, "offer", 101.0)
    events = m.disconnected("b", 102.0)
    assert events[0].__class__ is Dropped and events[0].reason is DropReason.DISCONNECTED
    assert isinstance(events[-1], RoundAborted) and "need 3" in events[-1].reason
    assert m.stage is Stage.ABORTED and m.abort_reason is not None
    assert m.tick(1000.0) == []
    assert m.done("c", 7, "offer", 103.0) == (False, [])


def test_too_few_invited_aborts_at_start() -> None:
    m = RoundMachine(RoundId(1), PHASES, 2)
    events = m.start(["a"], now=0.0)
    assert isinstance(events[0], RoundAborted) and m.over


def test_messages_for_other_rounds_phases_or_silos_are_refused() -> None:
    m = machine()
    assert m.done("a", 6, "offer", 101.0) == (False, [])  # older round
    assert m.done("a", 7, "train", 101.0) == (False, [])  # wrong phase
    assert m.done("zz", 7, "offer", 101.0) == (False, [])  # not invited
    assert m.done("a", 7, "offer", 101.0)[0]
    assert m.done("a", 7, "offer", 101.5) == (False, [])  # duplicate


def test_invalid_message_drops_silo_and_completes_phase_if_others_done() -> None:
    m = machine()
    m.done("a", 7, "offer", 101.0)
    m.done("b", 7, "offer", 101.0)
    events = m.failed("c", "bad blob", 102.0)
    assert events[0] == Dropped("c", "offer", DropReason.INVALID, "bad blob")
    assert isinstance(events[1], PhaseEnded) and events[1].survivors == ("a", "b")


def test_cancel_and_double_start() -> None:
    m = machine()
    with pytest.raises(RoundError):
        m.start(SILOS, now=0.0)
    assert isinstance(m.cancel("stopping")[0], RoundAborted)
    assert m.cancel("again") == []


def test_disconnect_of_a_silo_that_already_dropped_is_ignored() -> None:
    m = machine()
    m.tick(110.0)  # nobody finished the offer: all dropped -> abort
    assert m.stage is Stage.ABORTED
    assert m.disconnected("a", 111.0) == []


def test_fast_silo_may_finish_training_before_the_offer_phase_ends() -> None:
    m = machine()
    assert m.done("a", 7, "offer", 101.0)[0]
    assert m.done("a", 7, "train", 102.0) == (True, [])  # ran ahead: accepted, phase stays
    assert m.phase.name == "offer"
    m.done("b", 7, "offer", 103.0)
    ok, events = m.done("c", 7, "offer", 104.0)
    assert ok and [type(e) for e in events] == [PhaseEnded]
    m.done("b", 7, "train", 105.0)
    ok, events = m.done("c", 7, "train", 106.0)
    assert events[-1] == RoundReady(SILOS)


def test_offer_deadline_then_train_already_done_by_all_survivors_ends_both_phases() -> None:
    m = machine()
    for s in ("a", "b"):
        m.done(s, 7, "offer", 101.0)
        m.done(s, 7, "train", 102.0)
    events = m.tick(110.0)
    assert [type(e) for e in events] == [Dropped, PhaseEnded, PhaseEnded, RoundReady]
    assert m.stage is Stage.READY

"""The coordinator round's transition tables (`_ACCEPTS`, `_CLOSES` in secagg.coordinator).

Each phase takes exactly the messages its table row names (anything else is rejected with
"X not expected in <phase>" and changes nothing), every live phase closes into the next one
the table names, and the tables call the round's own methods so a subclass's override (the
dishonest-coordinator harness relies on it) is the one that runs.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from secagg.coordinator import _ACCEPTS, _CLOSES, CoordinatorRound, Phase
from secagg.errors import AbortReason
from secagg.identity import SiloId
from secagg.messages import (
    AbortNotice,
    Message,
    SignedEnvelope,
    UnmaskShares,
    encode_message,
)
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import NOW, federation
from tests.secagg.test_messages_validation import VALID

ORDER = [Phase.ADVERTISE, Phase.SHARE_KEYS, Phase.MASKED, Phase.CONSISTENCY, Phase.UNMASK]


def _round_at(phase: Phase) -> tuple[Round, CoordinatorRound]:
    fed = federation()
    cfg = make_config(fed, 4, 8)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)))
    rnd = r.run(stop_at=phase) if phase is not Phase.ADVERTISE else r.coordinator
    assert rnd.phase is phase
    return r, rnd


def test_every_live_phase_closes_into_the_next_one() -> None:
    assert [p for p in ORDER if p in _CLOSES] == ORDER
    assert set(_CLOSES) == set(ORDER)  # DONE and ABORTED close nothing
    assert [_CLOSES[p].next for p in ORDER[:-1]] == ORDER[1:]
    # UNMASK ends in DONE once enough shares arrive; its deadline can only abort
    assert _CLOSES[Phase.UNMASK].next is Phase.ABORTED


class _Recording(CoordinatorRound):
    """Records (phase before, phase after) of every phase close: all answered, or the
    driver's deadline (both go through `deadline_passed`)."""

    moves: list[tuple[Phase, Phase]]

    def deadline_passed(self, now: dt.datetime) -> list[tuple[SiloId, bytes]]:
        before = self.phase
        sends = super().deadline_passed(now)
        self.moves = [*getattr(self, "moves", []), (before, self.phase)]
        return sends


@pytest.mark.parametrize("phase", ORDER[:-1])
def test_a_deadline_moves_to_the_phase_the_table_names(phase: Phase) -> None:
    # one silo of five goes silent in `phase`: only the driver's deadline can close it, with
    # the four that answered (t = 4); every close must go to the phase the table names
    fed = federation()
    cfg = make_config(fed, 5, 8)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)))
    r.drop_at = {cfg.invited[-1]: phase.value}
    r.coordinator = _Recording(cfg, fed.trust, now=NOW, keep_ring_sum=True)
    rnd = r.run()
    assert isinstance(rnd, _Recording)
    assert rnd.moves == [(p, _CLOSES[p].next) for p in ORDER[:-1]]
    assert r.deadline_calls == 1
    assert rnd.phase is Phase.DONE


def test_the_last_needed_share_only_makes_the_round_ready_and_finish_unmasks() -> None:
    r, rnd = _round_at(Phase.UNMASK)
    queue = list(r.pending)
    while queue and not rnd.unmask_ready:
        sid, data = queue.pop(0)
        queue.extend(r._deliver(sid, data))
    assert rnd.unmask_ready and queue  # enough shares before every silo answered
    assert (rnd.phase, rnd.result) == (Phase.UNMASK, None)  # no handler unmasked
    assert rnd.deadline_passed(NOW) == [] and rnd.phase.value == "unmask"  # the shares are in
    rejected = len(rnd.rejected)
    for sid, data in queue:  # later shares are still taken, for `finish`
        assert r._deliver(sid, data) == []
    assert len(rnd.rejected) == rejected and rnd.unmask_ready
    assert rnd.finish() == []
    assert rnd.phase is Phase.DONE and rnd.result is not None and not rnd.unmask_ready
    assert rnd.finish() == [] and rnd.phase is Phase.DONE  # not ready: a no-op


def test_an_unmask_deadline_aborts_with_timeout() -> None:
    _, rnd = _round_at(Phase.UNMASK)
    sends = rnd.deadline_passed(NOW)
    assert rnd.phase is Phase.ABORTED and rnd.abort_reason is AbortReason.TIMEOUT
    assert sends and all(data == sends[0][1] for _, data in sends)  # one AbortNotice to all
    assert rnd.deadline_passed(NOW) == []  # an ended round has nothing left to close


def test_the_accept_table_covers_what_each_phase_takes() -> None:
    takes = {p: {cls for q, cls in _ACCEPTS if q is p} for p in Phase}
    assert takes[Phase.ADVERTISE] == {SignedEnvelope, AbortNotice}
    assert takes[Phase.SHARE_KEYS] == {SignedEnvelope, AbortNotice}
    assert takes[Phase.MASKED] == {AbortNotice}  # vectors come through add_masked_vector
    assert takes[Phase.CONSISTENCY] == {SignedEnvelope, AbortNotice}
    assert takes[Phase.UNMASK] == {UnmaskShares, AbortNotice}
    assert takes[Phase.DONE] == takes[Phase.ABORTED] == set()


@pytest.mark.parametrize("phase", ORDER)
def test_a_message_outside_the_table_is_rejected_and_changes_nothing(phase: Phase) -> None:
    r, rnd = _round_at(phase)
    sid = r.config.invited[0]
    refused: list[Message] = [m for cls, m in VALID.items() if (phase, cls) not in _ACCEPTS]
    assert refused
    for m in refused:
        before = (rnd.phase, dict(rnd.dropouts), rnd.waiting_for())
        assert rnd.handle(sid, encode_message(m), now=NOW) == []
        assert rnd.rejected[-1].why == f"{type(m).__name__} not expected in {phase.value}"
        assert rnd.rejected[-1].silo_id == sid and rnd.rejected[-1].phase is phase
        assert (rnd.phase, dict(rnd.dropouts), rnd.waiting_for()) == before


@pytest.mark.parametrize("phase", ORDER)
def test_an_abort_notice_drops_the_silo_in_every_live_phase(phase: Phase) -> None:
    r, rnd = _round_at(phase)
    sid = r.config.invited[0]
    rnd.handle(sid, encode_message(AbortNotice(b"", AbortReason.TIMEOUT)), now=NOW)
    assert rnd.rejected[-1].why == "silo aborted: TIMEOUT"
    assert rnd.dropouts[SiloId(sid)] is phase
    assert SiloId(sid) not in rnd.waiting_for()


def test_a_subclass_override_is_the_handler_called() -> None:
    seen: list[str] = []

    class Watching(CoordinatorRound):
        def _on_advertise(
            self, sid: SiloId, env: Message, raw: bytes, now: dt.datetime
        ) -> list[tuple[SiloId, bytes]]:
            seen.append(sid)
            return super()._on_advertise(sid, env, raw, now)

        def _close_advertise(self) -> list[tuple[SiloId, bytes]]:
            seen.append("closed")
            return super()._close_advertise()

    fed = federation()
    cfg = make_config(fed, 4, 8)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)))
    r.coordinator = Watching(cfg, fed.trust, now=NOW, keep_ring_sum=True)
    rnd = r.run()
    assert seen[-1] == "closed" and sorted(seen[:-1]) == sorted(cfg.invited)
    assert rnd.phase is Phase.DONE  # the override changed nothing else

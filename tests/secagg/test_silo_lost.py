"""A silo whose stream breaks (`silo_lost`) closes its phase at once: no deadline is waited."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.coordinator import Phase
from secagg.errors import AbortReason
from secagg.silo import SiloPolicy
from tests.secagg.harness import MODEL_SHA, PHASES, Round, exact_inputs, make_config
from tests.secagg.pki import NOW, federation

PHASE_OF = {p.value: p for p in Phase}
# These rounds assume no colluder (t = 3 of 5), below the silos' default floor of 1.
NO_COLLUDERS = SiloPolicy(0, n_colluders_min=0)


@pytest.mark.parametrize("phase", PHASES)
def test_one_lost_silo_closes_its_phase_without_a_deadline(phase: str) -> None:
    fed = federation()
    cfg = make_config(fed, 5, 200, threshold=3, n_colluders=0)
    inputs = exact_inputs(cfg, np.random.default_rng(3))
    victim = cfg.invited[2]
    r = Round(
        fed, cfg, inputs, drop_at={victim: phase}, report_lost=True, default_policy=NO_COLLUDERS
    )
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert r.deadline_calls == 0
    assert rnd.dropouts[victim] is PHASE_OF[phase]
    assert rnd.result is not None
    # The masked input of a silo lost after uploading stays in the sum.
    counted = [s for s in cfg.invited if s != victim or phase in ("consistency", "unmask")]
    expected = np.mean([inputs[s].astype(np.float64) for s in counted], axis=0)
    np.testing.assert_allclose(rnd.result.aggregate, expected, rtol=1e-6, atol=1e-7)


def test_losing_too_many_in_unmask_aborts_at_once() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 100, threshold=3, n_colluders=0)
    inputs = exact_inputs(cfg, np.random.default_rng(4))
    drop = {sid: "unmask" for sid in cfg.invited[:3]}
    r = Round(fed, cfg, inputs, drop_at=drop, report_lost=True, default_policy=NO_COLLUDERS)
    rnd = r.run()
    assert rnd.phase is Phase.ABORTED
    assert rnd.abort_reason is AbortReason.THRESHOLD_VIOLATION
    assert r.deadline_calls == 0
    assert rnd.result is None


def test_a_lost_silo_is_reported_once_and_late_reports_change_nothing() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 50, threshold=3, n_colluders=0)
    rnd = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(5))).coordinator
    assert rnd.silo_lost(cfg.invited[0]) == []
    assert rnd.silo_lost(cfg.invited[0]) == []
    assert rnd.dropouts == {cfg.invited[0]: Phase.ADVERTISE}
    assert rnd.phase is Phase.ADVERTISE


def test_a_silo_lost_after_answering_an_open_phase_drops_in_the_next_one() -> None:
    """Its message was delivered: the round log must not say it dropped in that phase (a silo
    killed right after advertising, while others still advertise, dropped in share_keys)."""
    fed = federation()
    cfg = make_config(fed, 5, 50, threshold=3, n_colluders=0)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(6)), default_policy=NO_COLLUDERS)
    rnd, early = r.coordinator, cfg.invited[0]
    m1 = r.sessions[early].handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    assert rnd.handle(early, m1, now=NOW) == []
    assert rnd.silo_lost(early) == []
    assert rnd.phase is Phase.ADVERTISE and rnd.dropouts == {}
    r.dead.add(early)  # the rest of the round runs without it
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert early in rnd.participants["U1"] and early not in rnd.participants["U2"]
    assert rnd.dropouts == {early: Phase.SHARE_KEYS}


def test_a_silo_lost_after_its_masked_upload_while_others_upload_drops_in_consistency() -> None:
    """Its vector is in U3, so it did not drop in the masked phase; it never answers the
    consistency check, so the round log must say it dropped there (a silo killed right after
    its upload, while others wait for theirs, had no dropout at all)."""
    fed = federation()
    cfg = make_config(fed, 5, 50, threshold=3, n_colluders=0)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(8)), default_policy=NO_COLLUDERS)
    rnd = r.run(stop_at=Phase.MASKED)
    early: str | None = None
    queue = list(r.pending)
    while queue and rnd.phase in (Phase.MASKED, Phase.CONSISTENCY):
        sid, data = queue.pop(0)
        queue.extend(r._deliver(sid, data))
        if early is None and sid in r.uploads:  # the first vector in; the others still owed
            early = sid
            assert rnd.phase is Phase.MASKED
            queue.extend(rnd.silo_lost(early))
            r.dead.add(early)
            assert rnd.dropouts == {}
    assert early is not None and rnd.phase is Phase.UNMASK, rnd.abort_reason
    assert early in rnd.participants["U3"] and early not in rnd.participants["U4"]
    assert rnd.dropouts == {early: Phase.CONSISTENCY}


def test_a_silo_lost_after_its_unmask_shares_is_no_dropout() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 50, threshold=4, n_colluders=0)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(7)), default_policy=NO_COLLUDERS)
    rnd = r.run(stop_at=Phase.UNMASK)
    # Deliver the unmask requests one by one; the first silo to answer then loses its stream.
    first: str | None = None
    queue = list(r.pending)
    while queue and rnd.phase is Phase.UNMASK:
        sid, data = queue.pop(0)
        queue.extend(r._deliver(sid, data))
        if first is None and sid in rnd.participants.get("U4", ()):
            first = sid
            queue.extend(rnd.silo_lost(first))
        if rnd.unmask_ready:  # the driver's next tick
            queue.extend(rnd.finish())
    assert first is not None and rnd.phase is Phase.DONE, rnd.abort_reason
    assert first not in rnd.dropouts

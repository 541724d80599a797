"""A dishonest coordinator against real silo processes (issue 8, acceptance 1): one test per attack.

The coordinator here is tests.dishonest_coordinator's harness: a gRPC server with the real
coordinator certificate driving four unmodified `silo_agent run` processes (a, b, c, d) over
mTLS on loopback; e and f are on the roster and run inside the harness when an attack needs
more silos (honest ones, or colluders that hand over their shares). Each attack is staged for
real and then the harness does what it can with what it received: unmask the sum, difference
two sums, or unmask the victim's own masked vector from the shares. A test passes when the
silos refuse with the documented reason code, or when what the harness recovered differs from
the victim's true update (recorded by the silo's task) by more than MARGIN times the round's
quantisation bound. Each can fail: on code without the silo-side checks, attacks 1-4 recover
the victim's update to within a few quantisation bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator

import numpy as np
import pytest
from safetensors.torch import load as st_load

from coordinator.rounds.secure_config import quantisation_bound
from secagg.config import GraphKind, RoundConfig
from tests.dishonest_coordinator import (
    HONEST_TRAIN,
    NUM_EXAMPLES,
    REAL_SILOS,
    Harness,
    Outcome,
    Plan,
    Split,
    error_vs_bound,
    model_bytes,
    running_harness,
    signs_train_params,
    with_signed_train_params,
)

pytestmark = pytest.mark.e2e

# The reason codes the silos must refuse with (secagg.errors.AbortReason names).
THRESHOLD_VIOLATION = "THRESHOLD_VIOLATION"
CONSISTENCY_FAILED = "CONSISTENCY_FAILED"
REPLAY = "REPLAY"
COLLUSION_BELOW_POLICY = "COLLUSION_BELOW_POLICY"
# What the harness recovers must differ from the victim's true update by more than this many
# quantisation bounds; on vulnerable code it recovers it within a few.
MARGIN = 100.0
VICTIM = "a"
LOW_LR = {**HONEST_TRAIN, "lr": 1e-12}


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_harness(tmp_path_factory.mktemp("dishonest")) as harness:
        yield harness


def _bound(cfg: RoundConfig, n: int) -> float:
    return quantisation_bound(cfg, [NUM_EXAMPLES] * n)


def _assert_protected(
    h: Harness,
    what: str,
    out: Outcome,
    recovered: np.ndarray | None,
    truth: Callable[[], np.ndarray],
    bound: float,
    expected: Collection[str],
    refusing: Collection[str] = (),
) -> None:
    """Every silo named in `refusing` refused with one of `expected`, or `recovered` is far
    from `truth()` (read only then: a victim that refused before its training ended recorded no
    update)."""
    h.assert_alive()
    if recovered is None:
        refused = {n: out.reasons(h.ids(n)) for n in refusing}
        print(f"{what}: nothing recovered; the silos refused with {refused}")
        wrong = {n: sorted(r) for n, r in refused.items() if not r & set(expected)}
        assert refusing and not wrong, (
            f"{what}: nothing recovered, yet these silos did not refuse with {sorted(expected)}: "
            f"{wrong} (all refusals {out.refusals}; round {out.abort_reason})\n{h.logs()}"
        )
        return
    err, ratio = error_vs_bound(recovered, truth(), bound)
    print(
        f"{what}: recovered max error {err:.3g} = {ratio:.3g} x the quantisation bound {bound:.3g}"
    )
    assert ratio > MARGIN, (
        f"{what}: the harness recovered the victim's update to within {ratio:.2f} quantisation "
        f"bounds (max error {err:.3g}, bound {bound:.3g}; refusals {out.refusals})"
    )


def test_control_an_honest_round_sums_right_and_reveals_no_single_update(h: Harness) -> None:
    """The harness's honest path: the sum is right; the victim's own input stays masked."""
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid, REAL_SILOS, model)
    out = h.run(Plan(cfg, model, HONEST_TRAIN, victim=h.silo_id(VICTIM)))
    assert out.completed, (out.abort_reason, out.refusals, h.logs())
    truth = np.mean([h.true_update(n, rid).astype(np.float64) for n in REAL_SILOS], axis=0)
    assert out.aggregate is not None
    err, ratio = error_vs_bound(out.aggregate, truth, _bound(cfg, 4))
    assert ratio <= 1.0 + 1e-3, (err, ratio)
    assert out.recovered is None  # b-shares only, no s-share of the victim: nothing to unmask


def test_unsigned_training_parameters_do_not_single_out_a_silo(h: Harness) -> None:
    """Attack 1: RoundOffer.train_params_json gives the victim the normal learning rate and the
    others 1e-12; the silos must train with the signed parameters only, so the sum is not the
    victim's update."""
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid, REAL_SILOS, model)
    victim = h.silo_id(VICTIM)
    others = {s: LOW_LR for s in h.ids(*REAL_SILOS) if s != victim}
    out = h.run(Plan(cfg, model, HONEST_TRAIN, offer_params_for=others))
    recovered = out.sum() if out.completed else None
    truth = functools.partial(h.true_update, VICTIM, rid)
    _assert_protected(h, "attack 1 (unsigned lr)", out, recovered, truth, _bound(cfg, 4), ())


def test_different_signed_training_parameters_per_silo_are_refused(h: Harness) -> None:
    """Attack 1, signed variant: the victim's configuration carries the normal learning rate,
    the others' 1e-12. The configurations differ, so their digests do: the KeyList check (or
    the consistency digest) refuses the round."""
    rid = h.next_round_id()
    model = model_bytes(rid)
    base = h.config(rid, REAL_SILOS, model)
    low, normal = (
        with_signed_train_params(base, LOW_LR),
        with_signed_train_params(base, HONEST_TRAIN),
    )
    victim = h.silo_id(VICTIM)
    configs = {s: normal if s == victim else low for s in h.ids(*REAL_SILOS)}
    out = h.run(Plan(low, model, HONEST_TRAIN, configs=configs))
    recovered = out.sum() if out.completed else None
    truth = functools.partial(h.true_update, VICTIM, rid)
    _assert_protected(
        h,
        "attack 1 (split signed lr)",
        out,
        recovered,
        truth,
        _bound(low, 4),
        (REPLAY, CONSISTENCY_FAILED),
        REAL_SILOS,
    )


def test_sparse_graph_with_sharing_threshold_one_is_refused(h: Harness) -> None:
    """Attack 2: Harary graph, k = 2, t_k = 1 over six silos (a-d real, e and f honest silos in
    the harness). The coordinator declares the victim's two neighbours dropped: with t_k = 1
    the victim alone releases its own b and its neighbours' s keys, which unmask its input."""
    names = (*REAL_SILOS, "e", "f")
    rid = h.next_round_id()
    model = model_bytes(rid)
    signed = HONEST_TRAIN if signs_train_params() else None
    cfg = h.config(
        rid, names, model, signed_params=signed, graph=GraphKind.HARARY, graph_k=2, graph_t_k=1
    )
    victim = h.silo_id(VICTIM)
    plan = Plan(
        cfg,
        model,
        HONEST_TRAIN,
        ignore_masked=lambda topo: topo.neighbours_of(victim),
        victim=victim,
    )
    out = h.run(plan)
    truth = functools.partial(h.true_update, VICTIM, rid)
    _assert_protected(
        h,
        "attack 2 (t_k = 1)",
        out,
        out.recovered,
        truth,
        _bound(cfg, 4),
        (THRESHOLD_VIOLATION,),
        REAL_SILOS,
    )


def test_reserialised_model_cannot_be_differenced(h: Harness) -> None:
    """Attack 3: round A over all four; round B on the same tensors re-serialised (new file
    hash) without the victim, with the coordinator's seed in both offers. Sum A − sum B would
    be the victim's update; the silos must refuse to sign B's different U3."""
    rid_a = h.next_round_id()
    model_a = model_bytes(rid_a)
    chosen_seed = {**HONEST_TRAIN, "seed": 7}  # unsigned: the coordinator's pick
    cfg_a = h.honest_config(rid_a, REAL_SILOS, model_a)
    out_a = h.run(Plan(cfg_a, model_a, chosen_seed))
    assert out_a.completed, (out_a.abort_reason, out_a.refusals, h.logs())
    rid_b = h.next_round_id()
    model_b = model_bytes(rid_a, metadata={"note": "re-serialised"})
    assert model_b != model_a
    same = st_load(model_a), st_load(model_b)
    assert same[0].keys() == same[1].keys()
    assert all(bool((same[0][k] == same[1][k]).all()) for k in same[0])
    cfg_b = h.honest_config(rid_b, REAL_SILOS, model_b)
    victim = h.silo_id(VICTIM)
    out_b = h.run(Plan(cfg_b, model_b, chosen_seed, not_offered=frozenset({victim})))
    recovered = out_a.sum() - out_b.sum() if out_b.completed else None
    truth = functools.partial(h.true_update, VICTIM, rid_a)
    # The sums carry up to 4 and 3 quantisation errors: measure against the single-silo bound.
    _assert_protected(
        h,
        "attack 3 (re-serialised model)",
        out_b,
        recovered,
        truth,
        _bound(cfg_a, 4),
        (CONSISTENCY_FAILED,),
        ("b", "c", "d"),
    )


def test_declared_no_colluders_is_refused(h: Harness) -> None:
    """Attack 4: n_colluders = 0 for four invited silos (victim a, honest b, colluders e and f
    run by the harness). t = 3, so with the colluders signing both views the coordinator shows
    a a U3 with it alive and b one with it dropped, and gets both of a's secrets."""
    names = (VICTIM, "b", "e", "f")
    rid = h.next_round_id()
    model = model_bytes(rid)
    signed = HONEST_TRAIN if signs_train_params() else None
    cfg = h.config(rid, names, model, signed_params=signed, n_colluders=0)
    assert cfg.threshold == 3
    victim = h.silo_id(VICTIM)
    colluders = frozenset(h.ids("e", "f"))
    split = Split(alive=frozenset({victim}), dead=frozenset(h.ids("b")))
    out = h.run(Plan(cfg, model, HONEST_TRAIN, colluders=colluders, split=split, victim=victim))
    truth = functools.partial(h.true_update, VICTIM, rid)
    _assert_protected(
        h,
        "attack 4 (n_colluders = 0)",
        out,
        out.recovered,
        truth,
        _bound(cfg, 4),
        (COLLUSION_BELOW_POLICY,),
        (VICTIM, "b"),
    )


def test_after_the_attacks_every_silo_takes_part_in_an_honest_round(h: Harness) -> None:
    h.assert_alive()
    h.honest_round(REAL_SILOS)

"""Exactness: random n in [3, 20], d in [1, 10^5], random dropouts after every phase; the decoded
ring sum equals the integer sum of the survivors' encoded inputs exactly (docs/secagg-protocol.md
§4.4)."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.coordinator import Phase
from secagg.silo import SiloPolicy
from tests.secagg.harness import PHASES, Round, exact_inputs, make_config
from tests.secagg.pki import federation


@pytest.mark.parametrize("seed", range(8))
def test_random_rounds_with_dropouts_are_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fed = federation()
    n = int(rng.integers(3, 21))
    d = int(rng.choice([1, int(rng.integers(2, 1000)), int(rng.integers(1000, 100_001))]))
    bits = int(rng.choice([32, 64]))
    cfg = make_config(fed, n, d, ring_bits=bits, round_id=100 + seed)
    inputs = exact_inputs(cfg, rng)
    # drop at most n - t silos, each at a random phase (never below the threshold)
    spare = n - cfg.threshold
    victims = rng.choice(n, size=int(rng.integers(0, spare + 1)), replace=False)
    drop_at = {cfg.invited[int(v)]: str(rng.choice(PHASES[:3])) for v in victims}
    r = Round(fed, cfg, inputs, drop_at=drop_at, seed=seed)
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (n, d, drop_at, rnd.abort_reason, rnd.rejected[:3])
    assert rnd.result is not None
    survivors = [s for s in cfg.invited if s not in drop_at]
    assert list(rnd.result.survivors) == survivors
    expected = sum(
        np.rint(inputs[s].astype(np.float64) * cfg.scale).astype(np.int64) for s in survivors
    )
    assert np.array_equal(rnd.result.ring_sum[1:].astype(np.int64), expected)
    assert rnd.result.weight_sum == len(survivors) * cfg.weight_scale
    assert not r.aborts


def test_late_dropouts_after_consistency_and_unmask_still_finish() -> None:
    fed = federation()
    cfg = make_config(fed, 7, 500, round_id=50)
    inputs = exact_inputs(cfg, np.random.default_rng(9))
    drop_at = {cfg.invited[0]: "consistency", cfg.invited[4]: "unmask"}
    rnd = Round(fed, cfg, inputs, drop_at=drop_at).run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert rnd.result is not None
    # silos that dropped after uploading are still in U3: their input is in the sum
    expected = sum(np.rint(inputs[s] * cfg.scale).astype(np.int64) for s in cfg.invited)
    assert np.array_equal(rnd.result.ring_sum[1:].astype(np.int64), expected)


def test_too_many_dropouts_abort_the_round() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 10, round_id=51)
    inputs = exact_inputs(cfg, np.random.default_rng(2))
    drop_at = {cfg.invited[0]: "masked", cfg.invited[1]: "masked"}
    rnd = Round(fed, cfg, inputs, drop_at=drop_at).run()
    assert rnd.phase is Phase.ABORTED and rnd.result is None


def test_stochastic_rounding_within_bound_of_float_mean() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 2000, round_id=52, scale=2.0**10, clip_l2=50.0)
    rng = np.random.default_rng(3)
    inputs = {s: rng.standard_normal(cfg.d).astype(np.float32) for s in cfg.invited}
    rnd = Round(fed, cfg, inputs, seed=4).run()
    assert rnd.result is not None
    mean = np.mean([inputs[s].astype(np.float64) for s in cfg.invited], axis=0)
    err = np.abs(rnd.result.aggregate - mean)
    assert err.max() < 1.0 / cfg.scale  # each input moves < 1/S; the mean of 4 moves < 1/S
    assert err.max() > 0  # rounding did happen (values are off-grid)


@pytest.mark.parametrize("drop", [False, True])
def test_sparse_harary_graph_round_is_exact(drop: bool) -> None:
    from secagg.config import GraphKind

    fed = federation()
    # t_k = 6: the floor for a neighbourhood of 7 silos with n_colluders = 3 (⌊(7 + 3)/2⌋ + 1)
    cfg = make_config(fed, 10, 300, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6, round_id=60)
    inputs = exact_inputs(cfg, np.random.default_rng(11))
    drop_at = {cfg.invited[3]: "masked"} if drop else {}
    sparse_ok = SiloPolicy(0, allow_sparse_graph=True)
    r = Round(fed, cfg, inputs, drop_at=drop_at, default_policy=sparse_ok)
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected[:3], r.aborts)
    assert rnd.result is not None and rnd.result.ring_sum is not None
    survivors = [s for s in cfg.invited if s not in drop_at]
    expected = sum(np.rint(inputs[s] * cfg.scale).astype(np.int64) for s in survivors)
    assert np.array_equal(rnd.result.ring_sum[1:].astype(np.int64), expected)
    # each silo shared keys with its 6 ring neighbours only
    some = r.sessions[cfg.invited[0]]
    assert some.result is not None
    assert all(len(v) == 6 for v in some._nbrs.values())

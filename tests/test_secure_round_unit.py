"""coordinator.rounds.secure_config: a real in-memory secagg round (real crypto, real sessions)
built
from a torch model's state dict, with a dropout after keys; the next global state must equal
old + FedAvg over the survivors within the stated quantisation bound."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from coordinator.config import GraphMode
from coordinator.rounds.secure_config import (
    SecAggSettings,
    SecureRoundError,
    WeightingMode,
    apply_aggregate,
    build_round_config,
    layout_of,
    quantisation_bound,
)
from secagg.config import GraphKind, RoundConfig, Weighting
from secagg.silo import SiloPolicy
from tests.secagg.harness import MODEL_SHA, Round
from tests.secagg.pki import federation


def _model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _config(n: int, roster_size: int | None = None, **over: object) -> RoundConfig:
    fed = federation()
    settings = SecAggSettings(**{"clip_l2": 10.0, **over})  # type: ignore[arg-type]
    return build_round_config(
        settings,
        federation_id=fed.roster.federation_id,
        roster_version=fed.roster.version,
        roster_digest=fed.roster.digest(),
        round_id=7,
        invited=[str(s.silo_id) for s in reversed(fed.silos[:n])],
        model_version=1,
        model_sha256=MODEL_SHA,
        layout=layout_of(_model_state()),
        deadlines_s=(5, 5, 30, 5, 5),
        roster_size=roster_size,
    )


@pytest.mark.parametrize("drop", [None, "share_keys", "masked", "consistency"])
def test_new_global_equals_fedavg_over_survivors(drop: str | None) -> None:
    fed = federation()
    # Uniform weights: the harness submits weight 1 per silo; example weights are quantised
    # to S_w·min(n_i, W_max)/W_max and add their own error (docs/secure-rounds.md).
    cfg = _config(5, weighting=WeightingMode.UNIFORM)
    old = _model_state()
    rng = np.random.default_rng(3)
    updates = {sid: (rng.standard_normal(cfg.d) * 0.05).astype(np.float32) for sid in cfg.invited}
    dropped = cfg.invited[1] if drop else None
    r = Round(fed, cfg, dict(updates), drop_at={dropped: drop} if dropped and drop else {})
    rnd = r.run()
    assert rnd.result is not None, r.aborts
    survivors = sorted(rnd.result.survivors)
    expected_survivors = sorted(s for s in cfg.invited if s != dropped)
    # A silo dropped after its masked upload (consistency) is still in the sum (U3).
    if drop == "consistency":
        expected_survivors = sorted(cfg.invited)
    assert survivors == expected_survivors
    new = apply_aggregate(old, rnd.result.aggregate, cfg.layout)

    mean = np.mean([updates[s].astype(np.float64) for s in survivors], axis=0)
    flat_new = np.concatenate([new[k].numpy().ravel().astype(np.float64) for k in old])
    flat_old = np.concatenate([old[k].numpy().ravel().astype(np.float64) for k in old])
    err = np.max(np.abs(flat_new - (flat_old + mean)))
    # float32 storage of the new model adds at most one ulp of the weights' magnitude
    ulp = float(np.max(np.abs(flat_new))) * 2.0**-23
    assert err <= quantisation_bound(cfg, [1] * len(survivors)) + ulp
    assert all(new[k].dtype == old[k].dtype and new[k].shape == old[k].shape for k in old)


def test_defaults_follow_secagg_section_9() -> None:
    cfg = _config(5)
    assert cfg.n_colluders == 1 and cfg.threshold == 4
    assert cfg.ring_bits == 32 and cfg.weighting == Weighting.UNIFORM
    assert list(cfg.invited) == sorted(cfg.invited, key=str.encode)
    assert [s.name for s in cfg.layout] == list(_model_state())


def test_threshold_below_minimum_is_refused() -> None:
    with pytest.raises(SecureRoundError, match=r"threshold 3 is outside \[4, 5\]"):
        _config(5, threshold=3)


def test_dp_forces_uniform_weighting() -> None:
    cfg = _config(5, dp_noise_multiplier=1.0, dp_noise_divisor=2)
    assert cfg.weighting == Weighting.UNIFORM and cfg.dp is not None


def test_integer_tensor_is_refused() -> None:
    with pytest.raises(SecureRoundError, match="'steps' has dtype int64"):
        layout_of({"w": torch.zeros(3), "steps": torch.zeros(1, dtype=torch.int64)})


def test_aggregate_of_wrong_length_is_refused() -> None:
    state = _model_state()
    with pytest.raises(SecureRoundError, match="layout needs"):
        apply_aggregate(state, np.zeros(3, dtype=np.float32), layout_of(state))


def test_model_hash_is_what_the_round_carries() -> None:
    assert _config(3).model_sha256 == hashlib.sha256(b"global model bytes").digest()


def test_the_default_colluder_bound_follows_the_roster_not_the_round() -> None:
    """The silos' default floor is ⌊(members − 1)/3⌋ of the pinned roster; a round that invites
    3 of 10 members must assume 3 colluders, which no threshold <= 3 satisfies."""
    assert _config(3).n_colluders == 0
    with pytest.raises(SecureRoundError, match="threshold"):
        _config(3, roster_size=10)
    assert _config(10, roster_size=10).n_colluders == 3


# ---- [secagg] graph = "harary" ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k", "t_k"), [(9, 4, 4), (10, 6, 6), (20, 8, 8)])
def test_a_harary_round_takes_the_rule_s_degree_for_the_invited_silos(
    n: int, k: int, t_k: int
) -> None:
    cfg = _config(n, roster_size=n, graph=GraphMode.HARARY)
    assert (cfg.graph, cfg.graph_k, cfg.graph_t_k) == (GraphKind.HARARY, k, t_k)
    assert cfg.n_colluders == (n - 1) // 3 and k < n - 1  # sparse, above the colluders


def test_a_harary_round_is_complete_when_the_degree_reaches_n_minus_1() -> None:
    cfg = _config(5, graph=GraphMode.HARARY)  # n_C = 1, D = 1: k = 4 = n − 1
    assert (cfg.graph, cfg.graph_k, cfg.graph_t_k) == (GraphKind.COMPLETE, 0, 0)
    cfg = _config(10, roster_size=10, graph=GraphMode.HARARY, dropout_rate=0.3)  # D = 3: k = 10
    assert cfg.graph is GraphKind.COMPLETE
    assert _config(10, roster_size=10).graph is GraphKind.COMPLETE  # the default


def test_a_given_degree_is_used_or_refused_naming_the_key_and_the_minimum() -> None:
    cfg = _config(20, roster_size=20, graph=GraphMode.HARARY, graph_degree=12)
    assert (cfg.graph_k, cfg.graph_t_k) == (12, 10)  # n_C = 6: ⌊(13 + 6)/2⌋ + 1
    # the roster's size sets n_C when [secagg] n_colluders is unset: known only per round
    with pytest.raises(SecureRoundError, match=r"graph_degree 6 must be even and at least the "):
        _config(20, roster_size=20, graph=GraphMode.HARARY, graph_degree=6)
    with pytest.raises(SecureRoundError, match=r"minimum 8 for n_colluders = 6"):
        _config(20, roster_size=20, graph=GraphMode.HARARY, graph_degree=6)


@pytest.mark.parametrize("drop", [None, "masked", "consistency"])
def test_a_harary_round_equals_fedavg_over_its_survivors(drop: str | None) -> None:
    """Nine silos, k = 4: each masks with and shares among four ring neighbours; one silo
    lost before or after its upload costs nothing."""
    fed = federation()
    cfg = _config(9, roster_size=9, graph=GraphMode.HARARY)
    assert cfg.graph_k == 4
    old = _model_state()
    rng = np.random.default_rng(5)
    updates = {sid: (rng.standard_normal(cfg.d) * 0.05).astype(np.float32) for sid in cfg.invited}
    dropped = cfg.invited[2]
    sparse_ok = SiloPolicy(0, allow_sparse_graph=True)
    r = Round(
        fed,
        cfg,
        dict(updates),
        drop_at={dropped: drop} if drop else {},
        default_policy=sparse_ok,
    )
    rnd = r.run()
    assert rnd.result is not None, (rnd.abort_reason, r.aborts)
    assert all(len(nb) == 4 for nb in r.sessions[cfg.invited[0]]._nbrs.values())
    survivors = sorted(rnd.result.survivors)
    gone = {dropped} if drop == "masked" else set()
    assert survivors == sorted(set(cfg.invited) - gone)
    new = apply_aggregate(old, rnd.result.aggregate, cfg.layout)
    mean = np.mean([updates[s].astype(np.float64) for s in survivors], axis=0)
    flat_new = np.concatenate([new[k].numpy().ravel().astype(np.float64) for k in old])
    flat_old = np.concatenate([old[k].numpy().ravel().astype(np.float64) for k in old])
    ulp = float(np.max(np.abs(flat_new))) * 2.0**-23
    err = np.max(np.abs(flat_new - (flat_old + mean)))
    assert err <= quantisation_bound(cfg, [1] * len(survivors)) + ulp

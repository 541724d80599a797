"""secagg.graph_params: the sparse-graph rule (docs/secagg-protocol.md §4.6) and the silo checks
built on it.

The rule's properties for any n, δ, n_C and t_floor (hypothesis); the k-connectivity of the
Harary graph that the rule and the silo's connectivity check rest on, checked on
`secagg.graph.neighbours` itself; the figures the documentation states; and real silo sessions
refusing a degree below the floors (at the offer) and a participant set that could cut the
honest survivors' graph (before the input leaves, and before U3 is signed).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Collection, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.config import GraphKind, default_colluders
from secagg.coordinator import Phase
from secagg.errors import AbortReason, ProtocolAbort
from secagg.graph import harary_permutation, neighbours
from secagg.graph_params import (
    SparseGraph,
    choose_sparse_graph,
    least_degree,
    neighbourhood_threshold,
    sparse_graph_problem,
    stays_connected,
    survives,
    tolerated_dropouts,
)
from secagg.messages import KeyList, decode_message
from secagg.silo import SiloPolicy, SiloSession, SiloStage
from tests.secagg.harness import MODEL_SHA, Round, exact_inputs, make_config
from tests.secagg.pki import NOW, federation

FAST = settings(max_examples=200, deadline=None)


# ---- the rule --------------------------------------------------------------------------------


@FAST
@given(
    st.integers(3, 400),
    st.floats(0.0, 0.5, exclude_max=True, allow_nan=False),
    st.data(),
    st.integers(3, 12),
)
def test_the_chosen_graph_meets_every_floor_and_is_the_least(
    n: int, dropout_rate: float, data: st.DataObject, t_floor: int
) -> None:
    n_c = data.draw(st.integers(0, n - 1))
    graph = choose_sparse_graph(n, n_c, dropout_rate=dropout_rate, t_floor=t_floor)
    dropouts = tolerated_dropouts(n, dropout_rate)
    if graph is None:  # complete: no sparse degree below n - 1 survives D dropouts
        assert not any(survives(k, dropouts, n_c, t_floor) for k in range(2, n - 1, 2))
        return
    k, t_k = graph.k, graph.t_k
    assert k % 2 == 0 and 2 <= k < n - 1
    assert k > n_c
    assert t_k == max(3, t_floor, (k + 1 + n_c) // 2 + 1) <= k + 1
    assert sparse_graph_problem(n, k, t_k, n_c, t_floor) is None  # what a silo accepts
    assert k + 1 - t_k >= dropouts  # a neighbourhood keeps t_k after D dropouts in it
    assert dropouts + n_c < k and stays_connected(k, dropouts, n_c)
    # the least such degree: every smaller even one fails a floor or D
    assert not any(survives(c, dropouts, n_c, t_floor) for c in range(2, k, 2) if c > n_c)


@FAST
@given(st.integers(7, 400), st.floats(1e-6, 0.5, exclude_max=True, allow_nan=False))
def test_with_two_colluders_or_more_the_degree_is_twice_d_plus_half_n_c(
    n: int, dropout_rate: float
) -> None:
    """With D ≥ 1 and n_C ≥ 2 the term ⌊(k+1+n_C)/2⌋ + 1 is t_k's largest, and the rule's k is
    2·(D + ⌈n_C/2⌉) (the closed form docs/secagg-protocol.md §4.6 states)."""
    n_c = default_colluders(n)
    dropouts = tolerated_dropouts(n, dropout_rate)
    closed_form = 2 * (dropouts + (n_c + 1) // 2)
    graph = choose_sparse_graph(n, n_c, dropout_rate=dropout_rate)
    assert (graph.k if graph else None) == (None if closed_form >= n - 1 else closed_form)


@pytest.mark.parametrize(
    ("n", "k", "t_k"),
    [(9, 4, 4), (10, 6, 6), (30, 14, 13), (100, 44, 40), (1000, 434, 385)],
)
def test_the_documented_figures(n: int, k: int, t_k: int) -> None:
    """docs/secagg-protocol.md §4.6 and docs/secure-rounds.md: δ = 0.05, n_C = ⌊(n−1)/3⌋."""
    assert choose_sparse_graph(n, default_colluders(n), dropout_rate=0.05) == SparseGraph(k, t_k)


def test_small_rounds_and_high_dropout_rates_get_the_complete_graph() -> None:
    assert choose_sparse_graph(3, 0) is None
    assert choose_sparse_graph(5, 1) is None  # k = 4 = n − 1
    assert choose_sparse_graph(6, 1) == SparseGraph(4, 4)
    assert choose_sparse_graph(30, 9, dropout_rate=0.35) is None  # D = 11: k would be 32
    assert choose_sparse_graph(30, 9, dropout_rate=0.3) == SparseGraph(28, 20)  # D = 9


def test_dropouts_are_counted_on_the_rate_as_written() -> None:
    assert tolerated_dropouts(100, 0.05) == 5  # the float product is 5.000000000000001
    assert tolerated_dropouts(10, 0.05) == 1
    assert tolerated_dropouts(30, 0.1) == 3
    assert tolerated_dropouts(500, 0.0) == 0
    assert tolerated_dropouts(7, 1e-9) == 1
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            tolerated_dropouts(10, bad)


def test_least_degree_is_the_smallest_even_above_the_colluders() -> None:
    assert [least_degree(n_c) for n_c in range(7)] == [2, 2, 4, 4, 6, 6, 8]
    with pytest.raises(ValueError):
        least_degree(-1)


def test_a_given_degree_overrides_the_rule_within_the_floors() -> None:
    assert choose_sparse_graph(30, 9, degree=10) == SparseGraph(10, neighbourhood_threshold(10, 9))
    assert choose_sparse_graph(30, 9, degree=28) == SparseGraph(28, 20)
    assert choose_sparse_graph(30, 9, degree=30) is None  # n − 1 or more: complete
    for bad in (9, 8, 7):  # odd, or not above n_C = 9
        with pytest.raises(ValueError, match="at least 10"):
            choose_sparse_graph(30, 9, degree=bad)


# ---- the Harary graph is k-connected (what `stays_connected` rests on) -------------------------


def _connected(nbrs: Mapping[int, Collection[int]], removed: set[int]) -> bool:
    left = [v for v in nbrs if v not in removed]
    seen, todo = {left[0]}, deque(left[:1])
    while todo:  # bounded: each vertex is queued once
        for w in nbrs[todo.popleft()]:
            if w not in removed and w not in seen:
                seen.add(w)
                todo.append(w)
    return len(seen) == len(left)


@FAST
@given(st.integers(5, 40), st.data(), st.binary(min_size=32, max_size=32))
def test_fewer_than_k_removed_silos_never_cut_the_graph_k_can(
    n: int, data: st.DataObject, sid: bytes
) -> None:
    k = data.draw(st.sampled_from(range(2, n - 1, 2)))
    nbrs = neighbours(n, sid, k)
    assert all(len(v) == k for v in nbrs.values())
    removed = set(data.draw(st.lists(st.sampled_from(range(1, n + 1)), max_size=k - 1)))
    assert _connected(nbrs, removed)
    # k removed can: the k/2 ring neighbours on either side of one silo
    ring = harary_permutation(sid, n)  # ring position k/2 + 1 loses every neighbour
    cut = set(ring[1 : 1 + k // 2]) | set(ring[2 + k // 2 : 2 + k])
    assert len(cut) == k and not _connected(nbrs, cut)


# ---- the silo's checks --------------------------------------------------------------------------


def _offer(policy: SiloPolicy, n: int, **over: object) -> SiloSession:
    s = SiloSession(
        federation().silos[0],
        federation().trust,
        policy,
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
    )
    s.handle_offer(make_config(federation(), n, 8, **over).encode(), MODEL_SHA, now=NOW)
    return s


def _refused(policy: SiloPolicy, n: int, **over: object) -> ProtocolAbort:
    with pytest.raises(ProtocolAbort) as exc:
        _offer(policy, n, **over)
    return exc.value


@pytest.mark.parametrize("n", [9, 10, 13, 16, 20])
def test_a_silo_takes_the_rule_s_choice_and_refuses_a_degree_below_its_floor(n: int) -> None:
    """The federation's 20 members give a floor of n_C = 6 (⌊19/3⌋) unless the policy says
    otherwise; here it is the invited set's, as if the roster were the round."""
    n_c = default_colluders(n)
    policy = SiloPolicy(0, allow_sparse_graph=True, n_colluders_min=n_c)
    graph = choose_sparse_graph(n, n_c, dropout_rate=0.05)
    if graph is not None:
        s = _offer(policy, n, graph=GraphKind.HARARY, graph_k=graph.k, graph_t_k=graph.t_k)
        assert s.stage is SiloStage.ADVERTISED
    below = least_degree(n_c) - 2
    if below >= 2:
        # an honest n_C with a degree not above it: every neighbour of a victim may collude
        t_k = neighbourhood_threshold(below, n_c)
        exc = _refused(policy, n, graph=GraphKind.HARARY, graph_k=below, graph_t_k=t_k)
        # (odd n_C: no t_k fits the k + 1 holders; even: k does not exceed n_C)
        assert exc.reason is AbortReason.THRESHOLD_VIOLATION
        assert f"sparse graph_{'t_k' if n_c % 2 else 'k'} " in exc.detail, exc.detail
    # a coordinator that lowers n_C to fit a small degree: below the silo's collusion floor
    low = max(0, n_c - 2)
    exc = _refused(
        policy,
        n,
        graph=GraphKind.HARARY,
        graph_k=least_degree(low),
        graph_t_k=neighbourhood_threshold(least_degree(low), low),
        n_colluders=low,
        threshold=max(3, (n + low) // 2 + 1),
    )
    assert exc.reason is AbortReason.COLLUSION_BELOW_POLICY, exc


def test_the_silo_floor_follows_the_roster_not_the_round() -> None:
    """Ten of the 20 members invited: the default floor is ⌊19/3⌋ = 6, so the choice made for
    n_C = 3 (k = 6) is refused; the choice for n_C = 6 (k = 8, t = 9) is taken."""
    policy = SiloPolicy(0, allow_sparse_graph=True)  # default floor: the roster's 20 members
    assert choose_sparse_graph(10, 3) == SparseGraph(6, 6)
    exc = _refused(policy, 10, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6)
    assert exc.reason is AbortReason.COLLUSION_BELOW_POLICY
    assert choose_sparse_graph(10, 6) == SparseGraph(8, 8)
    s = _offer(
        policy, 10, graph=GraphKind.HARARY, graph_k=8, graph_t_k=8, n_colluders=6, threshold=9
    )
    assert s.stage is SiloStage.ADVERTISED


# A federation of 20 with n_C = 0 and k = 4 (t_k = 3): each neighbourhood of 5 may lose 2, but
# the honest survivors stay connected only while fewer than k = 4 silos are missing.
SPREAD_N, SPREAD_K = 20, 4


def _spread_round(missing: int, phase: str) -> Round:
    """A sparse round in which `missing` silos, k + 1 apart on the ring (one per
    neighbourhood), go silent at `phase`: the ring is known once the key list is out."""
    fed = federation()
    cfg = make_config(
        fed,
        SPREAD_N,
        16,
        graph=GraphKind.HARARY,
        graph_k=SPREAD_K,
        graph_t_k=3,
        n_colluders=0,
        threshold=SPREAD_N // 2 + 1,
    )
    policy = SiloPolicy(0, allow_sparse_graph=True, n_colluders_min=0)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(1)), default_policy=policy)

    def drop_spread(sid: str, data: bytes) -> bytes:
        if not r.drop_at and isinstance(decode_message(data), KeyList):
            c = r.coordinator
            ring = harary_permutation(c.session_id, SPREAD_N)
            for pos in range(0, missing * (SPREAD_K + 1), SPREAD_K + 1):
                r.drop_at[c._silos[ring[pos]].silo_id] = phase
        return data

    r.tamper = drop_spread
    return r


@pytest.mark.parametrize("phase", ["share_keys", "masked"])
def test_k_minus_n_c_missing_silos_are_refused_before_the_input_or_the_signature(
    phase: str,
) -> None:
    r = _spread_round(SPREAD_K, phase)  # 4 missing + n_C 0 = k
    rnd = r.run()
    assert rnd.phase is Phase.ABORTED and rnd.result is None
    alive = [sid for sid in r.sessions if sid not in r.drop_at]
    assert len(alive) == SPREAD_N - SPREAD_K
    for sid in alive:
        exc = r.aborts[sid]
        assert exc.reason is AbortReason.THRESHOLD_VIOLATION, exc
        which = "U2" if phase == "share_keys" else "U3"
        assert f"4 silos of U1 missing from {which}" in exc.detail, exc.detail
        assert "could be cut" in exc.detail
    if phase == "share_keys":
        assert not r.uploads  # no input left any silo
    else:
        assert all(r.sessions[sid].digest_signed is None for sid in alive)  # nothing signed


def test_one_missing_silo_fewer_completes() -> None:
    r = _spread_round(SPREAD_K - 1, "masked")
    rnd = r.run()
    assert rnd.phase is Phase.DONE and rnd.result is not None, (rnd.abort_reason, r.aborts)
    assert not r.aborts and len(rnd.result.survivors) == SPREAD_N - SPREAD_K + 1

"""Sparse-graph parameters (docs/secagg-protocol.md §4.6): the degree `k` and neighbourhood
threshold `t_k` of a Harary round, and the floors every silo checks them against.

Rule: one pure source for both roles. The coordinator picks `(k, t_k)` with `choose_sparse_graph`;
the silo refuses what `sparse_graph_problem` and `stays_connected` refuse. The floors protect a
silo whatever the coordinator picks; the dropout rate δ only decides how many dropouts a round
survives, which is the coordinator's business, so the silo never needs to know it.

The choice, for `n` silos, dropout rate δ, `n_C` colluders and the floor `t_floor`:

* `D = ⌈δ·n⌉`: the dropouts a round is built to survive, wherever they fall;
* `t_k(k) = max(3, t_floor, ⌊(k + 1 + n_C)/2⌋ + 1)`: the least threshold a neighbourhood of
  `k + 1` silos admits (the complete graph's floors applied to it: it may hold every colluder);
* `k` = the smallest even `k > n_C` with `(k + 1) − t_k(k) ≥ D`: a silo's secrets are shared
  among `k + 1` silos, so `D` dropouts among them leave `t_k` shares. With `D ≥ 1`, and
  `⌊(k + 1 + n_C)/2⌋ + 1` the largest term of `t_k`, that is `k = 2·(D + ⌈n_C/2⌉)`;
* `k ≥ n − 1`: the complete graph (a Harary graph of degree `n − 1` is complete).

The Harary graph of even degree `k < n − 1` is `k`-connected (removing fewer than `k` silos
leaves it connected), and the choice gives `D + n_C < k`: after `D` dropouts the honest
survivors stay connected even with every colluder removed, so the coordinator learns only
their total, as with the complete graph. `stays_connected` is that condition; a silo checks it
on the actual participant sets before its input leaves and before it signs the survivor list.

Because the floors assume the colluders may sit anywhere (a coordinator can grind the ring),
`k` grows with `n_C`, not with log n as in SecAgg+'s random-placement analysis: about
`n_C + 2·D` (n = 100, δ = 0.05, n_C = 33: k = 44 instead of 99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from secagg.config import minimum_threshold
from secagg.errors import AbortReason

# The coordinator's default `[secagg] dropout_rate`: one in twenty silos lost per round.
DEFAULT_DROPOUT_RATE = 0.05


@dataclass(frozen=True, slots=True)
class SparseGraph:
    """A Harary graph's degree `k` (even, < n − 1) and neighbourhood threshold `t_k`."""

    k: int
    t_k: int


@dataclass(frozen=True, slots=True)
class GraphProblem:
    """Why a silo refuses a sparse graph: the abort code and the sentence it sends."""

    reason: AbortReason
    detail: str


def neighbourhood_threshold(k: int, n_colluders: int, t_floor: int = 3) -> int:
    """The least `t_k` for neighbourhoods of `k + 1` silos: max(3, t_floor, ⌊(k+1+n_C)/2⌋+1)."""
    return minimum_threshold(k + 1, n_colluders, t_floor)


def least_degree(n_colluders: int) -> int:
    """The smallest even `k > n_C` (at least 2): below it a victim's whole neighbourhood may be
    colluders."""
    if n_colluders < 0:
        raise ValueError(f"n_colluders must be >= 0, got {n_colluders}")
    return max(2, n_colluders + 2 - n_colluders % 2)


def tolerated_dropouts(n: int, dropout_rate: float) -> int:
    """`D = ⌈δ·n⌉`, on δ as written (0.05 · 100 is 5, not the float product's 6)."""
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    return math.ceil(Fraction(repr(float(dropout_rate))) * n)


def survives(k: int, dropouts: int, n_colluders: int, t_floor: int = 3) -> bool:
    """Degree `k` with its least `t_k` survives `dropouts` anywhere: a neighbourhood keeps
    `t_k` of its `k + 1` silos, and `dropouts + n_C < k` keeps the honest survivors connected."""
    t_k = neighbourhood_threshold(k, n_colluders, t_floor)
    return k + 1 - t_k >= dropouts and stays_connected(k, dropouts, n_colluders)


def choose_sparse_graph(
    n: int,
    n_colluders: int,
    *,
    dropout_rate: float = DEFAULT_DROPOUT_RATE,
    t_floor: int = 3,
    degree: int | None = None,
) -> SparseGraph | None:
    """`(k, t_k)` for a round of `n` silos (module docstring), or None for the complete graph
    (the rule's `k` reaches `n − 1`). `degree` overrides the rule's `k`; it must be even and at
    least `least_degree(n_colluders)` (ValueError otherwise). `t_k` is always the least
    admissible: the most dropouts per neighbourhood."""
    if degree is not None:
        if degree % 2 or degree < least_degree(n_colluders):
            raise ValueError(
                f"degree {degree} must be even and at least {least_degree(n_colluders)} "
                f"for n_colluders = {n_colluders}"
            )
        k: int | None = degree
    else:
        dropouts = tolerated_dropouts(n, dropout_rate)
        candidates = range(least_degree(n_colluders), n - 1, 2)  # bounded by n
        k = next((c for c in candidates if survives(c, dropouts, n_colluders, t_floor)), None)
    if k is None or k >= n - 1:
        return None
    return SparseGraph(k, neighbourhood_threshold(k, n_colluders, t_floor))


def sparse_graph_problem(
    n: int, k: int, t_k: int, n_colluders: int, t_floor: int = 3
) -> GraphProblem | None:
    """What a silo refuses in a sparse graph of degree `k < n − 1` over `n` silos, or None:
    `k` even in [2, n − 1] (CONFIG_REJECTED); `t_k` in [neighbourhood_threshold, k + 1]
    (THRESHOLD_VIOLATION: 1 would make each Shamir share the secret itself); `k > n_C`
    (THRESHOLD_VIOLATION: else every neighbour of a victim may be a colluder)."""
    if k % 2 or not 2 <= k <= n - 1:
        return GraphProblem(
            AbortReason.CONFIG_REJECTED,
            f"sparse graph_k {k} must be even and in [2, {n - 1}] for {n} silos",
        )
    t_min = neighbourhood_threshold(k, n_colluders, t_floor)
    if not t_min <= t_k <= k + 1:
        return GraphProblem(
            AbortReason.THRESHOLD_VIOLATION,
            f"sparse graph_t_k {t_k} is outside [{t_min}, {k + 1}] for neighbourhoods of "
            f"{k + 1} silos and n_colluders {n_colluders} (this silo's [secagg] t_floor is "
            f"{t_floor})",
        )
    if k < least_degree(n_colluders):
        return GraphProblem(
            AbortReason.THRESHOLD_VIOLATION,
            f"sparse graph_k {k} must exceed n_colluders {n_colluders} (at least "
            f"{least_degree(n_colluders)})",
        )
    return None


def stays_connected(k: int, missing: int, n_colluders: int) -> bool:
    """The honest survivors of a degree-`k` Harary graph stay connected when `missing` silos
    drop and `n_C` collude: fewer than `k` removed from a `k`-connected graph."""
    return missing + n_colluders < k

"""Partitioners: split one data set's examples over simulated silos the way real sites differ.

Rule: every function here is pure and numpy only (no torch, no I/O, no global randomness): it
takes labels or a count and a seed and returns one sorted int64 index array per silo. The arrays
are disjoint and together cover every example (nothing is dropped), and the same arguments give
the same arrays on every machine (numpy's PCG64 via `default_rng(seed)`), so every silo of a
federation can compute its own share without talking to the others. Bad arguments raise
`PartitionError` saying which argument and what to pass instead.

- `dirichlet_label_skew`: each label's examples are shared out in proportions drawn from
  Dirichlet(alpha): small alpha -> each silo dominated by a few labels, large alpha -> close to
  the global label distribution (Hsu et al. 2019).
- `quantity_skew`: silos of unequal size (explicit relative `sizes`, or drawn from
  Dirichlet(alpha)), labels ignored.
- `k_classes_per_silo`: the pathological split (McMahan et al. 2017): each silo holds exactly k
  labels, every label is held by some silo, and a label's examples are shared evenly by its
  holders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

IndexArray = npt.NDArray[np.int64]

# Redraws allowed when a Dirichlet draw leaves a silo below `min_size` (small alpha and many
# silos make near-empty silos likely); bounded so a request that cannot be met fails, not spins.
MAX_DRAWS = 1000


class PartitionError(ValueError):
    """A partitioner's arguments are out of range or cannot be satisfied."""


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise PartitionError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PartitionError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating):
        raise PartitionError(f"alpha must be a number > 0, got {alpha!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _check_labels(labels: Sequence[int] | npt.ArrayLike) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise PartitionError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise PartitionError("labels is empty: there is nothing to partition")
    if not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(f"labels must be integers (class ids), got dtype {array.dtype}")
    return array.astype(np.int64)


def _sorted(parts: Sequence[Sequence[int] | npt.NDArray[np.int64]]) -> list[IndexArray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _cut_sizes(total: int, proportions: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Integer sizes summing to `total`, closest to `total * proportions` (largest remainder)."""
    exact = proportions / proportions.sum() * total
    sizes: npt.NDArray[np.int64] = np.floor(exact).astype(np.int64)
    short = total - int(sizes.sum())
    # Ties go to the lower index (stable sort) so the result is the same on every machine.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:short]] += 1
    return sizes


def _split(indices: IndexArray, sizes: npt.NDArray[np.int64]) -> list[IndexArray]:
    return list(np.split(indices, np.cumsum(sizes)[:-1]))


def dirichlet_label_skew(
    labels: Sequence[int] | npt.ArrayLike,
    n_silos: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 1,
) -> list[IndexArray]:
    """Label skew: each label's examples go to the silos in Dirichlet(alpha) proportions.

    A draw leaving any silo with fewer than `min_size` examples is redrawn (from the same seeded
    stream, so still deterministic), at most `MAX_DRAWS` times. Raises PartitionError if an
    argument is out of range or no draw meets `min_size` (lower it, raise alpha, or use fewer
    silos).
    """
    y = _check_labels(labels)
    n_silos = _check_count("n_silos", n_silos, 1)
    alpha = _check_alpha(alpha)
    min_size = _check_count("min_size", min_size, 0)
    if n_silos * min_size > y.size:
        raise PartitionError(
            f"{n_silos} silos of at least min_size={min_size} need {n_silos * min_size} "
            f"examples, there are {y.size}"
        )
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(MAX_DRAWS):
        parts: list[list[IndexArray]] = [[] for _ in range(n_silos)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(n_silos, alpha))
            for silo, part in enumerate(_split(idx, _cut_sizes(idx.size, shares))):
                parts[silo].append(part)
        merged = [np.concatenate(p) for p in parts]
        if min(part.size for part in merged) >= min_size:
            return _sorted(merged)
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave all {n_silos} silos at least "
        f"min_size={min_size} of {y.size} examples; lower min_size, raise alpha or use fewer silos"
    )


def quantity_skew(
    n_examples: int,
    n_silos: int,
    seed: int,
    *,
    alpha: float | None = None,
    sizes: Sequence[float] | None = None,
    min_size: int = 1,
) -> list[IndexArray]:
    """Quantity skew: examples 0..n_examples-1 shuffled and cut into silos of unequal size.

    Pass exactly one of `sizes` (relative sizes, e.g. ``(5, 3, 2)`` or ``(0.5, 0.3, 0.2)``: silo
    i gets ``round(n_examples * sizes[i] / sum(sizes))``, largest remainder so they add up) or
    `alpha` (the proportions drawn from Dirichlet(alpha); small alpha -> very unequal; a draw
    with a silo below `min_size` is redrawn, at most `MAX_DRAWS` times). Raises PartitionError
    if neither or both are given, an argument is out of range, or `sizes` gives a silo fewer
    than `min_size` examples.
    """
    n_examples = _check_count("n_examples", n_examples, 1)
    n_silos = _check_count("n_silos", n_silos, 1)
    min_size = _check_count("min_size", min_size, 0)
    if (alpha is None) == (sizes is None):
        raise PartitionError(
            "pass exactly one of alpha= (Dirichlet-drawn sizes) or sizes= (relative sizes)"
        )
    if n_silos * min_size > n_examples:
        raise PartitionError(
            f"{n_silos} silos of at least min_size={min_size} need {n_silos * min_size} "
            f"examples, there are {n_examples}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_examples).astype(np.int64)
    if sizes is not None:
        weights = np.asarray(sizes, dtype=np.float64)
        if weights.shape != (n_silos,):
            raise PartitionError(f"sizes must give one value per silo ({n_silos}), got {sizes!r}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise PartitionError(f"sizes must be finite, >= 0 and not all 0, got {sizes!r}")
        counts = _cut_sizes(n_examples, weights)
        if counts.min() < min_size:
            raise PartitionError(
                f"sizes {sizes!r} give silo {int(counts.argmin())} only {int(counts.min())} of "
                f"{n_examples} examples, below min_size={min_size}"
            )
        return _sorted(_split(order, counts))
    alpha = _check_alpha(alpha)
    for _ in range(MAX_DRAWS):
        counts = _cut_sizes(n_examples, rng.dirichlet(np.full(n_silos, alpha)))
        if counts.min() >= min_size:
            return _sorted(_split(order, counts))
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave all {n_silos} silos at least "
        f"min_size={min_size} of {n_examples} examples; lower min_size, raise alpha or use fewer "
        "silos"
    )


def k_classes_per_silo(
    labels: Sequence[int] | npt.ArrayLike, n_silos: int, k: int, seed: int
) -> list[IndexArray]:
    """The pathological split: silo i holds exactly `k` labels, and every label is held.

    Labels are dealt round-robin in a seeded order: silo i gets positions i*k .. i*k+k-1 (mod
    the number of labels), so holders per label differ by at most one; each label's examples
    (shuffled) are cut evenly among its holders. Raises PartitionError unless
    1 <= k <= number of labels and n_silos * k >= number of labels (else a label would be
    held by nobody), or if a label has fewer examples than holders (a holder would get none).
    """
    y = _check_labels(labels)
    n_silos = _check_count("n_silos", n_silos, 1)
    k = _check_count("k", k, 1)
    classes = np.unique(y)
    if k > classes.size:
        raise PartitionError(f"k={k} exceeds the number of labels ({classes.size})")
    if n_silos * k < classes.size:
        raise PartitionError(
            f"{n_silos} silos x k={k} labels cannot hold all {classes.size} labels; need "
            f"n_silos * k >= {classes.size}"
        )
    rng = np.random.default_rng(seed)
    dealt = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for silo in range(n_silos):
        for j in range(k):
            holders[int(dealt[(silo * k + j) % classes.size])].append(silo)
    parts: list[list[IndexArray]] = [[] for _ in range(n_silos)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        owners = holders[int(c)]
        if idx.size < len(owners):
            raise PartitionError(
                f"label {int(c)} has {idx.size} example(s) but {len(owners)} silos hold it; "
                "use fewer silos or a smaller k"
            )
        for owner, part in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[owner].append(part.astype(np.int64))
    return _sorted([np.concatenate(p) for p in parts])

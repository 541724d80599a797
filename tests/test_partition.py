"""The partitioners: partitions (disjoint, covering), deterministic per seed, the skew they
promise (measured), and arguments refused with errors that name them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silofed.partition import (
    PartitionError,
    dirichlet_label_skew,
    k_classes_per_silo,
    quantity_skew,
)

Parts = list[npt.NDArray[np.int64]]


def labels_of(n_classes: int, per_class: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """A shuffled label vector with exactly `per_class` examples of each class."""
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_partition(parts: Parts, n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "an example is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(n)), "not a partition of 0..n-1"
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices sorted and unique within a silo"


def label_share(labels: npt.NDArray[np.int64], part: npt.NDArray[np.int64], n: int) -> np.ndarray:
    return np.bincount(labels[part], minlength=n) / max(part.size, 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


# ---- Dirichlet label skew -------------------------------------------------------------------


def test_small_alpha_gives_silos_dominated_by_few_labels() -> None:
    labels = labels_of(10, 200)
    parts = dirichlet_label_skew(labels, 10, alpha=0.05, seed=3)
    assert_partition(parts, labels.size)
    # Share of each silo's data in its two most common labels: near 1 for alpha -> 0.
    top2 = [np.sort(label_share(labels, p, 10))[-2:].sum() for p in parts]
    assert float(np.mean(top2)) > 0.85, top2
    tv = [total_variation(label_share(labels, p, 10), np.full(10, 0.1)) for p in parts]
    assert float(np.mean(tv)) > 0.6, tv


def test_large_alpha_gives_silos_close_to_the_global_distribution() -> None:
    labels = labels_of(10, 200)
    parts = dirichlet_label_skew(labels, 10, alpha=1000.0, seed=3)
    assert_partition(parts, labels.size)
    tv = [total_variation(label_share(labels, p, 10), np.full(10, 0.1)) for p in parts]
    assert max(tv) < 0.08, tv
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) < 0.15 * labels.size / 10, sizes


def test_skew_grows_as_alpha_shrinks() -> None:
    labels = labels_of(10, 200)
    mean_tv = []
    for alpha in (100.0, 1.0, 0.1):
        parts = dirichlet_label_skew(labels, 10, alpha, seed=11)
        mean_tv.append(
            float(
                np.mean(
                    [total_variation(label_share(labels, p, 10), np.full(10, 0.1)) for p in parts]
                )
            )
        )
    assert mean_tv == sorted(mean_tv), mean_tv
    assert mean_tv[2] - mean_tv[0] > 0.4, mean_tv


def test_dirichlet_min_size_is_met_or_refused() -> None:
    labels = labels_of(3, 10)
    parts = dirichlet_label_skew(labels, 5, alpha=0.1, seed=0, min_size=3)
    assert min(p.size for p in parts) >= 3
    with pytest.raises(PartitionError, match="min_size=7"):
        dirichlet_label_skew(labels, 5, alpha=0.1, seed=0, min_size=7)  # 35 > 30 examples
    with pytest.raises(PartitionError, match="no Dirichlet"):
        dirichlet_label_skew(labels, 5, alpha=0.001, seed=0, min_size=6)  # would need equal cuts


# ---- quantity skew --------------------------------------------------------------------------


def test_explicit_sizes_are_followed_exactly() -> None:
    parts = quantity_skew(1000, 3, seed=5, sizes=(5, 3, 2))
    assert_partition(parts, 1000)
    assert [p.size for p in parts] == [500, 300, 200]
    parts = quantity_skew(10, 3, seed=5, sizes=(1, 1, 1))  # 3.33 each: remainders to the first
    assert [p.size for p in parts] == [4, 3, 3]


def test_quantity_skew_shuffles_which_examples_go_where() -> None:
    first = quantity_skew(1000, 2, seed=1, sizes=(1, 1))[0]
    assert not np.array_equal(first, np.arange(500)), "a silo got a contiguous prefix"


def test_quantity_skew_alpha_controls_how_unequal_silos_are() -> None:
    def spread(alpha: float) -> float:  # mean over seeds of largest/smallest silo
        ratios = []
        for seed in range(20):
            sizes = [p.size for p in quantity_skew(10_000, 5, seed=seed, alpha=alpha)]
            ratios.append(max(sizes) / min(sizes))
        return float(np.mean(ratios))

    assert spread(1000.0) < 1.3
    assert spread(0.5) > 10 * spread(1000.0)


def test_quantity_skew_refuses_bad_arguments() -> None:
    with pytest.raises(PartitionError, match="exactly one of alpha"):
        quantity_skew(100, 3, seed=0)
    with pytest.raises(PartitionError, match="exactly one of alpha"):
        quantity_skew(100, 3, seed=0, alpha=1.0, sizes=(1, 1, 1))
    with pytest.raises(PartitionError, match="one value per silo"):
        quantity_skew(100, 3, seed=0, sizes=(1, 1))
    with pytest.raises(PartitionError, match="sizes must be finite"):
        quantity_skew(100, 3, seed=0, sizes=(1, -1, 1))
    with pytest.raises(PartitionError, match="below min_size"):
        quantity_skew(100, 3, seed=0, sizes=(100, 1, 0))
    with pytest.raises(PartitionError, match="alpha must be a finite number > 0"):
        quantity_skew(100, 3, seed=0, alpha=0.0)
    with pytest.raises(PartitionError, match="n_examples must be >= 1"):
        quantity_skew(0, 3, seed=0, alpha=1.0)


# ---- k classes per silo ---------------------------------------------------------------------


@pytest.mark.parametrize(("n_silos", "k"), [(3, 4), (5, 2), (10, 1), (4, 10), (7, 3)])
def test_each_silo_holds_exactly_k_labels_and_every_label_is_held(n_silos: int, k: int) -> None:
    labels = labels_of(10, 60)
    parts = k_classes_per_silo(labels, n_silos, k, seed=2)
    assert_partition(parts, labels.size)
    held = [set(np.unique(labels[p]).tolist()) for p in parts]
    assert all(len(h) == k for h in held), held
    assert set().union(*held) == set(range(10))
    # A label's holders share it evenly (within one example).
    for label in range(10):
        counts = [int(np.sum(labels[p] == label)) for p in parts if label in set(labels[p])]
        assert max(counts) - min(counts) <= 1, (label, counts)


def test_k_classes_refuses_bad_arguments() -> None:
    labels = labels_of(10, 5)
    with pytest.raises(PartitionError, match=r"need n_silos \* k >= 10"):
        k_classes_per_silo(labels, 3, 3, seed=0)
    with pytest.raises(PartitionError, match="exceeds the number of labels"):
        k_classes_per_silo(labels, 3, 11, seed=0)
    with pytest.raises(PartitionError, match="k must be >= 1"):
        k_classes_per_silo(labels, 3, 0, seed=0)
    with pytest.raises(PartitionError, match="label 0 has 5 example"):
        k_classes_per_silo(labels, 60, 1, seed=0)  # 6 holders per label, 5 examples each


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "labels is empty"),
        ([[0, 1], [1, 0]], "one-dimensional"),
        ([0.5, 1.0], "must be integers"),
    ],
)
def test_labels_are_checked(labels: Sequence[object], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        dirichlet_label_skew(labels, 2, 1.0, seed=0)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match=message):
        k_classes_per_silo(labels, 2, 1, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_silo_counts_are_checked(bad: object) -> None:
    with pytest.raises(PartitionError, match="n_silos must be"):
        dirichlet_label_skew([0, 1], bad, 1.0, seed=0)  # type: ignore[arg-type]


# ---- properties shared by all three ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(1, 12),
    per_class=st.integers(3, 30),
    n_silos=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_is_a_deterministic_partition(
    n_classes: int, per_class: int, n_silos: int, alpha: float, seed: int
) -> None:
    labels = labels_of(n_classes, per_class, seed=seed % 7)
    parts = dirichlet_label_skew(labels, n_silos, alpha, seed, min_size=0)
    assert_partition(parts, labels.size)
    again = dirichlet_label_skew(labels, n_silos, alpha, seed, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    n_examples=st.integers(1, 500),
    weights=st.lists(st.integers(1, 50), min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_quantity_skew_is_a_deterministic_partition(
    n_examples: int, weights: list[int], seed: int
) -> None:
    parts = quantity_skew(n_examples, len(weights), seed, sizes=weights, min_size=0)
    assert_partition(parts, n_examples)
    expected = np.asarray(weights) / sum(weights) * n_examples
    assert np.all(np.abs(np.array([p.size for p in parts]) - expected) < 1.0)
    again = quantity_skew(n_examples, len(weights), seed, sizes=weights, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(1, 12),
    n_silos=st.integers(1, 8),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32),
)
def test_k_classes_is_a_deterministic_partition(
    n_classes: int, n_silos: int, k: int, seed: int
) -> None:
    labels = labels_of(n_classes, 10)
    if k > n_classes or n_silos * k < n_classes:
        with pytest.raises(PartitionError):
            k_classes_per_silo(labels, n_silos, k, seed)
        return
    parts = k_classes_per_silo(labels, n_silos, k, seed)
    assert_partition(parts, labels.size)
    assert all(np.unique(labels[p]).size == k for p in parts)
    again = k_classes_per_silo(labels, n_silos, k, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_different_seeds_give_different_partitions() -> None:
    labels = labels_of(10, 50)
    a = dirichlet_label_skew(labels, 5, 0.5, seed=1)
    b = dirichlet_label_skew(labels, 5, 0.5, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = k_classes_per_silo(labels, 5, 2, seed=1)
    d = k_classes_per_silo(labels, 5, 2, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(c, d, strict=True))

"""The digits example's data: scikit-learn's bundled 8x8 handwritten digits, split pathologically.

Rule: everything here is a pure function of fixed seeds and the silo's options, so every silo,
the demo and the baselines derive the same held-out test set and the same partition without
talking.

* Held-out test set: a stratified 25 % of the 1,797 images (seed `SPLIT_SEED`), used only to
  report the federation's accuracy (demo, baselines). No silo trains or evaluates on it.
* The remaining 1,347 images go to `num_silos` silos by one of two non-IID splits (the
  option ``split``), both from `silofed.partition`:
  - ``"classes"`` (the default, the demo's): the pathological split `k_classes_per_silo`: each
    silo holds exactly `classes_per_silo` of the ten digits (all their images shared evenly
    with the other silos holding that digit), and every digit is held by some silo. With the
    defaults (3 silos, 4 digits each) a silo alone can recognise at most 4 digits of 10.
  - ``"dirichlet"``: label skew `dirichlet_label_skew` with concentration ``alpha`` (required):
    each digit's images are shared out in Dirichlet(alpha) proportions, so with a small alpha
    (0.1) most silos hold a few digits and sizes differ widely. Every silo gets at least
    `MIN_DIRICHLET_SHARE` images (a draw that gives one fewer is redrawn, seeded).
* Each silo keeps a stratified 20 % of its share as its local validation split.

Preprocessing needs no other silo's data: pixels (0..16) are scaled to [0, 1] and then
standardised with fixed constants (`PIXEL_CENTER`, `PIXEL_SCALE`, roughly the set's pixel mean
and standard deviation, written down once, not fitted), identical at every site by construction.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits

from examples.common import SiloData, Source, Split, local_split, pooled
from silofed.partition import PartitionError, dirichlet_label_skew, k_classes_per_silo

NUM_CLASSES = 10
IMAGE_SIDE = 8
HELDOUT_FRACTION = 0.25
LOCAL_EVAL_FRACTION = 0.2
SPLIT_SEED = 20261128
DEFAULT_NUM_SILOS = 3
DEFAULT_CLASSES_PER_SILO = 4
SPLITS = ("classes", "dirichlet")
DEFAULT_SPLIT = "classes"
# A Dirichlet share this small still leaves a silo a training split and a validation split of
# at least 2 images; smaller shares would make the local validation figure meaningless.
MIN_DIRICHLET_SHARE = 10
# Fixed standardisation of pixels already scaled to [0, 1]: centring and unit-ish scale made
# the small CNN converge in half the rounds (federated and centralized alike).
PIXEL_CENTER = 0.3
PIXEL_SCALE = 0.4

__all__ = [
    "SPLITS",
    "DataOptionsError",
    "SiloData",
    "Split",
    "heldout_test",
    "pooled_training_data",
    "silo_data",
    "silo_indices",
    "transform",
]


class DataOptionsError(ValueError):
    """The silo's [task.options] for the digits task are missing or out of range."""


def transform(raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Rows of 64 pixels (0..16) -> float32 images of shape (n, 1, 8, 8), fixed standardisation."""
    scaled = (np.asarray(raw, dtype=np.float64) / 16.0 - PIXEL_CENTER) / PIXEL_SCALE
    out: npt.NDArray[np.float32] = scaled.astype(np.float32).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return out


SOURCE = Source(load_digits, transform, HELDOUT_FRACTION, SPLIT_SEED)
_pool = SOURCE.pool


def heldout_test() -> Split:
    """The fixed held-out test set (never seen by any silo)."""
    return SOURCE.heldout_test()


def _check_options(
    silo_index: int, num_silos: int, classes_per_silo: int, split: str, alpha: float | None
) -> None:
    for key, value in (
        ("silo_index", silo_index),
        ("num_silos", num_silos),
        ("classes_per_silo", classes_per_silo),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataOptionsError(
                f"[task.options] {key} must be an integer, got {value!r} "
                "(e.g. silo_index = 0, num_silos = 3, classes_per_silo = 4)"
            )
    if num_silos < 1:
        raise DataOptionsError(f"[task.options] num_silos must be >= 1, got {num_silos}")
    if not 0 <= silo_index < num_silos:
        raise DataOptionsError(
            f"[task.options] silo_index must be in 0..{num_silos - 1} for "
            f"num_silos={num_silos}, got {silo_index}"
        )
    if split not in SPLITS:
        raise DataOptionsError(
            f"[task.options] split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}"
        )
    if split == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise DataOptionsError(
                f'[task.options] split = "dirichlet" needs alpha, a number > 0, got {alpha!r} '
                "(e.g. alpha = 0.1: the smaller, the fewer digits each silo holds)"
            )
        if not math.isfinite(alpha):
            raise DataOptionsError(f"[task.options] alpha must be finite, got {alpha}")
        return
    if not 1 <= classes_per_silo <= NUM_CLASSES or num_silos * classes_per_silo < NUM_CLASSES:
        raise DataOptionsError(
            f"[task.options] classes_per_silo must be in 1..{NUM_CLASSES} and num_silos x "
            f"classes_per_silo >= {NUM_CLASSES} (every digit held by some silo); got "
            f"classes_per_silo={classes_per_silo} with num_silos={num_silos}"
        )


@functools.cache
def _partition(
    num_silos: int, classes_per_silo: int, alpha: float | None
) -> tuple[npt.NDArray[np.int64], ...]:
    """alpha None: the classes split; otherwise the Dirichlet one (classes_per_silo unused)."""
    _, y_pool, _, _ = _pool()
    try:
        if alpha is None:
            parts = k_classes_per_silo(y_pool, num_silos, classes_per_silo, SPLIT_SEED)
        else:
            parts = dirichlet_label_skew(
                y_pool, num_silos, alpha, SPLIT_SEED, min_size=MIN_DIRICHLET_SHARE
            )
    except PartitionError as exc:  # e.g. more holders of a digit than it has images
        raise DataOptionsError(f"[task.options] cannot split the digits: {exc}") from exc
    for part in parts:
        part.flags.writeable = False
    return tuple(parts)


def silo_indices(
    silo_index: int,
    num_silos: int = DEFAULT_NUM_SILOS,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
    *,
    split: str = DEFAULT_SPLIT,
    alpha: float | None = None,
) -> npt.NDArray[np.int64]:
    """Indices, into the non-held-out pool, of silo `silo_index`'s share (train + validation).

    `classes_per_silo` is used by ``split="classes"``, `alpha` by ``split="dirichlet"``.
    Raises DataOptionsError naming the option if one is out of range.
    """
    _check_options(silo_index, num_silos, classes_per_silo, split, alpha)
    if split == "dirichlet":
        assert alpha is not None  # checked above
        return _partition(num_silos, 0, float(alpha))[silo_index]
    return _partition(num_silos, classes_per_silo, None)[silo_index]


def silo_data(
    silo_index: int,
    num_silos: int = DEFAULT_NUM_SILOS,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
    *,
    split: str = DEFAULT_SPLIT,
    alpha: float | None = None,
) -> SiloData:
    """Silo `silo_index`'s training split and local validation split (options as silo_indices).

    Raises DataOptionsError naming the option if one is out of range.
    """
    idx = silo_indices(silo_index, num_silos, classes_per_silo, split=split, alpha=alpha)
    x_pool, y_pool, _, _ = _pool()
    x, y = x_pool[idx], y_pool[idx]
    # Stratify when every digit of the share can be on both sides (tiny shares: plain split).
    counts = np.bincount(y)[np.unique(y)]
    fits = bool(counts.min() >= 2 and LOCAL_EVAL_FRACTION * y.size >= counts.size)
    return local_split(x, y, LOCAL_EVAL_FRACTION, SPLIT_SEED + silo_index, transform, stratify=fits)


def pooled_training_data(
    num_silos: int = DEFAULT_NUM_SILOS,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
    *,
    split: str = DEFAULT_SPLIT,
    alpha: float | None = None,
) -> Split:
    """All silos' training splits together: what a centralized trainer would see."""
    return pooled(
        [
            silo_data(i, num_silos, classes_per_silo, split=split, alpha=alpha).train
            for i in range(num_silos)
        ]
    )

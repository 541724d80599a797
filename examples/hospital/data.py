"""The hospital example's data: scikit-learn's bundled breast-cancer set, split like real sites.

Rule: everything here is a pure function of fixed seeds, so every silo and every test
derive the same held-out test set and the same partition without talking.

* Held-out test set: a stratified 25 % of the 569 cases (seed 20261128), used only to report
  the federation's accuracy (tests/test_hospital_example.py). No silo trains or evaluates on it.
* The remaining 426 cases go to `num_silos` silos with label skew (non-IID). Class c is shared
  out in proportions `LABEL_SKEW[c]` (for 3 silos: malignant 60/30/10 %, benign 15/35/50 %), so
  silo 0 is a referral centre seeing mostly malignant cases and the last silo a screening site
  seeing mostly benign ones. Other silo counts use a linear ramp of the same shape.
* Each silo keeps a stratified 20 % of its share as its local evaluation split.

Preprocessing needs no other silo's data: each feature goes through log1p and is scaled to
[-1, 1] with the minimum and maximum published in the dataset's own description (the
"Summary Statistics" table of `load_breast_cancer().DESCR`, copied below). Those constants are
public facts about the dataset, identical at every site, so the transform is fixed and shared by
construction; fitting a scaler on one silo's skewed share would instead give each silo a
different input space. log1p tames the heavy tails of the area and standard-error features.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer

from examples.common import (
    IntArray,
    SiloData,
    Source,
    Split,
    local_split,
    pooled,
)

NUM_FEATURES = 30
HELDOUT_FRACTION = 0.25
LOCAL_EVAL_FRACTION = 0.2
SPLIT_SEED = 20261128

# (min, max) per feature, in sklearn's column order, from the DESCR "Summary Statistics" table.
PUBLISHED_RANGES: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)  # fmt: skip

# LABEL_SKEW[c][i]: share of class c (0 = malignant, 1 = benign) that goes to silo i (3 silos).
LABEL_SKEW: tuple[tuple[float, ...], tuple[float, ...]] = ((0.6, 0.3, 0.1), (0.15, 0.35, 0.5))

FloatArray = npt.NDArray[np.float32]

__all__ = [
    "DataOptionsError",
    "SiloData",
    "Split",
    "heldout_test",
    "pooled_training_data",
    "silo_data",
    "skew_shares",
    "transform",
]


class DataOptionsError(ValueError):
    """The silo's [task.options] for the hospital task are missing or out of range."""


def transform(raw: npt.NDArray[np.float64]) -> FloatArray:
    """The fixed per-feature transform: log1p, then scale the published range to [-1, 1]."""
    ranges = np.asarray(PUBLISHED_RANGES, dtype=np.float64)
    lo, hi = np.log1p(ranges[:, 0]), np.log1p(ranges[:, 1])
    scaled = 2.0 * (np.log1p(raw) - lo) / (hi - lo) - 1.0
    out: FloatArray = scaled.astype(np.float32)
    return out


SOURCE = Source(load_breast_cancer, transform, HELDOUT_FRACTION, SPLIT_SEED)
_pool = SOURCE.pool


def heldout_test() -> Split:
    """The fixed held-out test set (never seen by any silo)."""
    return SOURCE.heldout_test()


def skew_shares(num_silos: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-class shares for each silo; the documented table for 3, a linear ramp otherwise."""
    if num_silos < 1:
        raise DataOptionsError(f"num_silos must be >= 1, got {num_silos}")
    if num_silos == len(LABEL_SKEW[0]):
        return LABEL_SKEW
    if num_silos == 1:
        return ((1.0,), (1.0,))
    ramp = np.linspace(2.0, 1.0, num_silos)  # from 2:1 to 1:2 weight ratio across silos
    malignant = ramp / ramp.sum()
    benign = ramp[::-1] / ramp.sum()
    return tuple(float(v) for v in malignant), tuple(float(v) for v in benign)


def _partition_indices(y: npt.NDArray[np.int64], num_silos: int) -> list[IntArray]:
    shares = skew_shares(num_silos)
    rng = np.random.default_rng(SPLIT_SEED)
    per_silo: list[list[int]] = [[] for _ in range(num_silos)]
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        cuts = np.round(np.cumsum(shares[cls])[:-1] * len(idx)).astype(int)
        for silo, part in enumerate(np.split(idx, cuts)):
            per_silo[silo].extend(int(i) for i in part)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in per_silo]


def silo_data(silo_index: int, num_silos: int) -> SiloData:
    """Silo `silo_index`'s share of the non-held-out data (train and local evaluation splits).

    Raises DataOptionsError if the index or count is out of range.
    """
    if not 0 <= silo_index < num_silos:
        raise DataOptionsError(
            f"silo_index must be in 0..{num_silos - 1} for num_silos={num_silos}, got {silo_index}"
        )
    x_pool, y_pool, _, _ = _pool()
    idx = _partition_indices(y_pool, num_silos)[silo_index]
    x, y = x_pool[idx], y_pool[idx]
    stratify = bool(np.bincount(y, minlength=2).min() >= 2)
    return local_split(
        x, y, LOCAL_EVAL_FRACTION, SPLIT_SEED + silo_index, transform, stratify=stratify
    )


def pooled_training_data(num_silos: int) -> Split:
    """All silos' training splits together: what a centralized trainer would see."""
    return pooled([silo_data(i, num_silos).train for i in range(num_silos)])

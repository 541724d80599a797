"""The digits example's data: scikit-learn's bundled 8x8 handwritten digits, split pathologically.

Rule: everything here is a pure function of fixed seeds and the silo's options, so every silo,
the demo and the baselines derive the same held-out test set and the same partition without
talking.

* Held-out test set: a stratified 25 % of the 1,797 images (seed `SPLIT_SEED`), used only to
  report the federation's accuracy (demo, baselines). No silo trains or evaluates on it.
* The remaining 1,347 images go to `num_silos` silos by the pathological non-IID split
  `silofed.partition.k_classes_per_silo`: each silo holds exactly `classes_per_silo` of the ten
  digits (all their images shared evenly with the other silos holding that digit), and every
  digit is held by some silo. With the defaults (3 silos, 4 digits each) a silo alone can
  recognise at most 4 digits of 10.
* Each silo keeps a stratified 20 % of its share as its local validation split.

Preprocessing needs no other silo's data: pixels (0..16) are scaled to [0, 1] and then
standardised with fixed constants (`PIXEL_CENTER`, `PIXEL_SCALE`, roughly the set's pixel mean
and standard deviation, written down once, not fitted), identical at every site by construction.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from examples.hospital.data import SiloData, Split
from silofed.partition import PartitionError, k_classes_per_silo

NUM_CLASSES = 10
IMAGE_SIDE = 8
HELDOUT_FRACTION = 0.25
LOCAL_EVAL_FRACTION = 0.2
SPLIT_SEED = 20261128
DEFAULT_NUM_SILOS = 3
DEFAULT_CLASSES_PER_SILO = 4
# Fixed standardisation of pixels already scaled to [0, 1]: centring and unit-ish scale made
# the small CNN converge in half the rounds (federated and centralized alike).
PIXEL_CENTER = 0.3
PIXEL_SCALE = 0.4

__all__ = [
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


def _to_split(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> Split:
    return Split(x=torch.from_numpy(transform(x)), y=torch.from_numpy(y.astype(np.int64)))


@functools.cache  # read-only arrays: every caller indexes, none mutates
def _pool() -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]
]:
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=HELDOUT_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    for array in (x_pool, y_pool, x_test, y_test):
        array.flags.writeable = False
    return x_pool, y_pool, x_test, y_test


def heldout_test() -> Split:
    """The fixed held-out test set (never seen by any silo)."""
    _, _, x_test, y_test = _pool()
    return _to_split(x_test, y_test)


def _check_options(silo_index: int, num_silos: int, classes_per_silo: int) -> None:
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
    if not 1 <= classes_per_silo <= NUM_CLASSES or num_silos * classes_per_silo < NUM_CLASSES:
        raise DataOptionsError(
            f"[task.options] classes_per_silo must be in 1..{NUM_CLASSES} and num_silos x "
            f"classes_per_silo >= {NUM_CLASSES} (every digit held by some silo); got "
            f"classes_per_silo={classes_per_silo} with num_silos={num_silos}"
        )


@functools.cache
def _partition(num_silos: int, classes_per_silo: int) -> tuple[npt.NDArray[np.int64], ...]:
    _, y_pool, _, _ = _pool()
    try:
        parts = k_classes_per_silo(y_pool, num_silos, classes_per_silo, SPLIT_SEED)
    except PartitionError as exc:  # e.g. more holders of a digit than it has images
        raise DataOptionsError(f"[task.options] cannot split the digits: {exc}") from exc
    for part in parts:
        part.flags.writeable = False
    return tuple(parts)


def silo_indices(
    silo_index: int,
    num_silos: int = DEFAULT_NUM_SILOS,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
) -> npt.NDArray[np.int64]:
    """Indices, into the non-held-out pool, of silo `silo_index`'s share (train + validation).

    Raises DataOptionsError naming the option if one is out of range.
    """
    _check_options(silo_index, num_silos, classes_per_silo)
    return _partition(num_silos, classes_per_silo)[silo_index]


def silo_data(
    silo_index: int,
    num_silos: int = DEFAULT_NUM_SILOS,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
) -> SiloData:
    """Silo `silo_index`'s training split and local validation split.

    Raises DataOptionsError naming the option if one is out of range.
    """
    idx = silo_indices(silo_index, num_silos, classes_per_silo)
    x_pool, y_pool, _, _ = _pool()
    x, y = x_pool[idx], y_pool[idx]
    # Stratify when every digit of the share can be on both sides (tiny shares: plain split).
    counts = np.bincount(y)[np.unique(y)]
    fits = counts.min() >= 2 and LOCAL_EVAL_FRACTION * y.size >= counts.size
    stratify = y if fits else None
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        x, y, test_size=LOCAL_EVAL_FRACTION, stratify=stratify, random_state=SPLIT_SEED + silo_index
    )
    return SiloData(train=_to_split(x_tr, y_tr), evaluation=_to_split(x_ev, y_ev))


def pooled_training_data(
    num_silos: int = DEFAULT_NUM_SILOS, classes_per_silo: int = DEFAULT_CLASSES_PER_SILO
) -> Split:
    """All silos' training splits together: what a centralized trainer would see."""
    parts = [silo_data(i, num_silos, classes_per_silo).train for i in range(num_silos)]
    return Split(x=torch.cat([p.x for p in parts]), y=torch.cat([p.y for p in parts]))

"""Reference figures the demo prints next to the federation's: centralized training and every
silo training alone, each measured on the fixed held-out test set.

Rule: every baseline gets the federation's budget and schedule — `rounds` blocks of
``params["epochs"]`` epochs, block r trained exactly as federated round r is at a silo (same
loop, same optimiser settings, the lr of round r, same initial weights) — so
`federated accuracy: A (centralized: C, best single silo: S)` compares like with like.
"Best single silo" is chosen the way a silo could choose it alone: by each silo's accuracy on
its OWN local validation split (ties: the lower silo index), never by the held-out test set;
S is then that silo's held-out accuracy. The mean and the worst are over all silos' held-out
accuracies.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from examples.common import evaluate_split, train_split
from examples.digits.data import (
    DEFAULT_CLASSES_PER_SILO,
    Split,
    heldout_test,
    pooled_training_data,
    silo_data,
)
from examples.digits.task import DEFAULT_PARAMS, build_cnn


@dataclass(frozen=True, slots=True)
class SiloAlone:
    """One silo trained alone: its accuracy on its own validation split and on the held-out set."""

    validation: float
    heldout: float


@dataclass(frozen=True, slots=True)
class Baselines:
    """Centralized and single-silo held-out accuracies under one budget."""

    centralized: float
    alone: tuple[SiloAlone, ...]

    def __post_init__(self) -> None:
        if not self.alone:
            raise ValueError("baselines need at least one silo")

    @property
    def best_index(self) -> int:
        """The silo a silo-side choice would pick: highest own-validation accuracy."""
        return max(range(len(self.alone)), key=lambda i: (self.alone[i].validation, -i))

    @property
    def best_single(self) -> float:
        return self.alone[self.best_index].heldout

    @property
    def mean_single(self) -> float:
        return statistics.fmean(s.heldout for s in self.alone)

    @property
    def worst_single(self) -> float:
        return min(s.heldout for s in self.alone)


def heldout_accuracy(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Accuracy on the held-out test set of the digits model with these weights.

    Raises RuntimeError (from torch) if the state does not fit the digits model.
    """
    model = build_cnn()
    model.load_state_dict(dict(state_dict))
    return evaluate_split(model, heldout_test())["accuracy"]


def train_like_federation(
    model: nn.Module, split: Split, rounds: int, params: Mapping[str, Any]
) -> None:
    """Train `model` in place on `split` as `rounds` federated rounds would, one block each.

    Raises ValueError if rounds < 1, TrainParamsError on a bad parameter.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for round_id in range(1, rounds + 1):
        train_split(model, split, {**DEFAULT_PARAMS, **params, "round": round_id})


def compute(
    rounds: int,
    params: Mapping[str, Any],
    num_silos: int,
    classes_per_silo: int = DEFAULT_CLASSES_PER_SILO,
) -> Baselines:
    """Centralized (all silos' training splits pooled) and each silo alone, same budget."""
    test = heldout_test()
    central = build_cnn()
    train_like_federation(
        central, pooled_training_data(num_silos, classes_per_silo), rounds, params
    )
    alone: list[SiloAlone] = []
    for index in range(num_silos):
        data = silo_data(index, num_silos, classes_per_silo)
        model = build_cnn()
        train_like_federation(model, data.train, rounds, params)
        alone.append(
            SiloAlone(
                validation=evaluate_split(model, data.evaluation)["accuracy"],
                heldout=evaluate_split(model, test)["accuracy"],
            )
        )
    return Baselines(centralized=evaluate_split(central, test)["accuracy"], alone=tuple(alone))


def silos_lines(baselines: Baselines, names: Sequence[str]) -> tuple[str, str]:
    """Two lines before the last: each silo alone, then their mean, worst and the best's pick.

    Raises ValueError if `names` does not name every silo.
    """
    if len(names) != len(baselines.alone):
        raise ValueError(f"{len(names)} names for {len(baselines.alone)} silos")
    each = ", ".join(
        f"{name} {s.heldout:.3f} / {s.validation:.3f}"
        for name, s in zip(names, baselines.alone, strict=True)
    )
    return (
        f"each silo trained alone (held-out / own validation accuracy): {each}",
        f"silos alone on the held-out set: mean {baselines.mean_single:.3f}, worst "
        f"{baselines.worst_single:.3f}, best by own validation {names[baselines.best_index]} "
        f"{baselines.best_single:.3f}",
    )


def summary_line(federated: float, baselines: Baselines) -> str:
    """The demo's last line: ``federated accuracy: A (centralized: C, best single silo: S)``."""
    return (
        f"federated accuracy: {federated:.3f} "
        f"(centralized: {baselines.centralized:.3f}, "
        f"best single silo: {baselines.best_single:.3f})"
    )

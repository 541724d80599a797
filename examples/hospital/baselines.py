"""Reference figures for the hospital example (its tests use them): held-out accuracy of a
state, centralized training, and the best silo training alone. (`make demo` runs the digits
example; its baselines, with the best silo chosen on its own validation split, are in
examples/digits/baselines.py.)

Rule: every baseline gets the same budget as the federation (`rounds` x `params["epochs"]` local
epochs, same optimiser settings, same initial weights) and is measured on the same fixed held-out
test set, so `federated accuracy: A (centralized: C, best single silo: S)` compares like with like.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from examples.hospital.data import heldout_test, pooled_training_data, silo_data
from examples.hospital.task import DEFAULT_PARAMS, build_classifier, evaluate_split, train_split


def heldout_accuracy(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Accuracy on the held-out test set of the hospital model with these weights.

    Raises RuntimeError (from torch) if the state does not fit the hospital model.
    """
    model = build_classifier()
    model.load_state_dict(dict(state_dict))
    return evaluate_split(model, heldout_test())["accuracy"]


def _budget(rounds: int, params: Mapping[str, Any]) -> dict[str, Any]:
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    epochs = int(params.get("epochs", DEFAULT_PARAMS["epochs"]))
    return {**params, "epochs": rounds * epochs, "round": 0}


def centralized_accuracy(rounds: int, params: Mapping[str, Any], num_silos: int = 3) -> float:
    """Held-out accuracy of one model trained on all silos' training data pooled."""
    model = build_classifier()
    train_split(model, pooled_training_data(num_silos), _budget(rounds, params))
    return evaluate_split(model, heldout_test())["accuracy"]


def single_silo_accuracies(rounds: int, params: Mapping[str, Any], num_silos: int) -> list[float]:
    """Held-out accuracy of each silo training alone on its own training split."""
    test = heldout_test()
    budget = _budget(rounds, params)
    out: list[float] = []
    for index in range(num_silos):
        model = build_classifier()
        train_split(model, silo_data(index, num_silos).train, budget)
        out.append(evaluate_split(model, test)["accuracy"])
    return out


def best_single_silo_accuracy(rounds: int, params: Mapping[str, Any], num_silos: int) -> float:
    """The best held-out accuracy any one silo reaches training alone with the same budget."""
    return max(single_silo_accuracies(rounds, params, num_silos))


def summary_line(federated: float, rounds: int, params: Mapping[str, Any], num_silos: int) -> str:
    """The demo's last line: ``federated accuracy: A (centralized: C, best single silo: S)``."""
    central = centralized_accuracy(rounds, params, num_silos)
    single = best_single_silo_accuracy(rounds, params, num_silos)
    return (
        f"federated accuracy: {federated:.3f} "
        f"(centralized: {central:.3f}, best single silo: {single:.3f})"
    )

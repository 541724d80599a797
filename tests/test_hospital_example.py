"""The hospital example: its split, its determinism, and that FedAvg over it meets the target.

The FedAvg loop here is a plain Python simulation calling the task's own train/evaluate and
averaging state dicts weighted by num_examples: it tests the example, not the transport. The
centralized reference trains one model on the silos' training splits pooled, with the same
budget (rounds x epochs), the same loop and the same initial weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from examples.common import TrainParamsError, evaluate_split, train_split
from examples.hospital.data import (
    PUBLISHED_RANGES,
    DataOptionsError,
    heldout_test,
    pooled_training_data,
    silo_data,
    transform,
)
from examples.hospital.task import DEFAULT_PARAMS, TASK

PARAMS: Mapping[str, Any] = {k: v for k, v in DEFAULT_PARAMS.items() if k != "round"}
ROUNDS = 10
SILOS = 3


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_split_is_a_partition_of_the_dataset() -> None:
    test = heldout_test()
    shares = [silo_data(i, SILOS) for i in range(SILOS)]
    parts = [test.x] + [s.train.x for s in shares] + [s.evaluation.x for s in shares]
    assert sum(len(p) for p in parts) == len(load_breast_cancer().target)
    seen: set[bytes] = set()
    for part in parts:
        r = rows(part)
        assert not (r & seen), "a case appears in two splits"
        seen |= r


def test_heldout_set_is_stratified() -> None:
    y_all = load_breast_cancer().target
    test = heldout_test()
    assert abs(float(test.y.float().mean()) - float(np.mean(y_all))) < 0.02


def test_silos_have_label_skew() -> None:
    benign_ratio = [float(silo_data(i, SILOS).train.y.float().mean()) for i in range(SILOS)]
    assert benign_ratio[0] < 0.4 < 0.8 < benign_ratio[2]
    assert benign_ratio == sorted(benign_ratio)


def test_other_silo_counts_partition_too() -> None:
    sizes = [len(silo_data(i, 5).train) + len(silo_data(i, 5).evaluation) for i in range(5)]
    assert sum(sizes) == len(load_breast_cancer().target) - len(heldout_test())


def test_transform_is_fixed_and_maps_published_range_to_unit_interval() -> None:
    ranges = np.asarray(PUBLISHED_RANGES)
    assert np.allclose(transform(ranges[:, 0][None, :]), -1.0, atol=1e-6)
    assert np.allclose(transform(ranges[:, 1][None, :]), 1.0, atol=1e-6)
    data = load_breast_cancer().data
    assert np.allclose(ranges[:, 0], data.min(axis=0), rtol=0.05, atol=2e-3)
    assert np.allclose(ranges[:, 1], data.max(axis=0), rtol=0.05, atol=2e-3)


def test_load_data_options_are_checked() -> None:
    with pytest.raises(DataOptionsError, match="silo_index"):
        TASK.load_data({"num_silos": 3})
    with pytest.raises(DataOptionsError, match=r"0\.\.2"):
        TASK.load_data({"silo_index": 3, "num_silos": 3})


def test_training_restores_torch_thread_count() -> None:
    before = torch.get_num_threads()
    data = TASK.load_data({"silo_index": 0})
    TASK.train(TASK.build_model(), data, {"epochs": 1})
    TASK.evaluate(TASK.build_model(), data)
    assert torch.get_num_threads() == before


def test_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b = TASK.build_model().state_dict(), TASK.build_model().state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_replays_exactly_and_depends_on_round() -> None:
    data = TASK.load_data({"silo_index": 1, "num_silos": SILOS})
    states = []
    for round_id in (1, 1, 2):
        model = TASK.build_model()
        result = TASK.train(model, data, {**PARAMS, "round": round_id})
        assert result.num_examples == len(data.train)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_bad_train_params_are_named() -> None:
    data = TASK.load_data({"silo_index": 0})
    with pytest.raises(TrainParamsError, match="lr"):
        TASK.train(TASK.build_model(), data, {"lr": "fast"})
    with pytest.raises(TrainParamsError, match="epochs"):
        TASK.train(TASK.build_model(), data, {"epochs": 0})


def test_lr_decay_scales_the_step_size_by_round() -> None:
    # Round 3 with lr 0.1 decaying by 0.5 a round trains exactly as lr 0.025 without decay.
    data = TASK.load_data({"silo_index": 0})
    states = []
    for lr, decay in ((0.1, 0.5), (0.025, 1.0), (0.1, 1.0)):
        model = TASK.build_model()
        TASK.train(model, data, {**PARAMS, "round": 3, "lr": lr, "lr_decay": decay})
        states.append(model.state_dict())
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
    assert any(not torch.allclose(states[0][k], states[2][k]) for k in states[0])
    with pytest.raises(TrainParamsError, match="lr_decay"):
        TASK.train(TASK.build_model(), data, {"lr_decay": 0})


def fedavg(rounds: int, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    datas = [TASK.load_data({"silo_index": i, "num_silos": SILOS}) for i in range(SILOS)]
    global_state = TASK.build_model().state_dict()
    for round_id in range(1, rounds + 1):
        states, weights = [], []
        for data in datas:
            model = TASK.build_model()
            model.load_state_dict(global_state)
            result = TASK.train(model, data, {**params, "round": round_id})
            metrics = TASK.evaluate(model, data)
            assert 0.0 <= metrics["accuracy"] <= 1.0
            states.append(model.state_dict())
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {
            k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
            for k in states[0]
        }
    return global_state


def heldout_accuracy(state: Mapping[str, torch.Tensor]) -> float:
    model = TASK.build_model()
    model.load_state_dict(dict(state))
    return evaluate_split(model, heldout_test())["accuracy"]


def centralized(rounds: int, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    model = TASK.build_model()
    budget = {**params, "epochs": rounds * int(params["epochs"]), "round": 0}
    train_split(model, pooled_training_data(SILOS), budget)
    return model.state_dict()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_reaches_target_and_matches_centralized(seed: int) -> None:
    params = {**PARAMS, "seed": seed}
    initial = heldout_accuracy(TASK.build_model().state_dict())
    federated = heldout_accuracy(fedavg(ROUNDS, params))
    central = heldout_accuracy(centralized(ROUNDS, params))
    print(f"initial {initial:.3f} federated {federated:.3f} central {central:.3f}")
    assert initial < 0.9  # the target is reached by training, not by the initial weights
    assert federated >= 0.92
    assert abs(federated - central) <= 0.03

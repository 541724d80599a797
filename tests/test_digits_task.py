"""The digits example: its pathological split, its options, its model and its training.

Federation-level figures (federated vs centralized vs each silo alone) are in
tests/test_demo_baselines.py; this file tests the task on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from examples.common import TrainParamsError
from examples.digits.data import (
    LOCAL_EVAL_FRACTION,
    MIN_DIRICHLET_SHARE,
    DataOptionsError,
    heldout_test,
    pooled_training_data,
    silo_data,
    silo_indices,
    transform,
)
from examples.digits.task import TASK
from silofed.task import load_model_factory, load_task

SPEC = "examples.digits.task:TASK"


def rows(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x]


def test_split_is_a_partition_of_the_dataset() -> None:
    # Images are compared by content; digits has a few duplicate images, counted as a multiset.
    everything = sorted(rows(torch.from_numpy(transform(load_digits().data))))
    shares = [silo_data(i) for i in range(3)]
    parts = [heldout_test().x] + [s.train.x for s in shares] + [s.evaluation.x for s in shares]
    assert sorted(r for p in parts for r in rows(p)) == everything


@pytest.mark.parametrize(("num_silos", "k"), [(3, 4), (5, 2), (2, 7)])
def test_each_silo_holds_exactly_k_digits_and_together_all_ten(num_silos: int, k: int) -> None:
    held = []
    for index in range(num_silos):
        data = silo_data(index, num_silos, k)
        digits = set(data.train.y.tolist())
        assert len(digits) == k
        assert set(data.evaluation.y.tolist()) == digits  # the validation split is stratified
        share = len(data.evaluation) / (len(data.train) + len(data.evaluation))
        assert abs(share - LOCAL_EVAL_FRACTION) < 0.02
        held.append(digits)
    assert set().union(*held) == set(range(10))


def test_dirichlet_split_partitions_the_pool_with_label_skew_that_alpha_sets() -> None:
    pool_size = len(load_digits().target) - len(heldout_test())
    top_share = {}
    for alpha in (0.1, 100.0):
        shares = [silo_indices(i, 10, split="dirichlet", alpha=alpha) for i in range(10)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(pool_size))
        assert min(len(s) for s in shares) >= MIN_DIRICHLET_SHARE
        # How much of a silo's share its most common digit is, averaged over the silos.
        labels = [TASK.load_data(opts).train.y.numpy() for opts in _dirichlet(alpha)]
        top_share[alpha] = float(np.mean([np.bincount(y).max() / y.size for y in labels]))
    assert top_share[0.1] > 0.5 > 0.2 > top_share[100.0], top_share


def _dirichlet(alpha: float) -> list[dict[str, object]]:
    return [
        {"silo_index": i, "num_silos": 10, "split": "dirichlet", "alpha": alpha} for i in range(10)
    ]


def test_the_default_split_is_the_classes_split() -> None:
    default, explicit = silo_data(1), TASK.load_data({"silo_index": 1, "split": "classes"})
    assert torch.equal(default.train.x, explicit.train.x)
    assert torch.equal(default.evaluation.y, explicit.evaluation.y)


def test_heldout_set_is_stratified() -> None:
    counts = np.bincount(heldout_test().y.numpy(), minlength=10)
    per_digit = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(counts - 0.25 * per_digit) <= 1), (counts, per_digit)


def test_pooled_training_data_is_every_silos_training_split() -> None:
    pooled = pooled_training_data()
    assert len(pooled) == sum(len(silo_data(i).train) for i in range(3))
    assert sorted(rows(pooled.x)) == sorted(r for i in range(3) for r in rows(silo_data(i).train.x))


def test_transform_standardises_with_fixed_constants() -> None:
    images = transform(load_digits().data)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert abs(float(images.mean())) < 0.1
    assert abs(float(images.std()) - 1.0) < 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_silos": 3}, "silo_index must be an integer"),
        ({"silo_index": 3, "num_silos": 3}, r"silo_index must be in 0\.\.2"),
        ({"silo_index": 0, "num_silos": 0}, "num_silos must be >= 1"),
        ({"silo_index": 0, "num_silos": 3, "classes_per_silo": 3}, "every digit held"),
        ({"silo_index": 0, "classes_per_silo": 11}, r"classes_per_silo must be in 1\.\.10"),
        ({"silo_index": True}, "silo_index must be an integer"),
        ({"silo_index": 0, "num_silos": "3"}, "num_silos must be an integer"),
        ({"silo_index": 0, "split": "iid"}, "split must be one of 'classes', 'dirichlet'"),
        ({"silo_index": 0, "split": "dirichlet"}, "needs alpha, a number > 0, got None"),
        ({"silo_index": 0, "split": "dirichlet", "alpha": 0}, "needs alpha, a number > 0"),
        ({"silo_index": 0, "split": "dirichlet", "alpha": "0.1"}, "needs alpha"),
        ({"silo_index": 0, "split": "dirichlet", "alpha": float("inf")}, "alpha must be finite"),
        ({"silo_index": 0, "alpha": 0.1}, "alpha applies to split = 'dirichlet' only"),
        (
            {"silo_index": 0, "split": "dirichlet", "alpha": 0.1, "classes_per_silo": 4},
            "classes_per_silo applies to split = 'classes' only",
        ),
        (
            {"silo_index": 0, "num_silos": 200, "split": "dirichlet", "alpha": 0.1},
            "cannot split the digits",
        ),
    ],
)
def test_load_data_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(DataOptionsError, match=message):
        TASK.load_data(options)


def test_the_spec_loads_for_both_roles() -> None:
    task = load_task(SPEC)
    assert task.name == "digits-cnn"
    model = load_model_factory(SPEC)()
    assert sum(p.numel() for p in model.parameters()) == 6090
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b = TASK.build_model().state_dict(), TASK.build_model().state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_the_silos_digits_replays_exactly_and_depends_on_round() -> None:
    data = TASK.load_data({"silo_index": 1})
    before = TASK.evaluate(TASK.build_model(), data)["accuracy"]
    threads = torch.get_num_threads()
    states, accuracies = [], []
    for round_id in (1, 1, 2):
        model = TASK.build_model()
        for _ in range(3):
            result = TASK.train(model, data, {"round": round_id, "seed": 7})
        assert result.num_examples == len(data.train)
        states.append(model.state_dict())
        accuracies.append(TASK.evaluate(model, data)["accuracy"])
    assert torch.get_num_threads() == threads
    assert before < 0.5 < 0.9 < accuracies[0]  # learned its own 4 digits from chance level
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_train_params_override_the_task_defaults_and_bad_ones_are_named() -> None:
    data = TASK.load_data({"silo_index": 0})
    with pytest.raises(TrainParamsError, match="lr_decay"):
        TASK.train(TASK.build_model(), data, {"lr_decay": 1.5})
    with pytest.raises(TrainParamsError, match="epochs"):
        TASK.train(TASK.build_model(), data, {"epochs": 0})


def test_progress_is_reported_per_batch() -> None:
    data = TASK.load_data({"silo_index": 2})
    calls: list[tuple[int, int]] = []
    TASK.train(
        TASK.build_model(), data, {"batch_size": 64, "progress": lambda d, t: calls.append((d, t))}
    )
    batches = -(-len(data.train) // 64)
    assert calls == [(i, batches) for i in range(1, batches + 1)]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5)


def test_proximal_mu_zero_is_fedavg_and_positive_mu_stays_nearer_the_global_model() -> None:
    data = TASK.load_data({"silo_index": 0})
    start = TASK.build_model()
    TASK.train(start, data, {"round": 1, "seed": 1})  # a global model that is not the initial one
    global_state = {k: v.clone() for k, v in start.state_dict().items()}
    moved = []
    for extra in ({}, {"proximal_mu": 0.0}, {"proximal_mu": 1.0}, {"proximal_mu": 10.0}):
        model = TASK.build_model()
        model.load_state_dict(global_state)
        TASK.train(model, data, {"round": 5, "seed": 2, "lr_decay": 1.0, **extra})
        moved.append((model.state_dict(), distance(model.state_dict(), global_state)))
    plain, mu_zero, mu_one, mu_ten = moved
    assert all(torch.equal(plain[0][k], mu_zero[0][k]) for k in plain[0])  # bit for bit
    assert plain[1] > 0
    assert mu_ten[1] < mu_one[1] < plain[1]
    assert mu_ten[1] < 0.5 * plain[1], [m[1] for m in moved]
    with pytest.raises(TrainParamsError, match="proximal_mu"):
        TASK.train(TASK.build_model(), data, {"proximal_mu": -1.0})

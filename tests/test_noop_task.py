"""The no-op benchmark task: its model size, its one-add "training", and its loaders' checks."""

from __future__ import annotations

import math

import pytest
import torch

from examples.noop.task import (
    DEFAULT_PARAMS,
    PARAMS_ENV,
    STEP,
    NoopOptionsError,
    NoopTask,
)
from silofed.task import load_model_factory, load_task

SPEC = "examples.noop.task:TASK"


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    task = load_task(SPEC)
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    assert _numel(task.build_model()) == DEFAULT_PARAMS
    monkeypatch.setenv(PARAMS_ENV, "12345")
    model = task.build_model()
    assert _numel(model) == 12345
    assert [n for n, _ in model.named_parameters()] == ["big", "small"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_coordinator_and_silo_build_the_same_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PARAMS_ENV, "100")
    silo_model = load_task(SPEC).build_model()
    coordinator_model = load_model_factory(SPEC)()
    a, b = silo_model.state_dict(), coordinator_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_adds_the_silo_constant_to_every_parameter() -> None:
    task = NoopTask(params=1000)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = task.load_data({"silo_index": 2})
    result = task.train(model, data, {"round": 7, "anything": 1})
    step = 3 * STEP
    assert result.num_examples == 102  # the default weight: 100 + silo_index
    assert result.metrics == {"step": pytest.approx(step)}
    delta = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert delta.numel() == 1000
    assert torch.allclose(delta, torch.full_like(delta, step))
    assert float(delta.norm()) == pytest.approx(step * math.sqrt(1000), rel=1e-5)


def test_train_is_deterministic_and_evaluate_reads_the_model() -> None:
    task = NoopTask(params=50)
    data = task.load_data({"silo_index": 0, "num_examples": 7})
    models = [task.build_model() for _ in range(2)]
    for model in models:
        assert task.evaluate(model, data) == {"small_mean": 1.0}
        assert task.train(model, data, {}).num_examples == 7
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert task.evaluate(models[0], data)["small_mean"] == pytest.approx(1.0 + STEP)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"silo_index": -1},
        {"silo_index": "1"},
        {"silo_index": True},
        {"silo_index": 0, "num_examples": 0},
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(NoopOptionsError, match=r"\[task.options\]"):
        NoopTask(params=10).load_data(options)


@pytest.mark.parametrize("value", ["lots", "8", "-5"])
def test_bad_model_size_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PARAMS_ENV, value)
    with pytest.raises(NoopOptionsError, match=PARAMS_ENV):
        NoopTask().build_model()

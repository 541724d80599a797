"""Task specs: both loaders (the silo's whole task, the coordinator's model factory) resolve real
tasks and name the spec and the fault otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from silofed import Task, TrainResult
from silofed.task import TaskLoadError, load_model_factory, load_task

HOSPITAL = "examples.hospital.task:TASK"


class _NotAModel:
    name = "not-a-model"

    def build_model(self) -> object:
        return "a string, not a module"


class _Namespace:
    inner = _NotAModel()


NOT_A_MODEL = _NotAModel()
NESTED = _Namespace()


def test_silo_loader_returns_a_usable_task() -> None:
    task = load_task(HOSPITAL)
    assert isinstance(task, Task)
    assert task.name == "hospital-breast-cancer"
    assert isinstance(task.build_model(), torch.nn.Module)


def test_coordinator_factory_builds_identical_models() -> None:
    factory = load_model_factory(HOSPITAL)
    a, b = factory().state_dict(), factory().state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    silo_side = load_task(HOSPITAL).build_model().state_dict()
    assert all(torch.equal(a[k], silo_side[k]) for k in a)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("examples.hospital.task", "not of the form"),
        ("examples.hospital.task:", "not of the form"),
        (":TASK", "not of the form"),
        ("examples.hospital.task:TASK:x", "not of the form"),
        ("examples/hospital/task.py:TASK", "not of the form"),
        ("no_such_package_silofed.mod:TASK", "cannot import module 'no_such_package_silofed.mod'"),
        ("examples.hospital.task:NOPE", "has no attribute 'NOPE'"),
    ],
)
def test_bad_specs_name_the_spec_and_the_fault(spec: str, fragment: str) -> None:
    for load in (load_task, load_model_factory):
        with pytest.raises(TaskLoadError) as info:
            load(spec)
        assert repr(spec) in str(info.value)
        assert fragment in str(info.value)


def test_object_without_task_methods_is_refused() -> None:
    with pytest.raises(TaskLoadError, match="lacks.*load_data, train, evaluate"):
        load_task("tests.test_task:NOT_A_MODEL")
    with pytest.raises(TaskLoadError, match="has no build_model"):
        load_model_factory("math:pi")


def test_factory_refuses_a_non_module_model() -> None:
    factory = load_model_factory("tests.test_task:NESTED.inner")
    with pytest.raises(TaskLoadError, match="returned str"):
        factory()


def test_import_error_inside_the_task_module_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_task_mod.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_task_mod", raising=False)
    with pytest.raises(TaskLoadError, match="RuntimeError: needs a GPU"):
        load_task("broken_task_mod:TASK")
    with pytest.raises(TaskLoadError, match="RuntimeError: needs a GPU"):
        load_model_factory("broken_task_mod:TASK")


def test_train_result_validates() -> None:
    assert TrainResult(num_examples=3, metrics={"loss": 0.5}).num_examples == 3
    with pytest.raises(ValueError):
        TrainResult(num_examples=0)
    with pytest.raises(TypeError):
        TrainResult(num_examples=True)
    with pytest.raises(ValueError, match="'loss'"):
        TrainResult(num_examples=1, metrics={"loss": float("nan")})

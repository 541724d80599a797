"""The task API: what a task object provides, and how a config spec names one.

Rule: a task is plain PyTorch behind four methods; neither role looks inside a model or the data.
A spec is ``"package.module:attribute"`` (e.g. ``examples.hospital.task:TASK``); loading it
imports the module and checks the object, or raises `TaskLoadError` naming the spec and what
failed. The silo loads the whole task (`load_task`); the coordinator never trains, evaluates or
touches data and takes only the model constructor (`load_model_factory`), for round 0's initial
weights and the state's shape. Task authors import `Task` and `TrainResult` from `silofed`.

This module imports torch only for type checking (and `load_model_factory`'s check, when it
runs), since `silofed` re-exports it and the operator's commands that only read a config file
should not pay torch's import time.

`train(model, data, params)` receives the coordinator's ``[train]`` table (flat scalars: bool,
int, float, str; under secure aggregation it comes inside the signed round configuration, is
the same for every silo, and is bounded by the silo's ``[train_limits]``) plus three keys the
silo agent sets itself (the coordinator may not send them):

- ``params["round"]``: the round id (an int);
- ``params["seed"]``: fresh randomness of the silo's own (a 64-bit int, new every round): seed
  shuffling, dropout and any other training randomness from it, never from something the
  coordinator chose, so a retrained update never repeats bit for bit at the coordinator's wish;
- ``params["progress"]``: a callable ``progress(done, total)`` the task SHOULD call as training
  advances (two numbers in any unit it likes: batches, steps, epochs; ``done <= total``). On a
  terminal the silo draws a progress bar from it (silo_agent.observability.progress). Once the
  round is over
  (aborted, or finished without this silo) it raises `TrainingCancelled`: let it propagate, so
  an abandoned round stops training at the next step instead of running to the end. It must not
  be stored beyond the call to `train`. Check ``callable(params.get("progress"))`` first: a task
  run outside the agent (tests, baselines) gets no such key.

Training on several workers: a task whose `train` is written with silofed.distributed's helpers
declares it with a class attribute ``distributed = True`` (`trains_distributed`). It is a flag,
not a settings object, because the task has nothing else to choose: how many workers a silo
uses is its operator's (``[train] workers`` in the silo's TOML) and the backend is gloo. A task
without the flag is refused at the agent's start when ``workers`` is above 1; one with it trains
in the agent's own process when ``workers`` is 1 (the helpers are then the identity).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

REQUIRED_METHODS = ("build_model", "load_data", "train", "evaluate")
# The optional class attribute declaring that `train` may run on several workers.
DISTRIBUTED_FLAG = "distributed"


class TaskLoadError(Exception):
    """A task spec could not be resolved to a usable task object."""


class TrainingCancelled(Exception):
    """Raised by ``params["progress"]`` once the round is over; tasks let it propagate."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training reports: the example count (the FedAvg weight) and metrics."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int):
            raise TypeError(f"num_examples must be an int, got {type(self.num_examples).__name__}")
        if self.num_examples <= 0:
            raise ValueError(f"num_examples must be > 0, got {self.num_examples}")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not math.isfinite(float(value)):
                raise ValueError(f"metric {key!r} must be a finite number, got {value!r}")


@runtime_checkable
class Task(Protocol):
    """A federated task. `train` updates the model in place; `evaluate` uses the local split."""

    name: str

    def build_model(self) -> torch.nn.Module: ...

    def load_data(self, options: Mapping[str, Any]) -> Any: ...

    def train(
        self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]
    ) -> TrainResult: ...

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"package.module:attribute"``; raises TaskLoadError on any other shape."""
    module, sep, attribute = spec.partition(":")
    if (
        not sep
        or not module
        or not attribute
        or ":" in attribute
        or not all(part.isidentifier() for part in module.split("."))
        or not all(part.isidentifier() for part in attribute.split("."))
    ):
        raise TaskLoadError(
            f"task spec {spec!r} is not of the form 'package.module:attribute' "
            "(e.g. 'examples.hospital.task:TASK'); fix [task] spec in the config"
        )
    return module, attribute


def resolve(spec: str) -> object:
    """Import the module of `spec` and return the named attribute (dotted paths allowed)."""
    module_name, attribute = parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TaskLoadError(
            f"task spec {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TaskLoadError(
                f"task spec {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from exc
    return obj


def load_task(spec: str) -> Task:
    """Resolve `spec` to a task object with name, build_model, load_data, train and evaluate."""
    obj = resolve(spec)
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if not isinstance(getattr(obj, "name", None), str):
        missing.insert(0, "name (a str)")
    if missing:
        raise TaskLoadError(
            f"task spec {spec!r}: {type(obj).__name__} object is not a task; "
            f"it lacks {', '.join(missing)}"
        )
    flag = getattr(obj, DISTRIBUTED_FLAG, False)
    if not isinstance(flag, bool):
        raise TaskLoadError(
            f"task spec {spec!r}: `{DISTRIBUTED_FLAG}` must be True or False, "
            f"got {type(flag).__name__} {flag!r}"
        )
    assert isinstance(obj, Task)  # guaranteed by the checks above; narrows the type for mypy
    return obj


def trains_distributed(task: object) -> bool:
    """Whether `task` declares ``distributed = True``: its `train` uses silofed.distributed and
    may run on several workers (module docstring)."""
    return getattr(task, DISTRIBUTED_FLAG, False) is True


def load_model_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """The coordinator's view of a task: a zero-argument callable building its initial model.

    Raises TaskLoadError naming the spec if it is malformed, its module cannot be imported, the
    attribute is missing or has no `build_model`. Calling the factory raises TaskLoadError if
    `build_model()` fails or does not return a `torch.nn.Module`.
    """
    obj = resolve(spec)
    build = getattr(obj, "build_model", None)
    if not callable(build):
        raise TaskLoadError(f"task spec {spec!r}: {type(obj).__name__} has no build_model()")

    def factory() -> torch.nn.Module:
        import torch  # here, not at the top: see the module docstring

        try:
            model = build()
        except Exception as exc:  # the task's own code: report it, do not crash with a trace
            raise TaskLoadError(
                f"task spec {spec!r}: build_model() failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise TaskLoadError(
                f"task spec {spec!r}: build_model() returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    return factory

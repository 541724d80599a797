"""The coordinator's view of a task: only a model factory.

Rule: the coordinator never trains, evaluates or touches data; from the task named in its config
it needs only `build_model()` to make round 0's initial weights and to know the state's shape. It
shares no code with silo_agent (layering), so resolving the spec is done here again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


class TaskLoadError(Exception):
    """The [task] spec does not name an importable object with a `build_model()` method."""


def load_model_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """Return a zero-argument callable building the task's initial model.

    Raises TaskLoadError naming the spec if it is malformed, its module cannot be imported, the
    attribute is missing or has no `build_model`. Calling the factory raises TaskLoadError if
    `build_model()` does not return a `torch.nn.Module`.
    """
    module_name, sep, attribute = spec.partition(":")
    if (
        not sep
        or not all(p.isidentifier() for p in module_name.split("."))
        or not all(p.isidentifier() for p in attribute.split("."))
    ):
        raise TaskLoadError(
            f"task spec {spec!r} is not of the form 'package.module:attribute' "
            "(e.g. 'examples.hospital.task:TASK'); fix [task] spec in the config"
        )
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise TaskLoadError(
            f"task spec {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise TaskLoadError(
                f"task spec {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        obj = getattr(obj, part)
    build = getattr(obj, "build_model", None)
    if not callable(build):
        raise TaskLoadError(f"task spec {spec!r}: {type(obj).__name__} has no build_model()")

    def factory() -> torch.nn.Module:
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

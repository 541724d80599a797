"""The no-op task: a model of D float32 parameters whose "training" adds a small constant.

It exists to measure the federation itself (transport, aggregation, round log) with the cost of
learning taken out: `train` does one in-place add per parameter tensor, so a round's time is the
system's, not the model's. Nothing is learned and there is no data.

Model size: D parameters, from the environment variable ``SILOFED_NOOP_PARAMS`` (default
1,000,000), read when the model is built. It is an environment variable because the coordinator
builds the model too and never sees the silos' ``[task.options]``; every process of one
federation must agree on it (the benches set it once and their children inherit it). The layout is
one flat tensor ``big`` of D - 8 parameters followed by ``small`` of 8, initialised to 0 and 1.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_examples`` (default
100 + silo_index: the FedAvg weight). Training adds ``STEP * (1 + silo_index)`` to every
parameter, so the update's L2 norm is ``STEP * (1 + silo_index) * sqrt(D)`` (3.2 at D = 10^7 for
silo 0) and the FedAvg of one round is known in closed form. Evaluation reports the mean of
``small`` (the aggregate as the silo received it) and is as cheap as training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from silofed import TrainResult

PARAMS_ENV = "SILOFED_NOOP_PARAMS"
DEFAULT_PARAMS = 1_000_000
SMALL = 8  # a second tensor, so the layout has more than one entry
STEP = 1e-3


class NoopOptionsError(ValueError):
    """A [task.options] value or the model size has the wrong type or range."""


@dataclass(frozen=True)
class NoopData:
    silo_index: int
    num_examples: int


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NoopOptionsError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def params_from_env() -> int:
    """D from ``SILOFED_NOOP_PARAMS`` (digits, underscores allowed), else DEFAULT_PARAMS."""
    text = os.environ.get(PARAMS_ENV)
    if text is None:
        return DEFAULT_PARAMS
    try:
        value = int(text)
    except ValueError:
        raise NoopOptionsError(f"{PARAMS_ENV} must be an integer, got {text!r}") from None
    return _int(value, PARAMS_ENV, SMALL + 1)


class NoopTask:
    """See the module docstring. `params` fixes D; None reads ``SILOFED_NOOP_PARAMS``."""

    name = "noop"

    def __init__(self, params: int | None = None) -> None:
        self._params = None if params is None else _int(params, "params", SMALL + 1)

    @property
    def params(self) -> int:
        if self._params is not None:
            return self._params
        return params_from_env()

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.register_parameter("big", torch.nn.Parameter(torch.zeros(self.params - SMALL)))
        model.register_parameter("small", torch.nn.Parameter(torch.ones(SMALL)))
        return model

    def load_data(self, options: Mapping[str, Any]) -> NoopData:
        if "silo_index" not in options:
            raise NoopOptionsError("[task.options] silo_index is required (0-based)")
        index = _int(options["silo_index"], "[task.options] silo_index", 0)
        examples = _int(options.get("num_examples", 100 + index), "[task.options] num_examples", 1)
        return NoopData(index, examples)

    def step(self, data: NoopData) -> float:
        """The constant `train` adds to every parameter."""
        return STEP * (1 + data.silo_index)

    def train(
        self, model: torch.nn.Module, data: NoopData, params: Mapping[str, Any]
    ) -> TrainResult:
        del params  # nothing to tune
        step = self.step(data)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        return TrainResult(data.num_examples, {"step": step})

    def evaluate(self, model: torch.nn.Module, data: NoopData) -> dict[str, float]:
        del data
        small = dict(model.named_parameters())["small"]
        return {"small_mean": float(small.detach().mean())}


TASK = NoopTask()

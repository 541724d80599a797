"""The digits task: a small CNN classifying scikit-learn's 8x8 handwritten digits (ten classes).

Rule: deterministic given its inputs, like the hospital task: `build_model` seeds its own
generator and never touches torch's global RNG; training is the examples' shared SGD loop
(`examples.hospital.task.train_split`), seeded from ``params["seed"]`` and ``params["round"]``,
on one thread. Data and the fixed preprocessing are in `data.py`.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_silos`` (default 3),
``classes_per_silo`` (default 4: the digits each silo holds, see data.py).
Train params (the coordinator's ``[train]`` table): those of the shared loop — ``epochs``,
``lr``, ``lr_decay``, ``batch_size``, ``momentum`` — with this task's defaults in
`DEFAULT_PARAMS` (the demo's settings: one epoch per round, lr 0.05 decaying by 0.95 a round).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from examples.digits.data import (
    DEFAULT_CLASSES_PER_SILO,
    DEFAULT_NUM_SILOS,
    NUM_CLASSES,
    DataOptionsError,
    SiloData,
    silo_data,
)
from examples.hospital.task import evaluate_split, train_split
from silofed import TrainResult

MODEL_SEED = 1729
CHANNELS = (16, 32)
DEFAULT_PARAMS: Mapping[str, Any] = {
    "epochs": 1,
    "lr": 0.05,
    "lr_decay": 0.95,
    "batch_size": 16,
    "momentum": 0.9,
}


def build_cnn() -> nn.Module:
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks (1->16->32 channels), then 128 -> 10 logits.

    6,090 parameters, the same initial weights every time (uniform in +-1/sqrt(fan_in), the
    scale of PyTorch's default initialisation, drawn from a generator seeded with MODEL_SEED).
    """
    generator = torch.Generator().manual_seed(MODEL_SEED)
    first, second = CHANNELS
    # Layers initialise themselves from the global RNG; fork it so building a model never
    # shifts anyone else's random stream (the weights are then overwritten from `generator`).
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(second * 2 * 2, NUM_CLASSES),
        )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                bound = 1.0 / fan_in**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                assert module.bias is not None  # both layer kinds are built with a bias
                module.bias.uniform_(-bound, bound, generator=generator)
    return model


def _option(options: Mapping[str, Any], key: str, default: int | None) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataOptionsError(
            f"[task.options] {key} must be an integer, got {value!r} "
            "(e.g. silo_index = 0, num_silos = 3, classes_per_silo = 4)"
        )
    return value


@dataclass(frozen=True, slots=True)
class DigitsTask:
    """The task object named by ``examples.digits.task:TASK``."""

    name: str = "digits-cnn"

    def build_model(self) -> nn.Module:
        return build_cnn()

    def load_data(self, options: Mapping[str, Any]) -> SiloData:
        """Raises DataOptionsError naming the option if one is missing or out of range."""
        return silo_data(
            _option(options, "silo_index", None),
            _option(options, "num_silos", DEFAULT_NUM_SILOS),
            _option(options, "classes_per_silo", DEFAULT_CLASSES_PER_SILO),
        )

    def train(self, model: nn.Module, data: Any, params: Mapping[str, Any]) -> TrainResult:
        if not isinstance(data, SiloData):
            raise TypeError(f"digits task expects SiloData, got {type(data).__name__}")
        metrics = train_split(model, data.train, {**DEFAULT_PARAMS, **params})
        return TrainResult(num_examples=len(data.train), metrics=metrics)

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]:
        if not isinstance(data, SiloData):
            raise TypeError(f"digits task expects SiloData, got {type(data).__name__}")
        return evaluate_split(model, data.evaluation)


TASK = DigitsTask()

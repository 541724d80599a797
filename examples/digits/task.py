"""The digits task: a small CNN classifying scikit-learn's 8x8 handwritten digits (ten classes).

Rule: deterministic given its inputs, like the hospital task: `build_model` seeds its own
generator and never touches torch's global RNG; training is the examples' shared SGD loop
(`examples.common.train_split`), seeded from ``params["seed"]`` and ``params["round"]``, on one
thread. Data and the fixed preprocessing are in `data.py`.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_silos`` (default 3),
``split`` (``"classes"``, the default, or ``"dirichlet"``; see data.py), then for
``split = "classes"`` ``classes_per_silo`` (default 4: the digits each silo holds), for
``split = "dirichlet"`` ``alpha`` (required: the Dirichlet concentration, e.g. 0.1). An option
the chosen split does not use is refused rather than ignored.
Train params (the coordinator's ``[train]`` table): those of the shared loop — ``epochs``,
``lr``, ``lr_decay``, ``batch_size``, ``momentum`` — with this task's defaults in
`DEFAULT_PARAMS` (the demo's settings: one epoch per round, lr 0.05 decaying by 0.95 a round).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from examples.common import ClassifierTask, SiloData
from examples.digits.data import (
    DEFAULT_CLASSES_PER_SILO,
    DEFAULT_NUM_SILOS,
    DEFAULT_SPLIT,
    NUM_CLASSES,
    DataOptionsError,
    silo_data,
)

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


# The option only one split reads: given with the other split it would be silently ignored.
_ONLY_FOR = {"classes_per_silo": "classes", "alpha": "dirichlet"}


def load_options(options: Mapping[str, Any]) -> SiloData:
    """The silo's share from its ``[task.options]``.

    Raises DataOptionsError naming the option if one is missing, out of range, or not used by
    the chosen split."""
    split = options.get("split", DEFAULT_SPLIT)
    for key, wanted in _ONLY_FOR.items():
        if key in options and split != wanted:
            raise DataOptionsError(
                f"[task.options] {key} applies to split = {wanted!r} only, but split = "
                f"{split!r}; remove {key} or set split = {wanted!r}"
            )
    return silo_data(
        _option(options, "silo_index", None),
        _option(options, "num_silos", DEFAULT_NUM_SILOS),
        _option(options, "classes_per_silo", DEFAULT_CLASSES_PER_SILO),
        split=split,
        alpha=options.get("alpha"),
    )


TASK = ClassifierTask(
    name="digits-cnn", model=build_cnn, data=load_options, defaults=DEFAULT_PARAMS
)

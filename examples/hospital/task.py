"""The hospital task: a small MLP classifying breast-cancer biopsies (malignant vs benign).

Rule: deterministic given its inputs. `build_model` seeds its own generator, and training (the
examples' shared SGD loop, examples.common) shuffles with a generator seeded from
`params["seed"]` and `params["round"]`; under the silo agent the seed is the silo's own fresh
randomness every round (a run outside the agent passes its own, or gets 0, and replays exactly).
Nothing touches torch's global RNG. Data and the fixed, silo-independent preprocessing are in
`data.py`.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_silos`` (default 3).
Train params (the coordinator's ``[train]`` table), all optional, those of the shared loop with
its defaults (`DEFAULT_PARAMS`): ``epochs`` (2), ``lr`` (0.05), ``lr_decay`` (1.0),
``batch_size`` (32), ``momentum`` (0.9), ``proximal_mu`` (0: FedAvg; > 0 adds FedProx's proximal
term); the agent sets ``seed`` and ``round`` itself (0 outside the agent) and may pass a
``progress`` callable, called after each batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from examples.common import LOOP_DEFAULTS, ClassifierTask, SiloData
from examples.hospital.data import NUM_FEATURES, DataOptionsError, silo_data

HIDDEN = 16
MODEL_SEED = 1729
# The shared loop's defaults are this task's (the loop was written for it first).
DEFAULT_PARAMS: Mapping[str, Any] = LOOP_DEFAULTS


def build_classifier() -> nn.Module:
    """30 inputs -> 16 ReLU -> 2 logits, with the same initial weights every time."""
    generator = torch.Generator().manual_seed(MODEL_SEED)
    # nn.Linear initialises itself from the global RNG; fork it so building a model never
    # shifts anyone else's random stream (the weights are then overwritten from `generator`).
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return model


def load_options(options: Mapping[str, Any]) -> SiloData:
    """The silo's share from its ``[task.options]``.

    Raises DataOptionsError naming the option if silo_index/num_silos are wrong."""
    index = options.get("silo_index")
    count = options.get("num_silos", 3)
    for key, value in (("silo_index", index), ("num_silos", count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataOptionsError(
                f"[task.options] {key} must be an integer, got {value!r} "
                "(e.g. silo_index = 0, num_silos = 3)"
            )
    assert isinstance(index, int) and isinstance(count, int)
    return silo_data(index, count)


TASK = ClassifierTask(
    name="hospital-breast-cancer",
    model=build_classifier,
    data=load_options,
    defaults=DEFAULT_PARAMS,
)

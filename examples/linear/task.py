"""The linear task: least-squares regression of a synthetic target, trainable on many workers.

It is the smallest task that declares ``distributed = True``: its `train` is written once with
silofed.distributed's three steps (wrap, shard, batch_mean) and computes the same update in the
agent's process (``[train] workers = 1``) as on N workers under torchrun (within float
rounding), because every worker draws the same global batches and DDP averages the gradients.

Data: ``num_examples`` rows (default 128) of 8 standard-normal features, drawn from a generator
seeded by ``silo_index``; the target is a fixed linear function of them plus noise (σ = 0.1),
the same function at every silo. A quarter of the rows (the last ones) is the local evaluation
split. Model: ``nn.Linear(8, 1)`` with fixed initial weights.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_examples`` (≥ 8).
Train params (the coordinator's ``[train]`` table), all optional: ``epochs`` (2), ``lr``
(0.05), ``batch_size`` (16), ``momentum`` (0); batches are shuffled with a generator seeded
from ``params["seed"]`` and ``params["round"]`` (the same on every worker). Metrics:
``train_loss``, the mean squared error of the last epoch's steps (each worker's over its own
examples, averaged over the workers); evaluation reports ``mse``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from silofed import TrainResult
from silofed.distributed import batch_mean, shard, wrap

FEATURES = 8
MODEL_SEED = 31
TARGET_SEED = 7
NOISE = 0.1
DEFAULTS: Mapping[str, Any] = {"epochs": 2, "lr": 0.05, "batch_size": 16, "momentum": 0.0}


class LinearOptionsError(ValueError):
    """A [task.options] or [train] value has the wrong type or range."""


@dataclass(frozen=True, slots=True)
class LinearData:
    x: torch.Tensor  # training rows
    y: torch.Tensor
    x_eval: torch.Tensor  # the local evaluation split
    y_eval: torch.Tensor


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LinearOptionsError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LinearOptionsError(f"[train] {what} must be a number, got {value!r}")
    return float(value)


def synthetic(silo_index: int, count: int) -> LinearData:
    """`count` rows of this silo: features from its own seed, the federation's one target."""
    target = torch.randn(FEATURES, generator=torch.Generator().manual_seed(TARGET_SEED))
    gen = torch.Generator().manual_seed(1000 + silo_index)
    x = torch.randn(count, FEATURES, generator=gen)
    y = x @ target + NOISE * torch.randn(count, generator=gen)
    cut = count - count // 4
    return LinearData(x[:cut], y[:cut], x[cut:], y[cut:])


class LinearTask:
    """See the module docstring."""

    name = "linear"
    distributed = True  # train uses silofed.distributed: a silo may run it on several workers

    # The three distributed steps, as attributes: the tests swap one for a wrong one and check
    # that the update then differs from one process's.
    wrap = staticmethod(wrap)
    shard = staticmethod(shard)
    batch_mean = staticmethod(batch_mean)

    def build_model(self) -> nn.Module:
        gen = torch.Generator().manual_seed(MODEL_SEED)
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG
            model = nn.Linear(FEATURES, 1)
        with torch.no_grad():
            model.weight.copy_(0.1 * torch.randn(1, FEATURES, generator=gen))
            model.bias.zero_()
        return model

    def load_data(self, options: Mapping[str, Any]) -> LinearData:
        if "silo_index" not in options:
            raise LinearOptionsError("[task.options] silo_index is required (0-based)")
        index = _int(options["silo_index"], "[task.options] silo_index", 0)
        count = _int(options.get("num_examples", 128), "[task.options] num_examples", 8)
        return synthetic(index, count)

    def train(self, model: nn.Module, data: LinearData, params: Mapping[str, Any]) -> TrainResult:
        p = {**DEFAULTS, **params}
        epochs = _int(p["epochs"], "[train] epochs", 1)
        batch_size = _int(p["batch_size"], "[train] batch_size", 1)
        lr, momentum = _number(p["lr"], "lr"), _number(p["momentum"], "momentum")
        seed = int(p.get("seed", 0)) * 1_000_003 + int(p.get("round", 0))
        generator = torch.Generator().manual_seed(seed % 2**63)
        ddp = self.wrap(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        progress = p.get("progress")
        steps = epochs * -(-len(data.y) // batch_size)
        done = 0
        total, seen = 0.0, 0
        for _ in range(epochs):
            total, seen = 0.0, 0
            order = torch.randperm(len(data.y), generator=generator)  # the same on every worker
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]  # a global batch
                mine = self.shard(batch)  # this worker's part of it
                losses: torch.Tensor = (ddp(data.x[mine]).squeeze(1) - data.y[mine]) ** 2
                loss = self.batch_mean(losses, len(batch))  # the GLOBAL batch's mean
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                optimizer.step()
                total += float(losses.detach().sum())
                seen += len(mine)
                done += 1
                if callable(progress):
                    progress(done, steps)
        return TrainResult(len(data.y), {"train_loss": total / max(seen, 1)})

    def evaluate(self, model: nn.Module, data: LinearData) -> dict[str, float]:
        with torch.no_grad():
            mse = torch.mean((model(data.x_eval).squeeze(1) - data.y_eval) ** 2)
        return {"mse": float(mse)}


TASK = LinearTask()

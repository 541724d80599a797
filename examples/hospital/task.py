"""The hospital task: a small MLP classifying breast-cancer biopsies (malignant vs benign).

Rule: deterministic given its inputs. `build_model` seeds its own generator, and `train` shuffles
with a generator seeded from `params["seed"]` and `params["round"]`; under the silo agent the
seed is the silo's own fresh randomness every round (a run outside the agent passes its own, or
gets 0, and replays exactly). Nothing touches torch's global RNG.
Data and the fixed, silo-independent preprocessing are in `data.py`.

Silo options (``[task.options]``): ``silo_index`` (0-based, required), ``num_silos`` (default 3).
Train params (the coordinator's ``[train]`` table), all optional:
``epochs`` (local epochs per round, default 2), ``lr`` (default 0.05), ``lr_decay`` (default 1.0:
round r trains with ``lr * lr_decay ** (r - 1)``, so a federation anneals its step size by round
number alone, the same at every silo), ``batch_size`` (default 32), ``momentum`` (default 0.9),
``proximal_mu`` (default 0: FedAvg; > 0 adds FedProx's proximal term, silofed.proximal, to the
loss); the agent sets ``seed`` and ``round`` itself (defaults 0 outside the agent).
`train_split` is the examples' shared SGD loop: the digits task (examples.digits) trains with it
too, so both accept the same ``[train]`` keys.
When the runtime passes a callable ``progress``, training reports ``progress(done, total)`` in
batches after each batch (the silo's terminal progress bar); it does not affect the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from examples.hospital.data import (
    NUM_FEATURES,
    DataOptionsError,
    SiloData,
    Split,
    silo_data,
)
from silofed import ProximalTerm, TrainResult

HIDDEN = 16
MODEL_SEED = 1729
DEFAULT_PARAMS: Mapping[str, Any] = {
    "epochs": 2,
    "lr": 0.05,
    "lr_decay": 1.0,
    "batch_size": 32,
    "momentum": 0.9,
    "seed": 0,
    "round": 0,
}


class TrainParamsError(ValueError):
    """A [train] parameter has the wrong type or range."""


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


def _param(params: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = params.get(key, DEFAULT_PARAMS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainParamsError(f"[train] {key} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise TrainParamsError(f"[train] {key} must be an integer, got {value!r}")
    return kind(value)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the previous setting.

    The model has 530 parameters: intra-op threads only add synchronisation, and on a busy
    machine (a demo runs three silos and a coordinator on two cores) they made a 10-round
    simulation 20x slower (10 s instead of 0.5 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_split(model: nn.Module, split: Split, params: Mapping[str, Any]) -> dict[str, float]:
    """Train `model` in place on `split` with SGD; returns the last epoch's mean loss/accuracy."""
    with single_thread():
        return _train_split(model, split, params)


def _train_split(model: nn.Module, split: Split, params: Mapping[str, Any]) -> dict[str, float]:
    epochs = _param(params, "epochs", int)
    lr = _param(params, "lr", float)
    lr_decay = _param(params, "lr_decay", float)
    batch_size = _param(params, "batch_size", int)
    momentum = _param(params, "momentum", float)
    seed = _param(params, "seed", int)
    round_id = _param(params, "round", int)
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= momentum < 1 or not 0 < lr_decay <= 1:
        raise TrainParamsError(
            f"[train] needs epochs >= 1, batch_size >= 1, lr > 0, 0 < lr_decay <= 1, "
            f"0 <= momentum < 1; got epochs={epochs}, batch_size={batch_size}, lr={lr}, "
            f"lr_decay={lr_decay}, momentum={momentum}"
        )
    generator = torch.Generator().manual_seed((seed * 1_000_003 + round_id) % 2**63)
    step_size = lr * lr_decay ** max(round_id - 1, 0)  # rounds count from 1; 0 = outside the agent
    try:  # before the first step: the term anchors to the global model the round started from
        proximal = ProximalTerm.from_params(model, params)
    except ValueError as exc:
        raise TrainParamsError(str(exc)) from exc
    optimizer = torch.optim.SGD(model.parameters(), lr=step_size, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    report = params.get("progress")
    batches = epochs * -(-len(split) // batch_size)
    done = 0
    model.train()
    total_loss, correct = 0.0, 0
    for _ in range(epochs):
        total_loss, correct = 0.0, 0
        order = torch.randperm(len(split), generator=generator)
        for start in range(0, len(split), batch_size):
            batch = order[start : start + batch_size]
            x, y = split.x[batch], split.y[batch]
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)  # reported without the proximal term: the data's loss
            (loss + proximal(model)).backward()
            optimizer.step()
            total_loss += float(loss.item()) * len(batch)
            correct += int((logits.argmax(dim=1) == y).sum().item())
            done += 1
            if callable(report):
                report(done, batches)
    return {"train_loss": total_loss / len(split), "train_accuracy": correct / len(split)}


def evaluate_split(model: nn.Module, split: Split) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `split`."""
    model.eval()
    with single_thread(), torch.no_grad():
        logits = model(split.x)
        loss = nn.functional.cross_entropy(logits, split.y)
        accuracy = (logits.argmax(dim=1) == split.y).float().mean()
    return {"accuracy": float(accuracy.item()), "loss": float(loss.item())}


@dataclass(frozen=True, slots=True)
class HospitalTask:
    """The task object named by ``examples.hospital.task:TASK``."""

    name: str = "hospital-breast-cancer"

    def build_model(self) -> nn.Module:
        return build_classifier()

    def load_data(self, options: Mapping[str, Any]) -> SiloData:
        """Raises DataOptionsError naming the option if silo_index/num_silos are wrong."""
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

    def train(self, model: nn.Module, data: Any, params: Mapping[str, Any]) -> TrainResult:
        if not isinstance(data, SiloData):
            raise TypeError(f"hospital task expects SiloData, got {type(data).__name__}")
        metrics = train_split(model, data.train, params)
        return TrainResult(num_examples=len(data.train), metrics=metrics)

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]:
        if not isinstance(data, SiloData):
            raise TypeError(f"hospital task expects SiloData, got {type(data).__name__}")
        return evaluate_split(model, data.evaluation)


TASK = HospitalTask()

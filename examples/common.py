"""What the shipped classifier examples (hospital, digits) share: their data shapes, the fixed
held-out split, the SGD loop every silo trains with, and the task object around them.

Rule: deterministic given its inputs. Splits are pure functions of the data and a seed;
training shuffles with a generator seeded from ``params["seed"]`` and ``params["round"]`` and
never touches torch's global RNG; torch runs on one thread while training or evaluating. An
example module supplies only what differs: its data set, its transform, its partition, its
model and its default ``[train]`` values.

Train params (the coordinator's ``[train]`` table), all optional, with `LOOP_DEFAULTS` for the
keys a task's own defaults leave out: ``epochs`` (local epochs per round), ``lr``, ``lr_decay``
(round r trains with ``lr * lr_decay ** (r - 1)``, so a federation anneals its step size by
round number alone, the same at every silo), ``batch_size``, ``momentum``, ``proximal_mu``
(default 0: FedAvg; > 0 adds FedProx's proximal term, silofed.proximal, to the loss); the agent
sets ``seed`` and ``round`` itself (0 outside the agent). When the runtime passes a callable
``progress``, training reports ``progress(done, total)`` in batches after each batch (the silo's
terminal progress bar); it does not affect the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from silofed import ProximalTerm, TrainResult

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
# Raw rows -> float32 model inputs; each example fixes its own, the same at every site.
Transform = Callable[[FloatArray], npt.NDArray[np.float32]]
Pool = tuple[FloatArray, IntArray, FloatArray, IntArray]

LOOP_DEFAULTS: Mapping[str, Any] = {
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


@dataclass(frozen=True, slots=True)
class Split:
    """Features (already transformed) and labels of one split, as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} feature rows but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, slots=True)
class SiloData:
    """What one silo holds: its training split and its local evaluation split."""

    train: Split
    evaluation: Split


# ---- data ---------------------------------------------------------------------------------------


def to_split(x: FloatArray, y: IntArray, transform: Transform) -> Split:
    """Raw rows and labels -> a Split of transformed float32 inputs and int64 labels."""
    return Split(x=torch.from_numpy(transform(x)), y=torch.from_numpy(y.astype(np.int64)))


@dataclass(frozen=True, slots=True)
class Source:
    """A scikit-learn bundled data set (`load` returns its Bunch), the fraction of it held out
    as the fixed test set (stratified, `seed`) and the fixed transform of its rows."""

    load: Callable[[], Any]
    transform: Transform
    heldout_fraction: float
    seed: int

    def pool(self) -> Pool:
        """(x_pool, y_pool, x_test, y_test), read-only, computed once per process."""
        return _cached_pool(self.load, self.heldout_fraction, self.seed)

    def heldout_test(self) -> Split:
        """The fixed held-out test set (never seen by any silo)."""
        _, _, x_test, y_test = self.pool()
        return to_split(x_test, y_test, self.transform)


@functools.cache  # read-only arrays: every caller indexes, none mutates
def _cached_pool(load: Callable[[], Any], fraction: float, seed: int) -> Pool:
    bunch = load()
    return heldout_pool(bunch.data, bunch.target, fraction, seed)


def heldout_pool(x: npt.ArrayLike, y: npt.ArrayLike, fraction: float, seed: int) -> Pool:
    """(x_pool, y_pool, x_test, y_test): a stratified `fraction` held out for the test set.

    The arrays are read-only: callers cache them and only ever index them.
    """
    x_all = np.asarray(x, dtype=np.float64)
    y_all = np.asarray(y, dtype=np.int64)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x_all, y_all, test_size=fraction, stratify=y_all, random_state=seed
    )
    for array in (x_pool, y_pool, x_test, y_test):
        array.flags.writeable = False
    return x_pool, y_pool, x_test, y_test


def local_split(
    x: FloatArray,
    y: IntArray,
    fraction: float,
    seed: int,
    transform: Transform,
    *,
    stratify: bool,
) -> SiloData:
    """A silo's share cut into its training split and a `fraction` local evaluation split."""
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        x, y, test_size=fraction, stratify=y if stratify else None, random_state=seed
    )
    return SiloData(
        train=to_split(x_tr, y_tr, transform), evaluation=to_split(x_ev, y_ev, transform)
    )


def pooled(parts: Sequence[Split]) -> Split:
    """Splits concatenated: what a centralized trainer of all those silos would see."""
    return Split(x=torch.cat([p.x for p in parts]), y=torch.cat([p.y for p in parts]))


# ---- training -----------------------------------------------------------------------------------


def _param(params: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = params.get(key, LOOP_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainParamsError(f"[train] {key} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise TrainParamsError(f"[train] {key} must be an integer, got {value!r}")
    return kind(value)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the previous setting.

    The models are small (hundreds to thousands of parameters): intra-op threads only add
    synchronisation, and on a busy machine (a demo runs three silos and a coordinator on two
    cores) they made a 10-round simulation 20x slower (10 s instead of 0.5 s).
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


# ---- the task object ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassifierTask:
    """A task object (silofed.Task) over SiloData: `model` builds the initial model, `data`
    reads the silo's ``[task.options]``, training is `train_split` with `defaults` under the
    coordinator's ``[train]`` table, evaluation is on the silo's local evaluation split."""

    name: str
    model: Callable[[], nn.Module]
    data: Callable[[Mapping[str, Any]], SiloData]
    defaults: Mapping[str, Any]

    def build_model(self) -> nn.Module:
        return self.model()

    def load_data(self, options: Mapping[str, Any]) -> SiloData:
        """Raises the example's DataOptionsError naming the option if one is wrong."""
        return self.data(options)

    def train(self, model: nn.Module, data: Any, params: Mapping[str, Any]) -> TrainResult:
        metrics = train_split(model, self._silo_data(data).train, {**self.defaults, **params})
        return TrainResult(num_examples=len(data.train), metrics=metrics)

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]:
        return evaluate_split(model, self._silo_data(data).evaluation)

    def _silo_data(self, data: Any) -> SiloData:
        if not isinstance(data, SiloData):
            raise TypeError(f"{self.name} task expects SiloData, got {type(data).__name__}")
        return data

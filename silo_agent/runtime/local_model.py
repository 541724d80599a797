"""The silo's view of its model and its training: its own model's layout, the digest of a
received model, metric naming (the bytes codec both roles share is silofed.tensors), and
`LocalTraining`, the one place both aggregation paths call the task's `train` through.

Rule: shared by both aggregation paths; nothing here does I/O beyond reading the OS's
randomness for a training seed and, for training on several workers, clearing what an earlier
agent left under ``<state_dir>/training`` (the workers themselves are
silo_agent.runtime.distributed's)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from secagg.config import TensorSpec, layout_sha256
from secagg.layout import layout_from
from silo_agent.config import SiloConfig
from silo_agent.runtime.distributed import DistributedTraining
from silofed.task import Task, TaskLoadError, TrainResult, trains_distributed
from silofed.tensors import state_to_bytes

DIGEST_CHUNK = 1 << 18  # elements `model_digest` normalises and hashes at a time
TRAINING_DIR = "training"  # under the state directory: the workers' private job directories


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Metric names under `prefix` (eval_ for the received model, train_ for local training)."""
    return {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in metrics.items()}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op pool at one thread for a loop of small elementwise steps: each step on a
    chunk would otherwise be a parallel region whose threads meet at a barrier, and on a machine
    whose cores are busy (other silos, other processes) those barriers cost more than the work
    (bench/round.py, 10 silos on 2 cores, d = 10^7: a secure round 6.5 s with the pools, 2.7 s
    without)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a model's tensors — names (sorted), dtypes, shapes and values — not of a file.

    The differencing guard keys on this: the same tensors re-serialised with other metadata or
    in another order are the same model, so a coordinator cannot make a silo train twice on one
    model by re-encoding it. −0.0 is hashed as +0.0 (the same value to training), and the
    driver refuses tensors whose dtype is not its own model's before hashing, so a dtype change
    cannot make a new digest either."""
    with one_torch_thread():
        return _model_digest(state)


def _model_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256(b"silofed/model-digest/v1\x00")
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        meta = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(meta).to_bytes(4, "big") + meta)
        flat = t.reshape(-1)
        if not t.is_floating_point():
            h.update(flat.view(torch.uint8).numpy().data)  # read in place
            continue
        # A chunk at a time through one small buffer: no model-sized temporaries (their page
        # faults cost more than the hashing).
        buf = torch.empty(min(DIGEST_CHUNK, flat.numel()), dtype=t.dtype)
        for start in range(0, flat.numel(), DIGEST_CHUNK):
            part = buf[: min(DIGEST_CHUNK, flat.numel() - start)]
            part.copy_(flat[start : start + part.numel()])
            part.masked_fill_(part == 0, 0.0)  # −0.0 → +0.0
            h.update(part.view(torch.uint8).numpy().data)
    return h.digest()


def layout_differences(state: Mapping[str, torch.Tensor], layout: tuple[TensorSpec, ...]) -> str:
    """'' when `state` has exactly the names, shapes and dtypes of `layout`; else what differs."""
    want = {s.name: (s.shape, s.dtype) for s in layout}
    got = {
        n: (tuple(int(x) for x in t.shape), str(t.dtype).removeprefix("torch."))
        for n, t in state.items()
    }
    if got == want:
        return ""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    changed = sorted(n for n in want.keys() & got.keys() if want[n] != got[n])
    return f"missing {missing[:5]}, unexpected {extra[:5]}, other shape or dtype {changed[:5]}"


def fresh_seed() -> int:
    """The task's `seed` for one round: the silo's own fresh randomness (64 bits), never the
    coordinator's, so a coordinator cannot make a retrained update repeat bit for bit."""
    return int.from_bytes(os.urandom(8), "big")


@dataclass(frozen=True, slots=True)
class LocalModel:
    """What the silo knows of its own model before any round: the layout a secure round must
    have (a layout that is not this model's is refused before anything is allocated for it)
    and the largest model download it accepts."""

    layout: tuple[TensorSpec, ...]
    layout_sha256: bytes
    max_model_bytes: int

    @staticmethod
    def of(task: Task, max_model_bytes: int | None) -> LocalModel:
        state = task.build_model().state_dict()
        layout = layout_from(
            (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
        )
        limit = max_model_bytes or 2 * len(state_to_bytes(state)) + (1 << 20)
        return LocalModel(layout, layout_sha256(layout), limit)


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class LocalTraining:
    """How this silo runs the task's `train`: in the agent's own process, or (`workers` set,
    from ``[train] workers`` > 1) on that many local workers under torchrun. Either way `train`
    leaves the trained weights in `model` and returns the task's TrainResult, so the round
    goes on from there the same."""

    task: Task
    data: Any
    workers: DistributedTraining | None = None

    @staticmethod
    def of(config: SiloConfig, task: Task, data: Any) -> LocalTraining:
        """This silo's training from its config. Raises TaskLoadError (at the agent's start)
        when ``[train] workers`` > 1 is asked of a task that does not declare
        ``distributed = True``, or its ``[task.options]`` cannot be handed to the workers."""
        workers = config.train.workers
        if workers == 1:
            return LocalTraining(task, data)
        if not trains_distributed(task):
            raise TaskLoadError(
                f"task {config.task_spec} does not declare `distributed = True` (training on "
                f"several workers with silofed.distributed), but [train] workers = {workers} "
                f"in {config.source}; set workers = 1 or use a task written for it"
            )
        try:
            options = json.loads(json.dumps(dict(config.task_options)))
        except (TypeError, ValueError) as exc:
            raise TaskLoadError(
                f"[task.options] in {config.source} cannot be handed to the training workers "
                f"(they travel as JSON; dates and times cannot): {exc}"
            ) from exc
        root = config.state_dir / TRAINING_DIR
        # Only one agent runs on a state directory (its lock): what is here was left by an agent
        # that died while training, and may hold a trained update. Nothing of it is reused.
        shutil.rmtree(root, ignore_errors=True)
        return LocalTraining(
            task,
            data,
            DistributedTraining(config.task_spec, options, workers, root, config.train.timeout_s),
        )

    def train(
        self,
        model: torch.nn.Module,
        params: Mapping[str, Any],
        *,
        cancelled: Callable[[], bool] = _never,
        deadline_s: float | None = None,
    ) -> TrainResult:
        """The task's `train(model, data, params)`. On workers, `cancelled()` (polled) stops
        them with TrainingCancelled, and `deadline_s` bounds them (with ``[train]
        timeout_s``); in the agent's process training stops only through
        ``params["progress"]``, as it always did."""
        if self.workers is None:
            return self.task.train(model, self.data, params)
        return self.workers.train(model, params, cancelled=cancelled, deadline_s=deadline_s)

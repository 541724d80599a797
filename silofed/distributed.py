"""What a task's `train` uses so that one `train` runs in one process or on N workers.

Rule: every helper is the identity (or its plain one-process meaning) when no torch.distributed
process group is initialised, so a task written with them trains the same under a silo with
``[train] workers = 1``, in a test, or in a baseline script. Under the silo agent's workers
(``[train] workers = N``, silo_agent.runtime.distributed) each worker is one rank of a gloo
group; the three steps below make N workers compute the update one process computes:

    from silofed import distributed

    ddp = distributed.wrap(model)              # gradients averaged across the workers (DDP)
    for batch in order.split(batch_size):      # the GLOBAL batches, the same on every worker
        mine = distributed.shard(batch)        # this worker's part of the batch
        losses = loss_fn(ddp(x[mine]), y[mine])                 # per example (reduction="none")
        loss = distributed.batch_mean(losses, len(batch))       # mean over the GLOBAL batch
        loss.backward()

- `shard(batch)` takes every N-th item from this worker's rank (``batch[rank::N]``, the stride
  torch's DistributedSampler uses) of each global batch, not of the data set: every worker then
  takes the same number of steps (DDP waits for all of them at every backward) and step k
  covers exactly the examples step k of one process covers. `order` must therefore be the same
  on every worker: shuffle with a generator seeded from ``params["seed"]``, which is the same on
  every worker.
- `wrap(model)` is `torch.nn.parallel.DistributedDataParallel(model)`: forward through it; the
  trained weights are `model`'s own (DDP shares its parameters). DDP averages the gradients
  over the N workers.
- `batch_mean(losses, n)` is ``losses.sum() / n`` times N: with DDP's average that is the mean
  over the global batch, exactly, also when the batch does not split evenly (a worker whose
  part is empty contributes 0, not NaN).

Not covered: layers whose forward depends on the other examples of the batch (BatchNorm) see
only this worker's part. A task that wants per-worker randomness (dropout) mixes in `rank()`.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def active() -> bool:
    """True when this process is one rank of an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This worker's rank (0 in a single process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of workers (1 in a single process)."""
    return dist.get_world_size() if active() else 1


def shard(batch: T) -> T:
    """This worker's part of a global batch: ``batch[rank::world_size]`` (a tensor along its
    first dimension, or a sequence); `batch` itself in a single process."""
    size = world_size()
    if size == 1:
        return batch
    return batch[rank() :: size]  # type: ignore[index, no-any-return]


def wrap(model: nn.Module) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (gradients averaged over the workers);
    `model` itself in a single process. Forward through what this returns."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def batch_mean(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The loss to call backward on: this worker's per-example `losses` summed, over the
    global batch's `batch_size` examples, times the number of workers (which DDP's average
    divides out). ``losses.mean()`` in a single process."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return losses.sum() * world_size() / batch_size

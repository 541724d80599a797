"""Where a (re)started coordinator's global model comes from.

Rule: rounds a crash left running are marked interrupted; the model is the round log's latest
checkpoint (or rollback's), else a fresh one saved as round 0's checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from coordinator.storage.checkpoints import CheckpointStore
from coordinator.storage.rollback import checkpoint_to_resume
from coordinator.storage.roundlog import RoundLog

log = logging.getLogger("silofed.coordinator")


def resume_global_state(
    roundlog: RoundLog,
    checkpoints: CheckpointStore,
    state_dir: Path,
    model_factory: Callable[[], torch.nn.Module],
    *,
    now: float,
) -> dict[str, torch.Tensor]:
    """The global model to continue from, after marking the rounds a stop interrupted."""
    interrupted = roundlog.mark_interrupted(ended_at=now)
    if interrupted:
        log.warning("rounds %s were interrupted by a previous stop; marked as such", interrupted)
    latest = checkpoint_to_resume(roundlog, state_dir)  # or rollback's N
    if latest is None:
        state = {k: v.detach().clone() for k, v in model_factory().state_dict().items()}
        ckpt = checkpoints.save(0, state)
        roundlog.record_checkpoint(0, ckpt.path, ckpt.sha256)
        log.info("initial model saved as round 0 checkpoint %s", ckpt.sha256[:12])
        return state
    state = checkpoints.load(Path(latest.path), latest.sha256)
    # A checkpoint stores its tensors sorted by name, but a secure round's layout is in the
    # model's own state-dict order (each silo checks it against its model): restore it.
    order = list(model_factory().state_dict())
    if sorted(order) == list(state):
        state = {name: state[name] for name in order}
    log.info("resuming from the checkpoint of round %d (%s)", latest.round_id, latest.sha256[:12])
    return state

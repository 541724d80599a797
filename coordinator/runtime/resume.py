"""Where a (re)started coordinator's global model comes from.

Rule: rounds a crash left running are marked interrupted; the model is the round log's latest
checkpoint (or rollback's), else a fresh one saved as round 0's checkpoint. The server
optimizer's state is the one saved with that checkpoint (a fresh one with round 0's), so a
restart or a rollback to round N continues exactly as an uninterrupted run from round N would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from coordinator.rounds.server_optimizer import ServerOptimizer, ServerOptimizerState
from coordinator.storage.checkpoints import CheckpointStore
from coordinator.storage.rollback import checkpoint_to_resume
from coordinator.storage.roundlog import RoundLog

log = logging.getLogger("silofed.coordinator")


def resume_global_state(
    roundlog: RoundLog,
    checkpoints: CheckpointStore,
    state_dir: Path,
    model_factory: Callable[[], torch.nn.Module],
    optimizer: ServerOptimizer,
    *,
    now: float,
) -> tuple[dict[str, torch.Tensor], ServerOptimizerState]:
    """The global model and the server optimizer's state to continue from, after marking the
    rounds a stop interrupted."""
    interrupted = roundlog.mark_interrupted(ended_at=now)
    if interrupted:
        log.warning("rounds %s were interrupted by a previous stop; marked as such", interrupted)
    latest = checkpoint_to_resume(roundlog, state_dir)  # or rollback's N
    if latest is None:
        state = {k: v.detach().clone() for k, v in model_factory().state_dict().items()}
        ckpt = checkpoints.save(0, state)
        fresh = optimizer.initial_state(state)
        checkpoints.save_server_state(0, fresh.to_saved(), model_sha256=ckpt.sha256)
        roundlog.record_checkpoint(0, ckpt.path, ckpt.sha256)
        log.info("initial model saved as round 0 checkpoint %s", ckpt.sha256[:12])
        return checkpoints.mapped(ckpt).in_order(state), fresh  # held as its file's mapping
    state = checkpoints.load(Path(latest.path), latest.sha256)
    # A checkpoint stores its tensors sorted by name, but a secure round's layout is in the
    # model's own state-dict order (each silo checks it against its model): restore it.
    order = list(model_factory().state_dict())
    if sorted(order) == list(state):
        state = state.in_order(order)
    log.info("resuming from the checkpoint of round %d (%s)", latest.round_id, latest.sha256[:12])
    saved = checkpoints.load_server_state(latest.round_id, latest.sha256)
    if saved is None:
        log.warning(
            "no server optimizer state saved with round %d's checkpoint; %s starts afresh",
            latest.round_id,
            optimizer.describe(),
        )
    return state, optimizer.restore(saved, state)

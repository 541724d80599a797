"""Roll back: the next round starts from the checkpoint of an earlier round N, and says so.

Rule: a rollback is an intent file, `<state_dir>/rollback.json` (`{"to": N, "requested_at": t,
"reason": "..."}`), written by `silofed-coordinator rollback` after checking that round N
completed and has a checkpoint (N = 0 is the initial model). The coordinator honours it at its
next start: `checkpoint_to_resume` returns round N's checkpoint instead of the latest one, and
`take_pending` hands N to the first round it starts (recorded in the round log as
`rollback_of = N`) and removes the file, so the intent is used exactly once. Rounds are never
renumbered or deleted: the log keeps the bad rounds and shows where the rollback happened.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from coordinator.storage.roundlog import CheckpointRecord, RoundLog, RoundNotFound, RoundStatus

INTENT_FILENAME = "rollback.json"
_log = logging.getLogger("silofed.coordinator")


class RollbackError(Exception):
    """A rollback cannot be requested or honoured; str() says why and what to do."""


class IntentDamaged(RollbackError):
    """`rollback.json` exists but cannot be read as an intent; str() names it and the fix."""


@dataclass(frozen=True, slots=True)
class RollbackIntent:
    to: int
    requested_at: float
    reason: str


def checkpoint_of(log: RoundLog, round_id: int) -> CheckpointRecord:
    """The checkpoint round `round_id` produced (0: the initial model). Raises RollbackError."""
    if round_id < 0:
        raise RollbackError(
            f"round {round_id} is not a round number; use 0 (initial model) or more"
        )
    if round_id > 0:
        try:
            detail = log.round_detail(round_id)
        except RoundNotFound as exc:
            raise RollbackError(
                f"round {round_id} is not in the log (last round: {log.last_round_id()}); "
                "see `silofed-coordinator rounds list`"
            ) from exc
        if detail.status is not RoundStatus.COMPLETED:
            raise RollbackError(
                f"round {round_id} is {detail.status.value}, not completed, so it has no model "
                "to roll back to; pick a completed round from `silofed-coordinator rounds list`"
            )
    for c in log.export()["checkpoints"]:
        if int(c["round"]) == round_id:
            return CheckpointRecord(round_id, Path(c["path"]), str(c["sha256"]))
    raise RollbackError(f"round {round_id} has no checkpoint in the log; pick another round")


def request(
    state_dir: Path, log: RoundLog, round_id: int, *, now: float, reason: str
) -> CheckpointRecord:
    """Validate and write the intent; return the checkpoint the next round will start from."""
    ckpt = checkpoint_of(log, round_id)
    intent = {"to": round_id, "requested_at": now, "reason": reason}
    tmp = state_dir / (INTENT_FILENAME + ".tmp")
    tmp.write_text(json.dumps(intent, sort_keys=True) + "\n")
    tmp.replace(state_dir / INTENT_FILENAME)
    return ckpt


def _damaged(path: Path, why: str) -> IntentDamaged:
    return IntentDamaged(
        f"rollback intent {path} is damaged ({why}), so it is not known which round to roll "
        f"back to. Remove it with `silofed-coordinator rollback --state-dir {path.parent} "
        "--cancel` (or delete the file), then request the rollback again with `rollback --to N`"
        " if you still want one, and start the coordinator"
    )


def pending(state_dir: Path) -> RollbackIntent | None:
    """The unconsumed intent, if any. Raises IntentDamaged when the file cannot be used."""
    path = state_dir / INTENT_FILENAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _damaged(path, f"cannot be read: {exc.strerror}") from exc
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _damaged(path, f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _damaged(path, f"a JSON object was expected, found {type(doc).__name__}")
    to = doc.get("to")
    if not isinstance(to, int) or isinstance(to, bool):
        raise _damaged(path, f"'to' must be a round number, found {to!r}")
    at = doc.get("requested_at", 0.0)
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise _damaged(path, f"'requested_at' must be unix seconds, found {at!r}")
    return RollbackIntent(to, float(at), str(doc.get("reason", "")))


def discard(state_dir: Path) -> tuple[RollbackIntent | None, IntentDamaged | None]:
    """Remove the intent file, damaged or not: (the intent it held, or why it was unusable)."""
    try:
        intent, damage = pending(state_dir), None
    except IntentDamaged as exc:
        intent, damage = None, exc
    (state_dir / INTENT_FILENAME).unlink(missing_ok=True)
    return intent, damage


def checkpoint_to_resume(log: RoundLog, state_dir: Path) -> CheckpointRecord | None:
    """The runtime's resume hook: round N's checkpoint when a rollback is pending, else the
    latest completed round's (what a plain restart uses)."""
    intent = pending(state_dir)
    if intent is None:
        return log.latest_checkpoint()
    _log.warning(
        "rolling back as requested at %.0f (%s): the next round starts from round %d's model",
        intent.requested_at,
        intent.reason or "no reason given",
        intent.to,
    )
    return checkpoint_of(log, intent.to)


def take_pending(state_dir: Path) -> int | None:
    """The runtime's round-start hook: N for `rollback_of` once, then the intent is gone."""
    intent = pending(state_dir)
    if intent is None:
        return None
    (state_dir / INTENT_FILENAME).unlink(missing_ok=True)
    return intent.to

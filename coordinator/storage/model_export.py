"""`rounds model`: write the global model of a completed round as a safetensors file.

Rule: the round log is the reference. The checkpoint of round N is exported only if the log
says N completed (or N = 0, the initial model) and records its checkpoint, and only once the
file's SHA-256 equals the one the log records; the output is those exact bytes (the canonical
serialisation, so its digest is the round's `model_out_sha256`), written atomically. Every
refusal is an `ExportError` whose message says what to do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from coordinator.storage.roundlog import CheckpointRecord, RoundLog, RoundNotFound, RoundStatus
from silofed.files import write_atomically


class ExportError(Exception):
    """The model cannot be exported; str() says why and what to do."""


@dataclass(frozen=True, slots=True)
class ExportedModel:
    round_id: int
    output: Path
    sha256: str
    size: int
    checkpoint: Path


def last_completed_round(log: RoundLog) -> int | None:
    completed = [r.round_id for r in log.rounds() if r.status is RoundStatus.COMPLETED]
    return max(completed) if completed else None


def export_model(
    log: RoundLog, checkpoints_dir: Path, round_id: int | None, output: Path
) -> ExportedModel:
    """Verify and write the model of `round_id` (None: the last completed round) to `output`."""
    if round_id is None:
        round_id = last_completed_round(log)
        if round_id is None:
            raise ExportError(
                f"no round in {log.path} has completed yet; `--round 0` exports the initial model"
            )
    record = _checkpoint_record(log, round_id)
    # The file in the given state directory first (a copied or restored state_dir); the path
    # the log recorded otherwise. Either way only bytes with the recorded hash are written.
    beside = checkpoints_dir / record.path.name
    source = beside if beside.exists() else record.path
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ExportError(
            f"cannot read the checkpoint of round {round_id} ({source}: "
            f"{exc.strerror or exc}); nothing was written: restore the file from a backup of "
            f"{checkpoints_dir} (its SHA-256 must be {record.sha256})"
        ) from None
    # silofed.tensors.sha256_hex's digest, without loading torch into the operator's command.
    actual = hashlib.sha256(data).hexdigest()
    if actual != record.sha256:
        raise ExportError(
            f"checkpoint {source} has SHA-256 {actual}, but the round log records "
            f"{record.sha256} for round {round_id}: the file was altered or replaced, so nothing "
            "was written; restore it from a backup, or export another round"
        )
    if output.is_dir():
        raise ExportError(f"{output} is a directory; give --output a file name")
    try:
        write_atomically(output, data, mode=0o600)  # a model: for its operator's eyes only
    except OSError as exc:
        raise ExportError(
            f"cannot write {output}: {exc.strerror or exc}; choose a writable path"
        ) from None
    return ExportedModel(round_id, output, record.sha256, len(data), source)


def _checkpoint_record(log: RoundLog, round_id: int) -> CheckpointRecord:
    """The checkpoint the log vouches for as round `round_id`'s model."""
    if round_id < 0:
        raise ExportError(f"--round must be >= 0 (0 is the initial model), got {round_id}")
    if round_id > 0:
        try:
            detail = log.round_detail(round_id)
        except RoundNotFound as exc:
            raise ExportError(f"{exc}; `rounds list` shows the completed rounds") from None
        if detail.status is not RoundStatus.COMPLETED:
            why = f" ({detail.abort_reason})" if detail.abort_reason else ""
            done = last_completed_round(log)
            hint = (
                "no round has completed yet; `--round 0` is the initial model"
                if done is None
                else "pick a completed round (`rounds list`)"
            )
            raise ExportError(
                f"round {round_id} is {detail.status.value}{why}: it produced no model; {hint}"
            )
        if detail.checkpoint is None or detail.checkpoint.sha256 != detail.model_out_sha256:
            raise ExportError(
                f"the round log records no checkpoint of round {round_id}'s model "
                f"{detail.model_out_sha256}; the log is inconsistent, export another round"
            )
        return detail.checkpoint
    record = log.checkpoint(0)
    if record is None:
        raise ExportError(
            f"{log.path} records no initial model (round 0); the coordinator writes it at its "
            "first start"
        )
    return record

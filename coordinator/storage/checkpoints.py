"""Global-model checkpoints: one safetensors file per round, named by its SHA-256 in the round log.

Rule: the bytes are canonical (silofed.tensors: the one serialisation of a model state, whose
SHA-256 is the `model_sha256` everywhere). A checkpoint is written atomically (silofed.files:
temp file, fsync, rename, fsync of the directory) so a crash leaves either the old file or the
new one, never half of one; `load` checks the hash before it parses anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from silofed.files import write_atomically
from silofed.tensors import StateDecodeError, sha256_hex, state_from_bytes, state_to_bytes


class CheckpointCorrupt(Exception):
    """A checkpoint file is missing, unreadable, or its bytes do not match the recorded SHA-256."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A written checkpoint: where it is and the SHA-256 (hex) of its bytes."""

    path: Path
    sha256: str


def checkpoint_name(round_id: int) -> str:
    """File name of the checkpoint taken after `round_id` (round 0 = the initial model)."""
    if round_id < 0:
        raise ValueError(f"round id must be >= 0, got {round_id}")
    return f"round-{round_id:06d}.safetensors"


class CheckpointStore:
    """Writes and reads checkpoints in one directory (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, round_id: int, state: Mapping[str, torch.Tensor]) -> Checkpoint:
        """Write the checkpoint of `round_id` atomically and return its path and SHA-256."""
        return self.save_bytes(round_id, state_to_bytes(state))

    def save_bytes(self, round_id: int, data: bytes) -> Checkpoint:
        """Write already-serialised canonical bytes (from `state_to_bytes`) as `round_id`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / checkpoint_name(round_id)
        write_atomically(final, data, mode=0o600)
        return Checkpoint(path=final, sha256=sha256_hex(data))

    def load(self, path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
        """Read a checkpoint, verify its SHA-256, then parse it.

        Raises CheckpointCorrupt (naming the file) if it is missing, unreadable or altered.
        """
        data = self.load_bytes(path, expected_sha256)
        try:
            return state_from_bytes(data)
        except StateDecodeError as exc:  # the recorded hash matched: it was written so
            raise CheckpointCorrupt(f"checkpoint {path}: {exc}") from exc

    def load_bytes(self, path: Path, expected_sha256: str) -> bytes:
        """Read and verify a checkpoint's bytes without parsing them."""
        path = Path(path)
        if not path.exists() and (self.directory / path.name).exists():
            # The log may hold a path from before the state directory was moved or restored
            # elsewhere; the file name is the round's, and the hash check below still applies.
            path = self.directory / path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {path}: {exc}") from exc
        actual = sha256_hex(data)
        if actual != expected_sha256.lower():
            raise CheckpointCorrupt(
                f"checkpoint {path} has SHA-256 {actual}, but the round log records "
                f"{expected_sha256}; the file was altered or replaced — restore it or remove the "
                "round's checkpoint record to resume from an earlier one"
            )
        return data

"""Global-model checkpoints: one safetensors file per round, named by its SHA-256 in the round log.

Rule: the bytes are canonical. `state_to_bytes` is the only serialisation of a model state in
silofed; its SHA-256 is the `model_sha256` everywhere (round log, offers, blobs streamed to silos),
so the same state always yields the same bytes (sorted names, contiguous CPU tensors, no metadata).
A checkpoint is written atomically (silofed.files: temp file, fsync, rename, fsync of the
directory) so a crash leaves either the old file or the new one, never half of one; `load` checks
the hash before it parses anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from silofed.files import write_atomically


class CheckpointCorrupt(Exception):
    """A checkpoint file is missing, unreadable, or its bytes do not match the recorded SHA-256."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A written checkpoint: where it is and the SHA-256 (hex) of its bytes."""

    path: Path
    sha256: str


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a model state to canonical safetensors bytes.

    Raises TypeError if a value is not a tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {name!r} is {type(value).__name__}, not a torch.Tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views).
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    data: bytes = _st_save(tensors)
    return data


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict (CPU tensors).

    Raises CheckpointCorrupt if the bytes are not a valid safetensors file.
    """
    try:
        loaded: dict[str, torch.Tensor] = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointCorrupt(f"not a valid safetensors model state: {exc}") from exc
    return dict(sorted(loaded.items()))


def sha256_hex(data: bytes) -> str:
    """The model hash used across silofed: SHA-256 of the canonical bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


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
        return state_from_bytes(self.load_bytes(path, expected_sha256))

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

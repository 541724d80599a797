"""Global-model checkpoints: one safetensors file per round, named by its SHA-256 in the round log.

Rule: the bytes are canonical (silofed.tensors: the one serialisation of a model state, whose
SHA-256 is the `model_sha256` everywhere). A checkpoint is written atomically (silofed.files:
temp file, fsync, rename, fsync of the directory) so a crash leaves either the old file or the
new one, never half of one; `load` checks the hash before it parses anything.

Beside a checkpoint the server optimizer's state is saved (`round-000007.server-opt.safetensors`
next to `round-000007.safetensors`): found by the round's number, never recorded in the round
log, so its safetensors metadata carries what ties it to its model and proves it whole — the
SHA-256 of the checkpoint it was saved with, and a digest over its header, that SHA-256 and every
tensor (name, dtype, shape, bytes). It is parsed (safetensors: no code runs) before that digest
is checked, and refused unless both match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as _st_save

from silofed.files import write_atomically
from silofed.tensors import StateDecodeError, sha256_hex, state_from_bytes, state_to_bytes

SERVER_STATE_SUFFIX = ".server-opt.safetensors"
# The server state file's metadata keys (safetensors `__metadata__`, strings only).
_FORMAT_KEY, _FORMAT = "silofed.format", "server-optimizer-state/1"
_HEADER_KEY = "silofed.header"
_MODEL_KEY = "silofed.model_sha256"
_DIGEST_KEY = "silofed.content_sha256"


class CheckpointCorrupt(Exception):
    """A checkpoint file is missing, unreadable, or its bytes do not match the recorded SHA-256."""


class ServerStateCorrupt(CheckpointCorrupt):
    """A server optimizer state file is unreadable, altered, or was saved with another model."""


@dataclass(frozen=True, slots=True)
class ServerState:
    """A server optimizer's state as saved beside a checkpoint: its tensors, and its header (a
    JSON text coordinator.rounds.server_optimizer writes and reads; opaque here). `source` names
    the file it was read from, for messages ("" before it is saved)."""

    header: str
    tensors: Mapping[str, torch.Tensor]
    source: str = ""


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


def server_state_name(round_id: int) -> str:
    """File name of the server optimizer state saved with the checkpoint of `round_id`."""
    return checkpoint_name(round_id).removesuffix(".safetensors") + SERVER_STATE_SUFFIX


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

    def save_server_state(
        self, round_id: int, state: ServerState, *, model_sha256: str
    ) -> Checkpoint:
        """Write the server optimizer state that goes with checkpoint `round_id` (whose SHA-256 is
        `model_sha256`) atomically, mode 0600; return its path and the SHA-256 of its bytes.
        Save the checkpoint first: a crash between the two leaves a round the log never
        completed, so the state of the round before is the one a restart reads."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: state.tensors[n].detach().to("cpu").contiguous() for n in sorted(state.tensors)
        }
        metadata = {
            _FORMAT_KEY: _FORMAT,
            _HEADER_KEY: state.header,
            _MODEL_KEY: model_sha256.lower(),
            _DIGEST_KEY: _content_digest(state.header, model_sha256.lower(), tensors),
        }
        # clone: safetensors refuses tensors that share storage.
        data: bytes = _st_save({n: t.clone() for n, t in tensors.items()}, metadata=metadata)
        final = self.directory / server_state_name(round_id)
        write_atomically(final, data, mode=0o600)
        return Checkpoint(path=final, sha256=sha256_hex(data))

    def load_server_state(self, round_id: int, model_sha256: str) -> ServerState | None:
        """The server optimizer state saved with checkpoint `round_id`, whose SHA-256 (the round
        log's) is `model_sha256`; None when no state was saved with it. Raises
        ServerStateCorrupt (naming the file and the fix) when the file is unreadable or
        altered, or was saved with another model."""
        path = self.directory / server_state_name(round_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServerStateCorrupt(f"cannot read server optimizer state {path}: {exc}") from exc
        fix = (
            "restore it from a backup, or move it away to restart the server optimizer from "
            f"round {round_id}'s model with a fresh state (its momentum is lost)"
        )
        metadata = _metadata(data)
        if metadata is None or metadata.get(_FORMAT_KEY) != _FORMAT:
            raise ServerStateCorrupt(
                f"server optimizer state {path} is not a silofed server optimizer state; {fix}"
            )
        saved_with = metadata.get(_MODEL_KEY, "")
        if saved_with != model_sha256.lower():
            raise ServerStateCorrupt(
                f"server optimizer state {path} was saved with model {saved_with[:12] or '?'}, "
                f"but round {round_id}'s checkpoint is {model_sha256[:12]}; {fix}"
            )
        try:
            tensors = state_from_bytes(data)
        except StateDecodeError as exc:
            raise ServerStateCorrupt(f"server optimizer state {path}: {exc}; {fix}") from exc
        header = metadata.get(_HEADER_KEY, "")
        if metadata.get(_DIGEST_KEY) != _content_digest(header, saved_with, tensors):
            raise ServerStateCorrupt(
                f"server optimizer state {path} does not match its own digest: it was altered "
                f"or damaged; {fix}"
            )
        return ServerState(header=header, tensors=tensors, source=str(path))


def _metadata(data: bytes) -> dict[str, str] | None:
    """The `__metadata__` of safetensors bytes (an 8-byte little-endian header length, then the
    JSON header), or None when the bytes do not hold one."""
    if len(data) < 8:
        return None
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return None
    return {str(k): v for k, v in meta.items()}


def _content_digest(header: str, model_sha256: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header, the model's SHA-256 and every tensor (name, dtype, shape, bytes,
    in name order), each part length-prefixed so no two different states hash alike."""
    digest = hashlib.sha256()

    def part(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    part(header.encode())
    part(model_sha256.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        part(name.encode())
        part(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        # The tensor's own bytes, read in place (no copy of a model-sized state).
        part(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()

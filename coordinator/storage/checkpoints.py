"""Global-model checkpoints: one safetensors file per round, named by its SHA-256 in the round log.

Rule: the bytes are canonical (silofed.tensors: the one serialisation of a model state, whose
SHA-256 is the `model_sha256` everywhere). A checkpoint is written atomically (silofed.files:
temp file, fsync, rename, fsync of the directory) so a crash leaves either the old file or the
new one, never half of one; `save` streams the tensors into the file (the model's bytes are never
whole in memory) and hashes the file once. `load` checks the hash before it parses anything, and
then maps the file rather than copying it: the coordinator holds its global model as a private
mapping of its checkpoint (`MappedState`), which takes memory only where it is read, and offers
the file's bytes from a read-only mapping (`offer`). silofed never rewrites a checkpoint in place
(a new file is renamed over it), so a mapping keeps the bytes that were verified; a write to a
mapped tensor copies the page, never touching the file.

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
import mmap
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as _st_save
from safetensors.torch import save_file as _st_save_file

from silofed.files import fill_atomically, write_atomically
from silofed.tensors import (
    StateDecodeError,
    canonical_tensors,
    sha256_hex,
    state_from_bytes,
    state_to_bytes,
    state_views,
)

SERVER_STATE_SUFFIX = ".server-opt.safetensors"
# The server state file's metadata keys (safetensors `__metadata__`, strings only).
_FORMAT_KEY, _FORMAT = "silofed.format", "server-optimizer-state/1"
_HEADER_KEY = "silofed.header"
_MODEL_KEY = "silofed.model_sha256"
_DIGEST_KEY = "silofed.content_sha256"
_READ_CHUNK = 1 << 20  # bytes read at a time to hash a checkpoint file


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


@dataclass(frozen=True, slots=True)
class ModelBytes:
    """A model's canonical bytes (silofed.tensors) and their SHA-256, hashed once: the coordinator
    keeps the last checkpoint's (a mapping of its file, `CheckpointStore.offer`) as the next
    round's offer."""

    data: bytes | mmap.mmap
    sha256: bytes

    @staticmethod
    def of(state: Mapping[str, torch.Tensor]) -> ModelBytes:
        data = state_to_bytes(state)
        return ModelBytes(data, hashlib.sha256(data).digest())


class MappedState(dict[str, torch.Tensor]):
    """A model state whose tensors view a private mapping of `checkpoint`'s file (`load`,
    `mapped`): it knows its checkpoint, so offering it sends the file's bytes, not a copy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], checkpoint: Checkpoint) -> None:
        super().__init__(tensors)
        self.checkpoint = checkpoint

    def in_order(self, names: Iterable[str]) -> MappedState:
        """The same tensors in the order of `names` (a model's own state-dict order: a file
        keeps them sorted by name)."""
        return MappedState({name: self[name] for name in names}, self.checkpoint)


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
        """Write the checkpoint of `round_id` atomically and return its path and SHA-256. The
        bytes go from the tensors to the file (safetensors' `save_file`), never whole in
        memory; the SHA-256 is that of the file written, read back through a small buffer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / checkpoint_name(round_id)
        tensors = canonical_tensors(state)
        fill_atomically(final, lambda tmp: _st_save_file(tensors, str(tmp)), mode=0o600)
        try:
            return Checkpoint(path=final, sha256=_file_sha256(final))
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {final}: {exc}") from exc

    def save_bytes(self, round_id: int, data: bytes) -> Checkpoint:
        """Write already-serialised canonical bytes (from `state_to_bytes`) as `round_id`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / checkpoint_name(round_id)
        write_atomically(final, data, mode=0o600)
        return Checkpoint(path=final, sha256=sha256_hex(data))

    def load(self, path: Path, expected_sha256: str) -> MappedState:
        """Verify a checkpoint's SHA-256 (read through a small buffer), then parse it: the
        tensors view a private mapping of the file (`MappedState`), so the model takes memory
        only where it is read, and a write to a tensor copies that page, never the file.

        Raises CheckpointCorrupt (naming the file) if it is missing, unreadable or altered.
        """
        path = self._find(path)
        try:
            actual = _file_sha256(path)
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {path}: {exc}") from exc
        _check_sha256(path, actual, expected_sha256)
        return self.mapped(Checkpoint(path, actual))

    def mapped(self, ckpt: Checkpoint) -> MappedState:
        """The tensors of a checkpoint this store just wrote or verified (`save`, `load`), as
        views of a private mapping of its file. Its bytes are not hashed again: silofed never
        rewrites a checkpoint in place (a new one replaces the file: a mapping keeps the bytes
        it had). Raises CheckpointCorrupt if the file cannot be mapped or parsed."""
        try:
            with ckpt.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
            return MappedState(state_views(data), ckpt)
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {ckpt.path}: {exc}") from exc
        except StateDecodeError as exc:  # the recorded hash matched: it was written so
            raise CheckpointCorrupt(f"checkpoint {ckpt.path}: {exc}") from exc

    def offer(self, ckpt: Checkpoint) -> ModelBytes:
        """A checkpoint's bytes to send, as a read-only mapping of its file: they take memory
        while streams read them, and none once the last stream is done with them."""
        try:
            with ckpt.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {ckpt.path}: {exc}") from exc
        return ModelBytes(data, bytes.fromhex(ckpt.sha256))

    def offer_of(self, state: Mapping[str, torch.Tensor]) -> ModelBytes:
        """What to offer for `state`: its checkpoint's mapped bytes when it was mapped from one
        (hashed when it was), else its serialisation (hashed now)."""
        if isinstance(state, MappedState):
            return self.offer(state.checkpoint)
        return ModelBytes.of(state)

    def load_bytes(self, path: Path, expected_sha256: str) -> bytes:
        """Read and verify a checkpoint's bytes without parsing them."""
        path = self._find(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(f"cannot read checkpoint {path}: {exc}") from exc
        _check_sha256(path, sha256_hex(data), expected_sha256)
        return data

    def _find(self, path: Path) -> Path:
        path = Path(path)
        if not path.exists() and (self.directory / path.name).exists():
            # The log may hold a path from before the state directory was moved or restored
            # elsewhere; the file name is the round's, and the hash check still applies.
            path = self.directory / path.name
        return path

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


def _check_sha256(path: Path, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise CheckpointCorrupt(
            f"checkpoint {path} has SHA-256 {actual}, but the round log records "
            f"{expected}; the file was altered or replaced — restore it or remove the "
            "round's checkpoint record to resume from an earlier one"
        )


def _file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, read through one small buffer (page cache, not this process's
    memory). Raises OSError."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


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

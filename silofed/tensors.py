"""The tensor codec: a model state <-> canonical safetensors bytes, and the hash of those bytes.

Rule: `state_to_bytes` is the only serialisation of a model state in silofed; its SHA-256 is the
`model_sha256` everywhere (round log, checkpoints, offers, blobs streamed either way), so the
same state always yields the same bytes (sorted names, contiguous CPU tensors, no metadata).
Decoding never runs code (safetensors, no pickle) and refuses bytes that are not a model state
with `StateDecodeError`. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save


class StateDecodeError(ValueError):
    """Bytes that are not a valid safetensors model state."""


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
    """Parse safetensors bytes into a state dict (CPU tensors, names sorted).

    Raises StateDecodeError if the bytes are not a valid safetensors file.
    """
    try:
        loaded: dict[str, torch.Tensor] = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise StateDecodeError(f"not a valid safetensors model state: {exc}") from exc
    return dict(sorted(loaded.items()))


def sha256_hex(data: bytes) -> str:
    """The model hash used across silofed: SHA-256 of the canonical bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()

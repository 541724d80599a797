"""The tensor codec: a model state <-> canonical safetensors bytes, and the hash of those bytes.

Rule: `state_to_bytes` is the only serialisation of a model state in silofed (safetensors'
`save_file` of `canonical_tensors` writes the same bytes to a file); its SHA-256 is the
`model_sha256` everywhere (round log, checkpoints, offers, blobs streamed either way), so the
same state always yields the same bytes (sorted names, contiguous CPU tensors, no metadata).
Decoding never runs code (safetensors, no pickle) and refuses bytes that are not a model state
with `StateDecodeError`; `state_views` decodes without copying, for a state that is only read.
Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save


class StateDecodeError(ValueError):
    """Bytes that are not a valid safetensors model state."""


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a model state to canonical safetensors bytes.

    Raises TypeError if a value is not a tensor.
    """
    data: bytes = _st_save(canonical_tensors(state))
    return data


def canonical_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `state_to_bytes` serialises: contiguous CPU tensors, names sorted, none sharing
    memory. safetensors' `save_file` writes exactly those bytes to a file without holding them
    in memory. Raises TypeError if a value is not a tensor."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {name!r} is {type(value).__name__}, not a torch.Tensor")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            # safetensors refuses tensors that share memory (tied weights, views of one
            # tensor): such a one is copied. Any other is read in place, not cloned: its
            # bytes are copied once, into the serialisation.
            tensor = tensor.clone()
        storages.add(storage)
        tensors[name] = tensor
    return tensors


def state_from_bytes(data: bytes | mmap.mmap) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict (CPU tensors, names sorted).

    Raises StateDecodeError if the bytes are not a valid safetensors file.
    """
    try:
        loaded: dict[str, torch.Tensor] = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise StateDecodeError(f"not a valid safetensors model state: {exc}") from exc
    return dict(sorted(loaded.items()))


# What `state_views` maps without copying (safetensors' names); any other dtype is copied.
_VIEW_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound
_Entry = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, offset, count


def state_views(data: bytes | mmap.mmap) -> dict[str, torch.Tensor]:
    """`state_from_bytes` without the copy: the tensors are views into `data` (kept alive by
    them), for a state that is only read — compared, hashed, loaded into a model. They share
    the bytes object's memory, so they must not be written to.

    The same bytes are accepted: a layout is mapped only when it is one safetensors itself
    accepts (checked here, strictly), little-endian on a little-endian machine and aligned;
    anything else goes to `state_from_bytes` (a copy, or StateDecodeError)."""
    entries = _mappable(data)
    if entries is None:
        return state_from_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        whole = torch.frombuffer(data, dtype=torch.uint8)  # a view: no copy
    at = whole.data_ptr()
    if any((at + offset) % dtype.itemsize for _, dtype, _, offset, _ in entries):
        return state_from_bytes(data)  # a misaligned tensor: copied into place
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, offset, count in entries:
        size = count * dtype.itemsize
        out[name] = whole[offset : offset + size].view(dtype).reshape(shape)
    return dict(sorted(out.items()))


def _mappable(data: bytes | mmap.mmap) -> list[_Entry] | None:
    """The tensors of safetensors `data` as (name, dtype, shape, byte offset, count), or None
    unless its header is one safetensors accepts and every dtype can be viewed in place."""
    if sys.byteorder != "little" or len(data) < 9:
        return None
    size = int.from_bytes(data[:8], "little")
    if size > _MAX_HEADER_BYTES or 8 + size > len(data) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    base, entries = 8 + size, []
    for name, info in header.items():
        entry = _entry(name, info, base)
        if entry is None:
            return None
        entries.append(entry)
    # The data section is exactly the tensors, one after the other: no gap, no overlap.
    end = base
    for _, dtype, _, offset, count in sorted(entries, key=lambda e: e[3]):
        if offset != end:
            return None
        end += count * dtype.itemsize
    return entries if end == len(data) else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a safetensors header")
    return out


def _entry(name: str, info: object, base: int) -> _Entry | None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return None
    dtype = _VIEW_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    ints = [*shape, *offsets]
    if len(offsets) != 2 or not all(type(x) is int and x >= 0 for x in ints):
        return None
    count = 1
    for dim in shape:
        count *= dim
    begin, end = offsets
    if end - begin != count * dtype.itemsize:
        return None
    return name, dtype, tuple(shape), base + begin, count


def sha256_hex(data: bytes) -> str:
    """The model hash used across silofed: SHA-256 of the canonical bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()

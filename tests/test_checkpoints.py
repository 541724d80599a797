"""Checkpoints: canonical bytes, atomic writes, hash verified before parsing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.storage.checkpoints import CheckpointCorrupt, CheckpointStore, checkpoint_name
from silofed.tensors import StateDecodeError, state_from_bytes, state_to_bytes


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "half": torch.randn(2, 2, generator=g).to(torch.float16),
    }


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_bytes_round_trip_preserves_names_dtypes_and_values() -> None:
    state = sample_state()
    assert_same_state(state_from_bytes(state_to_bytes(state)), state)


def test_bytes_do_not_depend_on_insertion_order_or_memory_layout() -> None:
    state = sample_state()
    reordered = dict(reversed(list(state.items())))
    # A transposed-twice tensor has the same values but non-contiguous strides.
    reordered["layer.weight"] = state["layer.weight"].t().contiguous().t()
    assert not reordered["layer.weight"].is_contiguous()
    assert state_to_bytes(reordered) == state_to_bytes(state)


def test_tensors_sharing_storage_serialise() -> None:
    base = torch.arange(6, dtype=torch.float32)
    state = {"a": base, "tied": base, "view": base[2:4]}
    back = state_from_bytes(state_to_bytes(state))
    assert torch.equal(back["view"], torch.tensor([2.0, 3.0]))
    assert torch.equal(back["tied"], base)


def test_different_values_give_different_bytes() -> None:
    state = sample_state()
    other = dict(state)
    other["layer.bias"] = state["layer.bias"] + 1e-3
    assert state_to_bytes(other) != state_to_bytes(state)


def test_non_tensor_entry_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="'oops'"):
        state_to_bytes({"oops": [1.0, 2.0]})  # type: ignore[dict-item]


GARBAGE = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"


def test_garbage_bytes_raise_state_decode_error() -> None:
    with pytest.raises(StateDecodeError):
        state_from_bytes(GARBAGE)


def test_a_checkpoint_that_does_not_decode_is_corrupt_and_named(tmp_path: Path) -> None:
    # Its hash matches the log (it was written so), yet it is no model state.
    ckpt = CheckpointStore(tmp_path).save_bytes(3, GARBAGE)
    with pytest.raises(CheckpointCorrupt, match="round-000003.safetensors"):
        CheckpointStore(tmp_path).load(ckpt.path, ckpt.sha256)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_any_shapes(shapes: list[list[int]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {f"t{i}": torch.randn(tuple(shape), generator=g) for i, shape in enumerate(shapes)}
    data = state_to_bytes(state)
    assert_same_state(state_from_bytes(data), state)
    assert state_to_bytes(state_from_bytes(data)) == data


def test_save_writes_named_file_whose_hash_is_reported(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    ckpt = store.save(12, sample_state())
    assert ckpt.path == tmp_path / "checkpoints" / "round-000012.safetensors"
    assert ckpt.sha256 == hashlib.sha256(ckpt.path.read_bytes()).hexdigest()
    assert ckpt.path.read_bytes() == state_to_bytes(sample_state())
    assert [p.name for p in ckpt.path.parent.iterdir()] == ["round-000012.safetensors"]
    assert_same_state(store.load(ckpt.path, ckpt.sha256), sample_state())


def test_load_refuses_altered_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = store.save(1, sample_state())
    data = bytearray(ckpt.path.read_bytes())
    data[-1] ^= 0x01
    ckpt.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="round-000001.safetensors"):
        store.load(ckpt.path, ckpt.sha256)


def test_load_refuses_missing_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointCorrupt, match="cannot read"):
        store.load(tmp_path / "round-000003.safetensors", "00" * 32)


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    first = store.save(5, sample_state())
    before = first.path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    changed = {k: v + 1 for k, v in sample_state().items() if v.dtype == torch.float32}
    with pytest.raises(OSError, match="disk full"):
        store.save(5, changed)
    assert first.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000005.safetensors"]


def test_checkpoint_name_rejects_negative_round() -> None:
    assert checkpoint_name(0) == "round-000000.safetensors"
    with pytest.raises(ValueError):
        checkpoint_name(-1)


def test_load_finds_checkpoint_after_the_state_dir_moved(tmp_path: Path) -> None:
    old = CheckpointStore(tmp_path / "old")
    ckpt = old.save(2, sample_state())
    moved = tmp_path / "new"
    (tmp_path / "old").rename(moved)
    assert not ckpt.path.exists()
    assert_same_state(CheckpointStore(moved).load(ckpt.path, ckpt.sha256), sample_state())
    with pytest.raises(CheckpointCorrupt):
        CheckpointStore(tmp_path / "elsewhere").load(ckpt.path, ckpt.sha256)

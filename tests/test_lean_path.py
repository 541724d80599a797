"""The lean path of the model and the masked vector (issue 14): no model-sized copies where a view
serves, each blob hashed once, and the same bytes, digests and sums as the copying code had."""

from __future__ import annotations

import hashlib
import json
import mmap
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from coordinator.rounds.secure_config import apply_aggregate
from coordinator.runtime.stream import Blob, SiloStream
from coordinator.storage.checkpoints import CheckpointStore, MappedState, ModelBytes
from protos import federation_pb2 as pb
from protos.blobs import Serialized
from secagg.chunking import MAX_CHUNK_BYTES
from secagg.layout import layout_from
from silo_agent.runtime.local_model import DIGEST_CHUNK, model_digest
from silo_agent.runtime.secure_session import FLATTEN_CHUNK, flatten_update
from silofed.tensors import StateDecodeError, state_from_bytes, state_to_bytes, state_views


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(DIGEST_CHUNK * 2 + 3, generator=g)
    big[::7], big[::11] = 0.0, -0.0
    big[5] = float("nan")
    return {
        "big": big,
        "w": torch.randn(30, 7, generator=g).t(),  # not contiguous
        "half": torch.tensor([-0.0, 0.0, 1.5] * 5, dtype=torch.float16),
        "bf": torch.tensor([-0.0, 2.5], dtype=torch.bfloat16),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(-0.0),
        "empty": torch.empty(0, 4),
    }


# ---- serialisation: the same bytes without cloning -------------------------------------------


def _cloning_reference(state: dict[str, torch.Tensor]) -> bytes:
    """What state_to_bytes wrote before it stopped cloning every tensor."""
    data: bytes = st_save({n: state[n].detach().contiguous().clone() for n in sorted(state)})
    return data


def test_serialisation_is_byte_for_byte_the_cloning_one() -> None:
    base = torch.randn(10, 20, generator=torch.Generator().manual_seed(1))
    lin = torch.nn.Linear(3, 3)
    for state in (
        _state(),
        {"a": base, "tied": base},  # one tensor under two names
        {"a": base[:5], "b": base[5:]},  # disjoint views of one storage
        {"a": base[2:7], "b": base[3:4]},  # overlapping views
        {"weight": lin.weight, "bias": lin.bias},  # parameters (requires_grad)
    ):
        assert state_to_bytes(state) == _cloning_reference(state)


# ---- state_views: the same tensors, read in place ---------------------------------------------


def test_views_equal_the_copy_and_share_the_bytes() -> None:
    data = state_to_bytes(_state())
    copied, viewed = state_from_bytes(data), state_views(data)
    assert list(viewed) == list(copied)
    for name, tensor in copied.items():
        assert viewed[name].dtype == tensor.dtype and viewed[name].shape == tensor.shape
        assert torch.equal(viewed[name].isnan(), tensor.isnan())
        assert torch.equal(viewed[name].nan_to_num(), tensor.nan_to_num()), name
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert start <= viewed["big"].data_ptr() < start + len(data), "a view, not a copy"


def _safetensors(entries: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """Hand-made safetensors bytes: (name, dtype, shape, raw bytes) in data order."""
    header, offset = {}, 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries)


def test_a_misaligned_tensor_is_copied_not_viewed() -> None:
    # 3 bytes of U8 first: the F32 after them is not 4-byte aligned (safetensors allows it).
    data = _safetensors(
        [("a", "U8", [3], b"\x01\x02\x03"), ("b", "F32", [2], struct.pack("<2f", 1.5, -2.0))]
    )
    viewed = state_views(data)
    assert torch.equal(viewed["b"], torch.tensor([1.5, -2.0]))
    assert torch.equal(viewed["a"], torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_views_accept_exactly_what_safetensors_accepts() -> None:
    base = state_to_bytes(_state())
    rnd = random.Random(5)
    checked = 0
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rnd.randint(1, 3)):  # mostly in the header, where the layout is
            data[rnd.randrange(min(len(data), 400))] = rnd.randrange(256)
        if rnd.random() < 0.1:
            data = data[: rnd.randrange(len(data))]
        try:
            expected = state_from_bytes(bytes(data))
        except StateDecodeError:
            with pytest.raises(StateDecodeError):
                state_views(bytes(data))
            continue
        got = state_views(bytes(data))
        assert list(got) == list(expected)
        for name in got:
            assert torch.equal(
                got[name].view(-1).view(torch.uint8), expected[name].view(-1).view(torch.uint8)
            )
        checked += 1
    assert checked  # some mutations keep the file valid (a value byte, padding)


def test_views_refuse_garbage_like_the_copy() -> None:
    for garbage in (b"", b"\x00" * 8, b"\x03\x00\x00\x00\x00\x00\x00\x00{}", b"not safetensors"):
        with pytest.raises(StateDecodeError):
            state_from_bytes(garbage)
        with pytest.raises(StateDecodeError):
            state_views(garbage)
    assert state_views(state_to_bytes({})) == {}


# ---- the silo: digest and update a chunk at a time ------------------------------------------


def _digest_reference(state: dict[str, torch.Tensor]) -> bytes:
    """model_digest as it was: whole-tensor temporaries."""
    h = hashlib.sha256(b"silofed/model-digest/v1\x00")
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros_like(t), t)
        t = t.contiguous()
        meta = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(meta).to_bytes(4, "big") + meta)
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def test_model_digest_is_the_whole_tensor_one() -> None:
    state = _state()
    assert model_digest(state) == _digest_reference(state)
    positive = {k: (v + 0 if v.is_floating_point() else v) for k, v in state.items()}  # −0.0→+0.0
    assert not torch.equal(positive["scalar"].view(torch.int32), state["scalar"].view(torch.int32))
    assert model_digest(positive) == model_digest(state)  # the same value to training


def test_flatten_update_is_the_float64_difference_rounded_once() -> None:
    g = torch.Generator().manual_seed(2)
    trained = {
        "big": torch.randn(FLATTEN_CHUNK * 2 + 5, generator=g),
        "w": torch.randn(9, 4, generator=g).t(),
        "h": torch.randn(33, generator=g).half(),
        "d": torch.randn(7, dtype=torch.float64, generator=g) * 1e30,
    }
    received = {k: v + torch.randn(v.shape, generator=g).to(v.dtype) for k, v in trained.items()}
    layout = layout_from(
        (n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in trained.items()
    )
    got = flatten_update(trained, received, layout)
    expected = np.concatenate(
        [(trained[s.name].double() - received[s.name].double()).reshape(-1).numpy() for s in layout]
    ).astype(np.float32)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


# ---- the coordinator: checkpoints streamed, the model mapped ---------------------------------


def test_save_streams_the_canonical_bytes_and_hashes_them_once(tmp_path: Path) -> None:
    store, state = CheckpointStore(tmp_path), _state()
    ckpt = store.save(3, state)
    data = state_to_bytes(state)
    assert ckpt.path.read_bytes() == data
    assert ckpt.sha256 == hashlib.sha256(data).hexdigest()
    assert ckpt.path.stat().st_mode & 0o777 == 0o600


def test_a_loaded_model_maps_its_file_and_writes_never_reach_it(tmp_path: Path) -> None:
    store, state = CheckpointStore(tmp_path), _state()
    ckpt = store.save(1, state)
    before = ckpt.path.read_bytes()
    loaded = store.load(ckpt.path, ckpt.sha256)
    assert isinstance(loaded, MappedState) and loaded.checkpoint == ckpt
    assert torch.equal(loaded["steps"], state["steps"])
    loaded["steps"].add_(100)  # copy-on-write: this process's page only
    assert ckpt.path.read_bytes() == before
    assert torch.equal(store.load(ckpt.path, ckpt.sha256)["steps"], state["steps"])
    ordered = loaded.in_order(["w", "big"])
    assert list(ordered) == ["w", "big"] and ordered.checkpoint == ckpt


def test_the_offer_is_the_file_with_the_digest_taken_when_it_was_saved(tmp_path: Path) -> None:
    store, state = CheckpointStore(tmp_path), _state()
    ckpt = store.save(2, state)
    offer = store.offer(ckpt)
    assert isinstance(offer.data, mmap.mmap)
    assert bytes(offer.data) == ckpt.path.read_bytes()
    assert offer.sha256 == bytes.fromhex(ckpt.sha256)
    mapped = store.load(ckpt.path, ckpt.sha256)
    assert store.offer_of(mapped).data[:] == offer.data[:]
    plain = store.offer_of(state)  # not from a checkpoint: serialised and hashed now
    assert plain == ModelBytes(state_to_bytes(state), hashlib.sha256(plain.data).digest())


def test_a_mapped_blob_streams_in_chunks_and_counts_down_to_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = {"big": torch.arange(MAX_CHUNK_BYTES // 2, dtype=torch.float32)}  # 2 MiB + header
    ckpt = store.save(4, state)
    offer = store.offer(ckpt)
    stream = SiloStream("s1", 0.0, 0.0, on_delivered=lambda s, r: None)
    stream.send(Blob(4, pb.GLOBAL_MODEL, offer.data, offer.sha256))
    assert stream.queue.pending_bytes == len(offer.data)
    messages = stream.next_messages(1.0)
    assert messages is not None
    received, header = b"", None
    for sent in messages:  # the chunks come pre-serialised
        message = (
            pb.CoordinatorMessage.FromString(sent.take()) if isinstance(sent, Serialized) else sent
        )
        if message.HasField("blob_header"):
            header = message.blob_header
        else:
            received += message.blob_chunk.data
    assert header is not None and header.sha256 == offer.sha256 and header.chunk_count == 3
    assert received == ckpt.path.read_bytes()
    assert stream.queue.pending_bytes == 0


# ---- the aggregate applied into the accumulator's memory --------------------------------------


def test_in_place_apply_is_the_same_sum_in_the_aggregate_memory() -> None:
    g = torch.Generator().manual_seed(4)
    old = {"w": torch.randn(4, 5, generator=g), "h": torch.randn(3, generator=g).half()}
    layout = layout_from(
        (n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in old.items()
    )
    aggregate = np.random.default_rng(0).standard_normal(23).astype(np.float32)
    expected = apply_aggregate(old, aggregate.copy(), layout)
    got = apply_aggregate(old, aggregate, layout, in_place=True)
    for name in old:
        assert torch.equal(got[name], expected[name]), name
    assert got["w"].data_ptr() == aggregate.ctypes.data  # ḡ's memory holds the new tensor

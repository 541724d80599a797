"""Blob chunking: round trips, and every way a reassembly must refuse bad input."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.chunking import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    BlobMeta,
    ChunkError,
    Reassembler,
    chunk_count_for,
    describe,
    split,
)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), size=st.integers(1, 700))
def test_round_trip_any_chunk_size(data: bytes, size: int) -> None:
    chunks = list(split(data, size))
    assert all(len(c) <= size for c in chunks)
    assert len(chunks) == chunk_count_for(len(data), size)
    assert b"".join(chunks) == data
    meta = BlobMeta(len(data), hashlib.sha256(data).digest(), chunk_count_for(len(data)))
    r = Reassembler(meta, max_total_bytes=len(data))
    for i, c in enumerate(split(data)):
        r.add(i, c)
    assert r.finish() == data


def test_multi_mib_payload_uses_1mib_chunks() -> None:
    data = bytes(range(256)) * (MAX_CHUNK_BYTES * 3 // 256 + 7)
    meta = describe(data)
    chunks = list(split(data))
    assert meta.chunk_count == len(chunks) == 4
    assert max(len(c) for c in chunks) == MAX_CHUNK_BYTES
    r = Reassembler(meta, max_total_bytes=len(data))
    for i, c in enumerate(chunks):
        r.add(i, c)
    assert r.finish() == data


def test_empty_payload_is_one_empty_chunk() -> None:
    meta = describe(b"")
    assert meta.chunk_count == 1
    r = Reassembler(meta, max_total_bytes=0)
    r.add(0, next(iter(split(b""))))
    assert r.finish() == b""


def _two_chunks() -> tuple[bytes, BlobMeta, list[bytes]]:
    data = b"x" * (MAX_CHUNK_BYTES + 10)
    return data, describe(data), list(split(data))


def test_out_of_order_chunk_refused() -> None:
    _, meta, chunks = _two_chunks()
    r = Reassembler(meta, max_total_bytes=10 * MAX_CHUNK_BYTES)
    with pytest.raises(ChunkError, match="out of order"):
        r.add(1, chunks[1])


def test_oversized_blob_refused_before_any_chunk() -> None:
    _, meta, _ = _two_chunks()
    with pytest.raises(ChunkError, match="exceeds the limit"):
        Reassembler(meta, max_total_bytes=MAX_CHUNK_BYTES)


def test_oversized_chunk_refused() -> None:
    meta = BlobMeta(3 * MAX_CHUNK_BYTES, b"\0" * 32, 3)
    r = Reassembler(meta, max_total_bytes=3 * MAX_CHUNK_BYTES)
    with pytest.raises(ChunkError, match="more than"):
        r.add(0, b"y" * (MAX_CHUNK_BYTES + 1))


def test_tampered_chunk_fails_hash() -> None:
    _, meta, chunks = _two_chunks()
    r = Reassembler(meta, max_total_bytes=10 * MAX_CHUNK_BYTES)
    r.add(0, chunks[0])
    r.add(1, b"y" + chunks[1][1:])
    with pytest.raises(ChunkError, match="SHA-256"):
        r.finish()


def test_incomplete_and_short_and_overrun() -> None:
    _, meta, chunks = _two_chunks()
    r = Reassembler(meta, max_total_bytes=10 * MAX_CHUNK_BYTES)
    r.add(0, chunks[0])
    with pytest.raises(ChunkError, match="incomplete"):
        r.finish()
    r.add(1, chunks[1][:-1])
    with pytest.raises(ChunkError, match="announced"):
        r.finish()
    r2 = Reassembler(meta, max_total_bytes=10 * MAX_CHUNK_BYTES)
    r2.add(0, chunks[0])
    with pytest.raises(ChunkError, match="overruns"):
        r2.add(1, chunks[1] + b"extra")


def test_chunk_after_complete_refused() -> None:
    meta = describe(b"abc")
    r = Reassembler(meta, max_total_bytes=3)
    r.add(0, b"abc")
    with pytest.raises(ChunkError, match="after the blob was complete"):
        r.add(1, b"")


def test_header_with_wrong_chunk_count_refused() -> None:
    with pytest.raises(ChunkError, match="needs 2 chunks"):
        BlobMeta(MAX_CHUNK_BYTES + 1, b"\0" * 32, 1)
    assert chunk_count_for(MAX_CHUNK_BYTES) == 1
    assert chunk_count_for(MAX_CHUNK_BYTES + 1) == 2


def test_reassembly_into_a_reused_buffer() -> None:
    import numpy as np

    buffer = np.zeros(700_000, dtype="<u4")  # 2.8 MB: three chunks
    for seed in (1, 2):  # the same buffer serves blob after blob
        vector = np.random.default_rng(seed).integers(0, 2**32, size=700_000, dtype="<u4")
        data = vector.tobytes()
        r = Reassembler(describe(data), max_total_bytes=len(data), into=buffer.data)
        for i, chunk in enumerate(split(data)):
            r.add(i, chunk)
        view = r.finish_into()
        assert view.nbytes == len(data) and r.sha256 == hashlib.sha256(data).digest()
        assert np.array_equal(buffer, vector)
        with pytest.raises(ValueError, match="finish_into"):
            r.finish()


def test_reassembly_into_checks_its_buffer_and_the_hash() -> None:
    import numpy as np

    data = b"x" * 100
    with pytest.raises(ValueError, match="at least the blob's size"):
        Reassembler(describe(data), max_total_bytes=100, into=memoryview(bytearray(99)))
    with pytest.raises(ValueError, match="writable"):
        Reassembler(describe(data), max_total_bytes=100, into=memoryview(bytes(100)))
    target = np.zeros(100, dtype=np.uint8)
    meta = BlobMeta(100, hashlib.sha256(b"y" * 100).digest(), 1)
    r = Reassembler(meta, max_total_bytes=100, into=target.data)
    r.add(0, data)
    with pytest.raises(ChunkError, match="SHA-256"):
        r.finish_into()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 3 * MAX_CHUNK_BYTES),
    chunk_bytes=st.integers(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
)
def test_a_blob_cut_into_agreed_chunks_is_counted_and_reassembled_by_that_size(
    size: int, chunk_bytes: int
) -> None:
    data = bytes(size)
    meta = describe(data, chunk_bytes=chunk_bytes)
    assert meta.chunk_bytes == chunk_bytes
    assert meta.chunk_count == max(1, -(-size // chunk_bytes))
    r = Reassembler(meta, max_total_bytes=size)
    for i, c in enumerate(split(data, chunk_bytes)):
        r.add(i, c)
    assert r.finish() == data


def test_the_agreed_chunk_size_bounds_every_chunk_and_the_count() -> None:
    small = MIN_CHUNK_BYTES * 2
    meta = BlobMeta(3 * small, b"\0" * 32, 3, small)
    with pytest.raises(ChunkError, match=f"more than {small}"):
        Reassembler(meta, max_total_bytes=3 * small).add(0, b"y" * (small + 1))
    with pytest.raises(ChunkError, match=f"needs 3 chunks of {small} bytes, header says 1"):
        BlobMeta(3 * small, b"\0" * 32, 1, small)  # counted by 1 MiB


@pytest.mark.parametrize("chunk_bytes", [0, 1, MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1])
def test_a_chunk_size_outside_the_range_is_refused(chunk_bytes: int) -> None:
    with pytest.raises(ChunkError, match="outside"):
        BlobMeta(10, b"\0" * 32, 1, chunk_bytes)

"""Blob framing: one payload on the wire as a BlobHeader then its BlobChunks (≤ 1 MiB each).

Rule: the one place both sides frame a blob (the coordinator's model offers, the silo's
updates and masked vectors); the caller names its stream's message type (CoordinatorMessage or
SiloMessage), which both carry `blob_header` and `blob_chunk`. Hand-written, not generated.

`serialized_chunks` frames the chunks as the bytes `SerializeToString` would give, straight from
the payload: one copy of each chunk where a message takes three (the chunk, the message holding
it, its serialisation), for a stream that sends pre-serialised messages (the coordinator's). The
bytes are the protobuf encoding written out (a tag, a varint length, the fields);
tests/test_download_slots.py checks them byte for byte against `SerializeToString`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from protos import federation_pb2 as pb
from secagg.chunking import MAX_CHUNK_BYTES, BlobMeta, chunk_count_for, split

M = TypeVar("M", pb.CoordinatorMessage, pb.SiloMessage)

_LENGTH_DELIMITED = 2  # the protobuf wire type of bytes and embedded messages
# The encoder writes fields in field-number order, and `data` is BlobChunk's last (the test
# checks): the small fields are serialised by the library and the chunk appended after them.
_DATA_FIELD = pb.BlobChunk.DESCRIPTOR.fields_by_name["data"].number


def blob_messages(
    message: Callable[..., M],
    *,
    round_id: int,
    kind: pb.BlobKind.ValueType,
    data: bytes | memoryview,
    meta: BlobMeta,
    protocol_header: bytes = b"",
) -> Iterator[M]:
    """`data` (described by `meta`) as one `message(blob_header=...)` then one
    `message(blob_chunk=...)` per chunk of `meta.chunk_bytes`, lazily: nothing is copied whole."""
    yield message(
        blob_header=blob_header(
            round_id=round_id, kind=kind, meta=meta, protocol_header=protocol_header
        )
    )
    for index, chunk in enumerate(split(data, meta.chunk_bytes)):
        yield message(
            blob_chunk=pb.BlobChunk(round_id=round_id, kind=kind, index=index, data=chunk)
        )


def blob_header(
    *, round_id: int, kind: pb.BlobKind.ValueType, meta: BlobMeta, protocol_header: bytes = b""
) -> pb.BlobHeader:
    """The header announcing a blob described by `meta`."""
    return pb.BlobHeader(
        round_id=round_id,
        kind=kind,
        total_bytes=meta.total_bytes,
        sha256=meta.sha256,
        chunk_count=meta.chunk_count,
        protocol_header=protocol_header,
    )


def serialized_chunks(
    message: type[pb.CoordinatorMessage] | type[pb.SiloMessage],
    *,
    round_id: int,
    kind: pb.BlobKind.ValueType,
    data: bytes | memoryview,
) -> Iterator[bytes]:
    """`data`'s chunks as serialised `message(blob_chunk=...)`, lazily: each is exactly
    `message(blob_chunk=BlobChunk(round_id, kind, index, data=chunk)).SerializeToString()`,
    made with one copy of the chunk (out of `data`, which may be a mapped file)."""
    view = memoryview(data).cast("B")
    chunk_key = _key(message.DESCRIPTOR.fields_by_name["blob_chunk"].number)
    data_key = _key(_DATA_FIELD)
    for index in range(chunk_count_for(len(view))):
        chunk = view[index * MAX_CHUNK_BYTES : (index + 1) * MAX_CHUNK_BYTES]
        # round_id, kind and index by the library (it leaves out zeros, as proto3 does)
        fields = pb.BlobChunk(round_id=round_id, kind=kind, index=index).SerializeToString()
        if len(chunk):  # an empty `data` is left out too
            fields += data_key + _varint(len(chunk))
        yield b"".join((chunk_key, _varint(len(fields) + len(chunk)), fields, chunk))


class Serialized:
    """A message already serialised, handed over once (`take`): whoever keeps the object
    afterwards does not keep its bytes. gRPC's sync server holds the last response it sent
    until the stream yields the next one, which can be a whole phase later: with the chunk
    itself, every silo's stream would keep its model's last chunk that long."""

    __slots__ = ("_data", "size")

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        self.size = len(data)  # the serialised message's size, still known once taken

    def take(self) -> bytes:
        """The bytes, once; a second call raises (a frame is sent once)."""
        data, self._data = self._data, None
        if data is None:
            raise RuntimeError("this serialised message was already taken")
        return data


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | _LENGTH_DELIMITED)


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint: 7 bits a byte, least significant first."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

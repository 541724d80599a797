"""Blob framing: one payload on the wire as a BlobHeader then its ≤1 MiB BlobChunks.

Rule: the one place both sides frame a blob (the coordinator's model offers, the silo's
updates and masked vectors); the caller names its stream's message type (CoordinatorMessage or
SiloMessage), which both carry `blob_header` and `blob_chunk`. Hand-written, not generated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from protos import federation_pb2 as pb
from secagg.chunking import BlobMeta, split

M = TypeVar("M", pb.CoordinatorMessage, pb.SiloMessage)


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
    `message(blob_chunk=...)` per chunk, lazily: nothing is copied whole."""
    yield message(
        blob_header=pb.BlobHeader(
            round_id=round_id,
            kind=kind,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            chunk_count=meta.chunk_count,
            protocol_header=protocol_header,
        )
    )
    for index, chunk in enumerate(split(data)):
        yield message(
            blob_chunk=pb.BlobChunk(round_id=round_id, kind=kind, index=index, data=chunk)
        )

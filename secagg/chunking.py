"""Large payloads as a header plus ordered chunks of at most 1 MiB, checked by SHA-256.

A blob's chunks all have its chunk size (`BlobMeta.chunk_bytes`, between `MIN_CHUNK_BYTES` and
`MAX_CHUNK_BYTES`; agreed between the two ends beforehand, not sent), the last one excepted.

Rule: pure bytes in, bytes out. Nothing here knows about gRPC, files or the protocol that
carries the blob; both roles use it to cut a payload for the stream and to reassemble one.
A reassembled blob is only handed out after its size and SHA-256 match the header, so nothing
downstream ever sees unchecked bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

MAX_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1 << 16  # a peer cannot make the other cut a blob into tiny messages


class ChunkError(ValueError):
    """A blob header or chunk is inconsistent; str() names what is wrong."""


@dataclass(frozen=True, slots=True)
class BlobMeta:
    """What a BlobHeader announces (total size, SHA-256 over all bytes, number of chunks), and
    the chunk size the two ends agreed on."""

    total_bytes: int
    sha256: bytes
    chunk_count: int
    chunk_bytes: int = MAX_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.total_bytes < 0:
            raise ChunkError("blob total_bytes is negative")
        if len(self.sha256) != 32:
            raise ChunkError("blob sha256 must be 32 bytes")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ChunkError(
                f"chunk size {self.chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
            )
        needed = chunk_count_for(self.total_bytes, self.chunk_bytes)
        if self.chunk_count != needed:
            raise ChunkError(
                f"blob of {self.total_bytes} bytes needs {needed} chunks of "
                f"{self.chunk_bytes} bytes, header says {self.chunk_count}"
            )


def chunk_count_for(total_bytes: int, chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Number of chunks for a payload; an empty payload still travels as one empty chunk."""
    return max(1, -(-total_bytes // chunk_bytes))


def describe(
    data: bytes | memoryview, sha256: bytes | None = None, chunk_bytes: int = MAX_CHUNK_BYTES
) -> BlobMeta:
    """The header fields for `data` cut into `chunk_bytes` chunks (`sha256`: its digest, when
    the caller already has it)."""
    digest = hashlib.sha256(data).digest() if sha256 is None else sha256
    return BlobMeta(len(data), digest, chunk_count_for(len(data), chunk_bytes), chunk_bytes)


def split(data: bytes | memoryview, chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield `data` in order as chunks of at most `chunk_bytes` (copies made lazily)."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ChunkError(f"chunk size must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    view = memoryview(data)
    if not data:
        yield b""
        return
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


class Reassembler:
    """Collects the chunks of one blob; refuses gaps, reordering, oversize and a bad hash.

    With `into` (a writable buffer of at least the blob's size) the chunks are copied into it as
    they arrive and `finish` returns a view of it: no second copy of a large blob, and a caller
    can reuse one buffer for blob after blob."""

    def __init__(
        self, meta: BlobMeta, *, max_total_bytes: int, into: memoryview | None = None
    ) -> None:
        if meta.total_bytes > max_total_bytes:
            raise ChunkError(
                f"blob of {meta.total_bytes} bytes exceeds the limit of {max_total_bytes} bytes"
            )
        if into is not None and (into.readonly or into.nbytes < meta.total_bytes):
            raise ValueError("`into` must be a writable buffer of at least the blob's size")
        self.meta = meta
        self._into = into.cast("B") if into is not None else None
        self._parts: list[bytes] = []
        self._count = 0
        self._received = 0
        self._hash = hashlib.sha256()

    @property
    def next_index(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.meta.chunk_count

    @property
    def sha256(self) -> bytes:
        """SHA-256 of what has arrived (the whole blob's once `finish` succeeded)."""
        return self._hash.digest()

    def add(self, index: int, data: bytes) -> None:
        """Append chunk `index`. Raises ChunkError when it is out of order or too big."""
        if self.complete:
            raise ChunkError(f"chunk {index} arrived after the blob was complete")
        if index != self.next_index:
            raise ChunkError(f"chunk {index} arrived out of order; expected {self.next_index}")
        if len(data) > self.meta.chunk_bytes:
            raise ChunkError(
                f"chunk {index} has {len(data)} bytes, more than {self.meta.chunk_bytes}"
            )
        if self._received + len(data) > self.meta.total_bytes:
            raise ChunkError(f"chunk {index} overruns the announced {self.meta.total_bytes} bytes")
        if self._into is not None:
            self._into[self._received : self._received + len(data)] = data
        else:
            self._parts.append(data)
        self._count += 1
        self._received += len(data)
        self._hash.update(data)

    def finish(self) -> bytes:
        """The checked payload. Raises ChunkError if incomplete, short, or the hash differs."""
        self._check()
        if self._into is not None:
            raise ValueError("this blob was assembled into a buffer: use finish_into()")
        data = b"".join(self._parts)
        self._parts = []
        return data

    def finish_into(self) -> memoryview:
        """The checked payload as a view of the `into` buffer (same checks as `finish`)."""
        self._check()
        if self._into is None:
            raise ValueError("no `into` buffer was given: use finish()")
        return self._into[: self._received]

    def _check(self) -> None:
        if not self.complete:
            raise ChunkError(
                f"blob incomplete: {self.next_index} of {self.meta.chunk_count} chunks received"
            )
        if self._received != self.meta.total_bytes:
            raise ChunkError(
                f"blob has {self._received} bytes, header announced {self.meta.total_bytes}"
            )
        if self._hash.digest() != self.meta.sha256:
            raise ChunkError("blob SHA-256 does not match its header")

"""One admitted silo's stream as the hub sees it: its outbound queue, counters and upload state.

Rule: a `SiloStream` is mutated only under the hub's lock (its queue is thread-safe on its own),
except where its upload progresses: the stream's one reader thread copies and hashes each chunk
(and counts its bytes) WITHOUT the hub's lock, holding only the stream's `upload_lock`; starting
or ending an upload takes both. The hub's lock is never taken while `upload_lock` is held (the
order is hub lock, then upload lock). It frames what it sends lazily (protos/blobs.py), so a
model offered to every silo is held once; with the hub's download slots (downloads.py) it sends
a model only while it holds one, from its own writer thread, without the hub's lock.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from coordinator.observability.ratelimit import PeerLog
from coordinator.runtime.downloads import DownloadSlots
from coordinator.runtime.outbound import OutboundQueue, Overflow
from protos import federation_pb2 as pb
from protos.blobs import Serialized, blob_header, serialized_chunks
from secagg.chunking import MAX_CHUNK_BYTES, Reassembler, describe

log = logging.getLogger("silofed.coordinator")


@dataclass(frozen=True, slots=True)
class Blob:
    """A payload queued for a silo; expanded into header + chunks only as the stream sends it."""

    round_id: int
    kind: pb.BlobKind.ValueType
    data: bytes | mmap.mmap  # a checkpoint's mapped file is sent as it is
    sha256: bytes  # hashed once per round, not once per silo


@dataclass(frozen=True, slots=True)
class Delivered:
    """Marker: everything queued before it has been handed to the silo's stream."""

    round_id: int


Item = pb.CoordinatorMessage | Blob | Delivered | None
# What the stream sends: a message, or one already serialised (a blob's chunk).
Outgoing = pb.CoordinatorMessage | Serialized
# A silo that reconnects only to stop reading again overflows once per round at most; still,
# one line per silo per interval.
_overflow_log = PeerLog(log)
_stalled_log = PeerLog(log)
# How long a writer waits for a download slot before it looks whether its stream ended.
SLOT_WAIT_S = 1.0


@dataclass(eq=False)
class SiloStream:
    """One admitted silo stream. The hub mutates it only under its lock; its upload (and the
    inbound byte counters) under `upload_lock` too: chunks arrive without the hub's lock.

    Its outbound queue is bounded in bytes (coordinator/runtime/outbound.py): past about one model
    the
    session closes itself (`overflow` says why), drops what it queued and cancels its stream when
    the servicer attached one; the hub then drops the silo like a disconnected one. A model is
    sent only while the stream holds one of `downloads`' slots (None: no bound); a stream that
    stops taking it loses the slot and ends the same way (`stalled` says why)."""

    silo_id: str
    connected_since: float
    cert_not_after: float
    on_delivered: Callable[[SiloStream, int], None]
    cert_serial: int = 0  # what `silofed-coordinator revoke --serial` takes
    queue: OutboundQueue[Item] = field(default_factory=OutboundQueue)
    closed: bool = False
    overflow: Overflow | None = None  # set once the outbound queue passed its bound
    cancel_stream: Callable[[], object] | None = None  # ends the RPC even while a send blocks
    downloads: DownloadSlots | None = None  # the hub's download slots; None: not bounded
    stalled: str | None = None  # set (by any thread) once it lost its download slot
    # Wire 1.1: its silo sends a masked vector's chunks only after an UploadGrant (uploads.py);
    # `awaiting_grant` is the header of the vector waiting for one (under the hub's lock).
    upload_grants: bool = False
    awaiting_grant: pb.BlobHeader | None = None
    # Wire 1.2: its silo cuts uploads into chunks of the size its Welcome named; None: a silo
    # before 1.2, told none, cuts 1 MiB chunks. An upload's header counts its chunks by it.
    upload_chunk_bytes: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    round_bytes_in: int = 0
    round_bytes_out: int = 0
    # The reader adds a chunk under this lock only, without the hub's: the hub takes it too to
    # end an upload (a stall seen at the driver's tick, a new round, a replaced stream), so the
    # buffer is never freed while a chunk is copied into it. Which upload, buffer and slot the
    # stream holds changes only under both locks.
    upload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    upload: Reassembler | None = None
    # The upload the hub's progress watch last saw and when it last moved (a chunk arrived).
    upload_watched: Reassembler | None = None
    upload_moved_at: float = 0.0
    upload_started_at: float = 0.0  # when the watched upload was first seen
    # A buffered upload (a vector): the protocol's header from its BlobHeader, opaque to the
    # hub; whether it holds one of the hub's upload slots; where its chunks are copied.
    protocol_header: bytes | None = None
    upload_slot: bool = False
    upload_buffer: np.ndarray | None = None

    def upload_moved(self, upload: Reassembler, now: float) -> None:
        """`upload` received its header or a chunk at `now` (the progress and total bounds)."""
        if self.upload_watched is not upload:
            self.upload_started_at = now
        self.upload_watched, self.upload_moved_at = upload, now

    def attach_stream(self, cancel: Callable[[], object]) -> None:
        """The servicer's way to end this stream from the hub's side (`context.cancel`): a
        silo that does not read blocks its stream inside gRPC, where no queued item reaches."""
        self.cancel_stream = cancel
        if self.overflow is not None:
            cancel()

    def send(self, item: Item) -> None:
        """Queue `item` for the stream. A closed session takes only the end marker (None)."""
        if item is None:
            self.queue.put_last(None)
            return
        if self.closed:
            return
        if isinstance(item, Blob):
            accepted = self.queue.put(item, len(item.data), blob_bytes=len(item.data))
        elif isinstance(item, Delivered):
            accepted = self.queue.put(item, 0)
        else:
            accepted = self.queue.put(item, item.ByteSize())
        if not accepted:
            self._overflowed()

    def _overflowed(self) -> None:
        """Past the bound: close now, free the queue, end the stream (its end drops the silo
        from the round, like any disconnection; without a stream to cancel, the hub's next tick
        does: `uploads.watch_streams`)."""
        self.overflow = self.queue.overflow
        self.closed = True
        self.queue.put_last(None)
        _overflow_log.warning(
            "outbound queue overflow",
            self.silo_id,
            "%s: %s; dropped from the round and disconnected",
            self.silo_id,
            self.overflow,
        )
        if self.cancel_stream is not None:
            self.cancel_stream()

    def download_stalled(self, why: str) -> None:
        """Its download slot was taken back (downloads.py; any thread): end the stream as an
        overflow does. The hub drops the silo when the stream's end reaches it, or at its next
        tick (`uploads.watch_streams`)."""
        self.stalled = why
        _stalled_log.warning(
            "download stalled", self.silo_id, "%s: %s; disconnected", self.silo_id, why
        )
        self.queue.put_last(None)
        if self.cancel_stream is not None:
            self.cancel_stream()

    def next_messages(self, timeout_s: float) -> Iterable[Outgoing] | None:
        """The next message(s) to send; empty when idle for `timeout_s`; None once closed.

        A blob is expanded lazily, chunk by chunk, as the stream sends it: the model's bytes
        are shared by every silo's queue and never copied whole per silo; they count against
        this queue's bound until the stream has taken them. Its chunks come pre-serialised
        (protos/blobs.py:serialized_chunks), so a chunk waiting in gRPC's send is held once by
        Python, not as a chunk, a message and its serialisation, and not after its send.
        """
        if self.stalled is not None:
            return None
        try:
            item = self.queue.get(timeout_s)
        except queue.Empty:
            return ()
        if item is None:
            return None
        if isinstance(item, Delivered):
            self.on_delivered(self, item.round_id)
            return ()
        if isinstance(item, Blob):
            return self._blob(item)
        self._count_out(item.ByteSize())
        return (item,)

    def _blob(self, blob: Blob) -> Iterator[Outgoing]:
        """The blob's header, then its chunks, each counted as the stream takes it; with
        download slots, only while it holds one (taken before the header, given back once the
        last chunk's send completed: the writer asks for the next message only then)."""
        slots = self.downloads
        try:
            if slots is not None and not self._wait_for_slot(slots, len(blob.data)):
                return
            data = memoryview(blob.data)  # bytes, or a mapped checkpoint: read in place
            meta = describe(data, blob.sha256)
            header = blob_header(round_id=blob.round_id, kind=blob.kind, meta=meta)
            message = pb.CoordinatorMessage(blob_header=header)
            self._count_out(message.ByteSize())
            yield message
            left = len(data)
            for frame in serialized_chunks(
                pb.CoordinatorMessage, round_id=blob.round_id, kind=blob.kind, data=data
            ):
                if slots is not None:  # the previous message's send completed
                    slots.moved(self)
                    if not slots.holds(self):  # taken back: the stream is being ended
                        return
                self._count_out(len(frame))
                taken = min(left, MAX_CHUNK_BYTES)  # every chunk but the last is full
                left -= taken
                self.queue.taken(taken)
                yield Serialized(frame)
                del frame
        finally:  # sent, or the stream ended (its writer stopped, or the generator was closed)
            if slots is not None:
                slots.release(self)

    def _wait_for_slot(self, slots: DownloadSlots, total_bytes: int) -> bool:
        """Wait for a download slot; False when the stream ended first. Bounded: every holder
        gives its slot back in a bounded time (downloads.py), first come first served."""
        while not slots.acquire(self, total_bytes, SLOT_WAIT_S):
            if self.closed or self.stalled is not None or self.overflow is not None:
                return False
        return True

    def _count_out(self, n: int) -> None:
        self.bytes_out += n
        self.round_bytes_out += n

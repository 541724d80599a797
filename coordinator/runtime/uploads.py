"""Uploads from silos: a blob reassembled on the silo's stream, then handed to the round whole.

Rule: what a silo may upload now is the round's answer alone (`RoundKind.status().uploads`, an
`UploadSpec`); any other blob is refused at its header and its chunks are ignored. A vector
(`UploadSpec.buffered`: the masked vector of a secure round) is copied into one of at most
`[secagg] max_concurrent_uploads` buffers, reused within a round and freed at its end
(`release_buffers`), while it holds an upload slot; any other blob is reassembled in memory, up
to the spec's `max_bytes`. A slot is freed when its upload completes, is refused, or stops
moving (`[deadlines] upload_progress_s`, and a total bound at `UPLOAD_MIN_RATE`). The functions
take the hub and run under its lock, except `wait_for_upload_slot` (a silo's reader thread,
before it takes the lock) and `on_chunk`: a chunk is copied and hashed on its stream's reader
thread under that stream's `upload_lock` only (stream.py), so one silo's large upload holds up
neither the other streams nor the driver's tick; the hub's lock is taken once the upload is
complete or broken. Ending an upload takes the stream's `upload_lock` too, so its buffer is
never freed while a chunk is copied into it.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.rounds.kind import MaskedVector, PlaintextUpdate, Reported, UploadSpec
from coordinator.runtime.stream import SiloStream
from protos import federation_pb2 as pb
from secagg.chunking import MAX_CHUNK_BYTES, BlobMeta, ChunkError, Reassembler

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub

log = logging.getLogger("silofed.coordinator")

# The slowest upload a slot waits for (besides [deadlines] upload_progress_s): far below any
# network a cross-silo federation runs on, high enough that a trickle cannot hold a slot.
UPLOAD_MIN_RATE = 1 << 20  # bytes per second
UPLOAD_SLOT_POLL_S = 0.2


# A masked vector this large (or larger) gets one upload buffer by default, not two: the
# coordinator then holds the model, the accumulator and one vector (d = 10^8: 2.6 times the
# model's size instead of 3.6; docs/benchmarks.md), and a vector this size takes long enough to
# receive that a second buffer buys no time.
LARGE_VECTOR_BYTES = 256 << 20


def upload_slots(configured: int | None, vector_bytes: int) -> int:
    """P, the masked vectors buffered at once: `[secagg] max_concurrent_uploads` when set,
    else 2, or 1 for a vector of `LARGE_VECTOR_BYTES` or more."""
    if configured is not None:
        return configured
    return 1 if vector_bytes >= LARGE_VECTOR_BYTES else 2


class Slots:
    """At most P vectors are buffered at once (docs/secagg-protocol.md §5 step 3.8): memory
    stays (P+1)·L words for any number of silos. Other uploads wait: a silo of wire 1.1 or later
    at home, its header in `waiting` until a slot frees and it is sent an UploadGrant (first
    come, first served); an older silo's reader blocks (`wait_for_upload_slot`), its chunks held
    by flow control, which still lets gRPC take in up to one chunk (1 MiB) per waiting silo."""

    def __init__(self, count: int) -> None:
        self.count = count  # P
        self.semaphore = threading.BoundedSemaphore(count)
        self.free: list[np.ndarray] = []  # reused within a round (at most P)
        self.waiting: collections.deque[SiloStream] = collections.deque()  # for a grant

    def take_buffer(self, length: int, dtype: np.dtype[Any]) -> np.ndarray:
        while self.free:
            buffer = self.free.pop()
            if buffer.shape == (length,) and buffer.dtype == dtype:
                return buffer
        return np.empty(length, dtype=dtype)


def release_buffers(hub: Hub) -> None:
    """Free the pooled vector buffers (under the hub's lock): once a round's uploads are over,
    they would hold P model-sized arrays through the aggregation, the checkpoint and the next
    offer; the next masked phase allocates them again."""
    hub.slots.free.clear()
    forget_waiters(hub)


def forget_waiters(hub: Hub) -> None:
    """The round's uploads are over: no waiting header will be granted (under the hub's lock).
    Its silos give up on their own when the round ends (protos: UploadGrant)."""
    for session in hub.slots.waiting:
        session.awaiting_grant = None
    hub.slots.waiting.clear()


def upload_spec(hub: Hub, session: SiloStream) -> tuple[UploadSpec | None, str]:
    """What `session`'s silo may upload now; else None and why not."""
    if session.closed or hub.stopping.is_set():
        return None, "its stream is closing"
    if hub.round is None:
        return None, "no round is running"
    st = hub.round.status()
    spec = st.uploads.get(session.silo_id)
    if spec is None:
        return None, f"round {st.round_id}, in phase {st.phase}, waits for no upload from it"
    return spec, ""


def on_report(hub: Hub, session: SiloStream, report: pb.TrainReport) -> None:
    taken = hub.on_frame(
        session.silo_id,
        Reported(report.round_id, report.num_examples, report.update_sha256, dict(report.metrics)),
    )
    if taken and session.upload_buffer is None:
        with session.upload_lock:
            session.upload = None  # a report announces the blob to come: one in progress is void


def wait_for_upload_slot(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> None:
    """Block this silo's reader until a buffered-upload slot frees, for a vector the round
    waits for from this silo only: anything else (or a header without its protocol header)
    returns at once, without a slot, and `on_blob_header` refuses it. The wait ends with the
    phase (its deadline)."""
    if header.kind != pb.MASKED_VECTOR or not header.protocol_header or session.upload_grants:
        return  # a silo that waits for a grant never blocks its reader (`_take_slot`)
    with hub.lock:
        while not session.upload_slot:
            spec, _ = upload_spec(hub, session)
            if spec is None or not spec.buffered:
                return
            if hub.slots.semaphore.acquire(blocking=False):
                session.upload_slot = True
                return
            # `end_upload` notifies when it frees a slot; the poll bounds a missed wake-up.
            hub.clock.wait(hub.changed, UPLOAD_SLOT_POLL_S)


def end_upload(hub: Hub, session: SiloStream) -> None:
    """End the session's upload, if any, and give back its slot and buffer (the vector was
    added or refused, or the stream ended). Under the hub's lock; it waits for a chunk being
    copied into the buffer (`on_chunk`), so the buffer is free once it is back in the pool."""
    with session.upload_lock:
        session.upload, session.upload_watched, session.protocol_header = None, None, None
        buffer, session.upload_buffer = session.upload_buffer, None
        slot, session.upload_slot = session.upload_slot, False
    if session.awaiting_grant is not None:
        session.awaiting_grant = None
        hub.slots.waiting.remove(session)
    if buffer is not None:
        hub.slots.free.append(buffer)
    if slot:
        hub.slots.semaphore.release()
        with hub.lock:  # a reader may wait for the slot (`wait_for_upload_slot`)
            hub.changed.notify_all()
            _grant_next(hub)


def _grant_next(hub: Hub) -> None:
    """Slots are free: grant them to the silos waiting for one, first come first served
    (under the hub's lock). A header the round no longer waits for is dropped unanswered: its
    round is over or the silo is out of it, and the silo gives up on its own."""
    while hub.slots.waiting and hub.round is not None:
        session = hub.slots.waiting[0]
        header = session.awaiting_grant
        spec, _ = upload_spec(hub, session)
        if (
            header is None
            or spec is None
            or not spec.buffered
            or header.round_id != hub.round.round_id
        ):
            hub.slots.waiting.popleft()
            session.awaiting_grant = None
            continue
        if not hub.slots.semaphore.acquire(blocking=False):
            return
        hub.slots.waiting.popleft()
        session.awaiting_grant = None
        session.upload_slot = True
        on_blob_header(hub, session, header)  # sets the upload up and grants it, or refuses it


def _take_slot(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> bool:
    """A slot for a silo that waits for grants (under the hub's lock): True when it has one
    now; else its header waits in line (`_grant_next`). Without grants the reader already
    waited for it (`wait_for_upload_slot`): False means the stream or the coordinator stops."""
    if not session.upload_grants:
        return False
    if hub.slots.semaphore.acquire(blocking=False):
        session.upload_slot = True
        return True
    session.awaiting_grant = header
    hub.slots.waiting.append(session)
    return False


def cancel_upload(hub: Hub, session: SiloStream) -> None:
    """Whatever the session was uploading is void (`end_upload`)."""
    end_upload(hub, session)


def on_blob_header(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> None:
    if session.upload is not None or session.awaiting_grant is not None:
        # Never honest, and a slot given back this way would let its silo queue again and
        # hold a slot once more per turn: the silo is out of the round.
        cancel_upload(hub, session)
        hub.reject(session, "a blob header arrived before its upload was complete")
        return
    spec, why = upload_spec(hub, session)
    vector = header.kind == pb.MASKED_VECTOR
    if hub.round is None or spec is None or spec.buffered != vector:
        _refuse(hub, session, header, why or "the round waits for another kind of upload")
    elif header.round_id != hub.round.round_id and not vector:
        _refuse(hub, session, header, why)  # a late blob of an earlier round
    elif vector:
        _vector_header(hub, session, header, spec, hub.round.round_id)
    elif header.kind != pb.PLAINTEXT_UPDATE or spec.sha256 not in (None, header.sha256):
        hub.reject(session, "update blob does not match its train report")
    else:
        try:
            meta = _blob_meta(session, header)
            upload = Reassembler(meta, max_total_bytes=spec.max_bytes)
        except ChunkError as exc:
            hub.reject(session, f"bad update header: {exc}")
        else:
            with session.upload_lock:
                session.upload = upload


def _refuse(hub: Hub, session: SiloStream, header: pb.BlobHeader, why: str) -> None:
    """Not an upload the round waits for: no slot, no buffer; its chunks are ignored, and
    whatever the silo was uploading is void (nothing waits for it)."""
    cancel_upload(hub, session)
    silo_id = session.silo_id
    if header.kind == pb.MASKED_VECTOR:
        hub.peer_log.warning(
            "masked vector refused",
            silo_id,
            "refused a masked vector from %s for round %d: %s",
            silo_id,
            header.round_id,
            why,
        )
    else:
        hub.peer_log.info(
            "stray blob", silo_id, "ignoring blob from %s for round %d", silo_id, header.round_id
        )


def _vector_header(
    hub: Hub, session: SiloStream, header: pb.BlobHeader, spec: UploadSpec, round_id: int
) -> None:
    exact, length, dtype = spec.exact_bytes, spec.length, spec.dtype
    assert exact is not None and length is not None and dtype is not None  # spec.buffered
    meta, bad_meta = _vector_meta(session, header, exact)
    if not header.protocol_header:
        why = "masked vector header without its protocol_header"
    elif header.round_id != round_id:
        why = f"masked vector for round {header.round_id} during round {round_id}"
    elif meta is None:  # checked before it waits in line: a grant is never refused
        why = f"bad masked vector header: {bad_meta}"
    elif not session.upload_slot and not _take_slot(hub, session, header):
        return  # waits for a grant; or the stream or the coordinator is stopping
    else:
        try:
            buffer = hub.slots.take_buffer(length, dtype)
            with session.upload_lock:
                session.upload_buffer = buffer
            upload = Reassembler(meta, max_total_bytes=exact, into=buffer.data)
        except ChunkError as exc:
            why = f"bad masked vector header: {exc}"
        else:
            with session.upload_lock:
                session.upload = upload
                # Opaque here: the round checks it (signature, session, length, digest).
                session.protocol_header = bytes(header.protocol_header)
                # The slot is held from here: the progress watch (`watch_streams`) frees it
                # when chunks stop arriving.
                session.upload_moved(upload, hub.clock.now())
            if session.upload_grants:
                grant = pb.UploadGrant(round_id=round_id, kind=header.kind)
                session.send(pb.CoordinatorMessage(upload_grant=grant))
            return
    cancel_upload(hub, session)
    hub.reject(session, why)


def _blob_meta(session: SiloStream, header: pb.BlobHeader) -> BlobMeta:
    """What `header` announces, its chunks of the size `session`'s silo cuts uploads into.
    Raises ChunkError when the header does not add up."""
    chunk_bytes = session.upload_chunk_bytes or MAX_CHUNK_BYTES
    return BlobMeta(header.total_bytes, header.sha256, header.chunk_count, chunk_bytes)


def _vector_meta(
    session: SiloStream, header: pb.BlobHeader, exact: int
) -> tuple[BlobMeta | None, str]:
    """The header's blob description if it is a masked vector of `exact` bytes; else why not."""
    try:
        meta = _blob_meta(session, header)
    except ChunkError as exc:
        return None, str(exc)
    if meta.total_bytes != exact:
        return None, f"a masked vector has {exact} bytes, the header says {meta.total_bytes}"
    return meta, ""


def watch_streams(hub: Hub, now: float) -> None:
    """Every tick: take the download slots back from streams that stopped taking the model
    (downloads.py), drop the silos whose outbound queue overflowed or whose download stalled
    (they do not read) like disconnected ones, and the uploads that received no chunk for
    [deadlines] upload_progress_s (the silo drops out of the round; its slot and buffer are
    freed)."""
    limit = hub.config.deadlines.upload_progress_s
    hub.downloads.evict_stalled()
    for s in list(hub.sessions.values()):
        if s.overflow is not None:  # logged when it happened (SiloStream._overflowed)
            hub.on_disconnect(s, f"outbound queue overflow: {s.overflow}")
            continue
        if s.stalled is not None:  # logged when it happened (SiloStream.download_stalled)
            hub.on_disconnect(s, s.stalled)
            continue
        # Its reader holds the lock while it adds a chunk (`on_chunk`): the upload moves right
        # now, and the tick does not wait for the copy.
        if not s.upload_lock.acquire(blocking=False):
            continue
        try:
            upload = s.upload
            if upload is None:
                continue
            if upload is not s.upload_watched:  # an update whose header just arrived
                s.upload_moved(upload, now)
                continue
            idle, held = now - s.upload_moved_at, now - s.upload_started_at
        finally:
            s.upload_lock.release()
        # A slot is also bounded in total: a chunk every (limit - 1) s must not hold it for
        # the whole phase. Allowed: the progress limit plus the size at UPLOAD_MIN_RATE.
        allowed = limit + upload.meta.total_bytes / UPLOAD_MIN_RATE
        if held >= allowed:
            cancel_upload(hub, s)
            hub.reject(
                s,
                f"upload too slow: {held:.1f} s for {upload.meta.total_bytes} bytes (at most "
                f"[deadlines] upload_progress_s = {limit:g} s plus "
                f"{UPLOAD_MIN_RATE / 2**20:g} MiB/s); its upload slot is freed",
            )
        elif idle >= limit:
            cancel_upload(hub, s)
            hub.reject(
                s,
                f"upload stalled: no chunk for {idle:.1f} s ([deadlines] upload_progress_s "
                f"= {limit:g}); its upload slot is freed",
            )


def on_chunk(hub: Hub, session: SiloStream, chunk: pb.BlobChunk, size: int) -> None:
    """One chunk of `size` message bytes, on the stream's reader thread WITHOUT the hub's lock:
    the copy into the reassembly buffer and the hashing hold only the stream's `upload_lock`
    (the hub cannot end the upload and free its buffer meanwhile). The hub's lock is taken only
    when the upload is complete, or broken (`_upload_ended`)."""
    with session.upload_lock:
        session.bytes_in += size
        session.round_bytes_in += size
        upload = session.upload
        if upload is None:
            return  # a blob we decided to ignore
        error, data = "", None
        try:
            upload.add(chunk.index, chunk.data)
            session.upload_moved(upload, hub.clock.now())  # it moves
            if not upload.complete:
                return
            # The checks (size, SHA-256) and a plaintext blob's join: still off the hub's lock.
            data = upload.finish() if session.upload_buffer is None else upload.finish_into()
        except ChunkError as exc:
            error = f"bad update chunk: {exc}"
    with hub.lock:
        _upload_ended(hub, session, upload, chunk.round_id, data, error)


def _upload_ended(
    hub: Hub,
    session: SiloStream,
    upload: Reassembler,
    round_id: int,
    data: bytes | memoryview | None,
    error: str,
) -> None:
    """`upload` is complete (`data`) or broken (`error`): hand it to the round, or drop the
    silo. Under the hub's lock; a no-op if the hub ended the upload since its last chunk."""
    with session.upload_lock:
        if session.upload is not upload:
            return  # ended meanwhile (stalled, a new round, stream replaced): dealt with
        vector, header = session.upload_buffer, session.protocol_header
        session.upload = None
    if error:
        cancel_upload(hub, session)
        hub.reject(session, error)
        return
    if vector is None:
        assert isinstance(data, bytes)
        hub.on_upload(session.silo_id, PlaintextUpdate(round_id, data, upload.sha256))
        return
    try:
        # The transport hashed exactly these bytes as they arrived: no second pass.
        masked = MaskedVector(round_id, header or b"", vector, upload.sha256)
        hub.on_upload(session.silo_id, masked)
    finally:
        end_upload(hub, session)  # added into the accumulator (or refused): reused

"""Uploads from silos: the plaintext update of a round and the masked vectors of a secure one.

Rule: at most `[server] max_concurrent_uploads` masked vectors are buffered at once (slots);
their buffers are reused round after round, and a slot is freed when its upload completes, is
refused, or stops moving (`[deadlines] upload_progress_s`, and a total bound at
`UPLOAD_MIN_RATE`). The functions take the hub and run under its lock, except
`wait_for_upload_slot` (a silo's reader thread, before it takes the lock).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.rounds.fedavg import AggregationError
from coordinator.rounds.phases import OFFER_PHASE
from coordinator.runtime.stream import SiloStream
from protos import federation_pb2 as pb
from secagg.chunking import BlobMeta, ChunkError, Reassembler
from secagg.coordinator import Phase as SecAggPhase
from secagg.primitives import ring_dtype
from silofed.tensors import StateDecodeError, state_from_bytes

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub

log = logging.getLogger("silofed.coordinator")

# The slowest upload a slot waits for (besides [deadlines] upload_progress_s): far below any
# network a cross-silo federation runs on, high enough that a trickle cannot hold a slot.
UPLOAD_MIN_RATE = 1 << 20  # bytes per second
UPLOAD_SLOT_POLL_S = 0.2


def current_phase(hub: Hub, session: SiloStream, round_id: int) -> bool:
    m = hub.machine
    return m is not None and m.expects(session.silo_id, round_id, "train")


def on_report(hub: Hub, session: SiloStream, report: pb.TrainReport) -> None:
    sr = hub.secure
    if sr is not None:
        # Under secagg a report carries evaluation metrics only (plaintext by design: they
        # are the silo's score of the global model it received, not its update).
        if report.round_id == sr.config.round_id and session.silo_id in sr.config.invited:
            session.metrics = dict(report.metrics)
        return
    m = hub.machine
    if m is not None and m.expects(session.silo_id, report.round_id, OFFER_PHASE):
        # A report proves the model arrived, even if the stream's delivery marker has not
        # been processed yet.
        hub.apply(m.done(session.silo_id, report.round_id, OFFER_PHASE, hub.clock.now())[1])
    if not current_phase(hub, session, report.round_id):
        hub.peer_log.info(
            "stray report",
            session.silo_id,
            "ignoring late or stray report from %s for round %d",
            session.silo_id,
            report.round_id,
        )
        return
    session.report = report
    session.upload = None


def wait_for_upload_slot(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> None:
    """Block this silo's reader until a buffered-upload slot frees, for a silo the masked
    phase waits for only: anyone else (or a header without its protocol header) returns at
    once, without a slot, and `on_masked_header` refuses its vector. The wait ends with
    the phase (its deadline)."""
    with hub.lock:
        while True:
            if (
                session.upload_slot
                or not header.protocol_header
                or upload_refusal(hub, session) is not None
            ):
                return
            if hub.upload_slots.acquire(blocking=False):
                session.upload_slot = True
                return
            # `end_upload` notifies when it frees a slot; the poll bounds a missed wake-up.
            hub.clock.wait(hub.changed, UPLOAD_SLOT_POLL_S)


def upload_refusal(hub: Hub, session: SiloStream) -> str | None:
    """Why `session` may not upload a masked vector now; None when the masked phase of the
    current round waits for its vector (it is in U2, not dropped, not uploaded yet)."""
    sr = hub.secure
    if session.closed or hub.stopping.is_set():
        return "its stream is closing"
    if sr is None:
        return "no secure round is running"
    if sr.round.phase is not SecAggPhase.MASKED:
        return f"round {sr.config.round_id} is in phase {sr.phase_name}, not masked"
    if session.silo_id not in sr.round.waiting_for():
        return (
            f"round {sr.config.round_id} waits for no masked vector from it (not in U2, "
            "dropped, or already uploaded)"
        )
    return None


def end_upload(hub: Hub, session: SiloStream) -> None:
    """Give back the session's upload slot and buffer (the vector was added or refused)."""
    session.upload_watched, session.masked_header = None, None
    if session.upload_buffer is not None:
        hub.free_buffers.append(session.upload_buffer)
        session.upload_buffer = None
    if session.upload_slot:
        session.upload_slot = False
        hub.upload_slots.release()
        with hub.lock:  # a reader may wait for the slot (`wait_for_upload_slot`)
            hub.changed.notify_all()


def on_masked_header(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> None:
    sr = hub.secure
    refusal = upload_refusal(hub, session)
    if sr is None or refusal is not None:
        # Not an upload this round waits for: no slot, no buffer; its chunks are ignored.
        hub.peer_log.warning(
            "masked vector refused",
            session.silo_id,
            "refused a masked vector from %s for round %d: %s",
            session.silo_id,
            header.round_id,
            refusal or "no secure round is running",
        )
        cancel_upload(hub, session)  # whatever it was uploading, nothing waits for it
        return
    if not header.protocol_header:
        cancel_upload(hub, session)
        hub.reject(session, "masked vector header without its protocol_header")
        return
    if session.upload is not None:
        cancel_upload(hub, session)
        hub.reject(session, "a second masked vector began before the first was complete")
        return
    if header.round_id != sr.config.round_id:
        cancel_upload(hub, session)
        hub.reject(
            session,
            f"masked vector for round {header.round_id} during round {sr.config.round_id}",
        )
        return
    if not session.upload_slot:  # the stream or the coordinator is stopping
        return
    dtype = ring_dtype(sr.config.ring_bits)
    try:
        meta = BlobMeta(header.total_bytes, header.sha256, header.chunk_count)
        limit = sr.config.length * dtype.itemsize
        if meta.total_bytes != limit:
            raise ChunkError(
                f"a masked vector has {limit} bytes, the header says {meta.total_bytes}"
            )
        buffer = take_buffer(hub, sr.config.length, dtype)
        session.upload_buffer = buffer
        session.upload = Reassembler(meta, max_total_bytes=limit, into=buffer.data)
        # Opaque here: secagg checks it (signature, session, length, digest) with the vector.
        session.masked_header = bytes(header.protocol_header)
    except ChunkError as exc:
        cancel_upload(hub, session)
        hub.reject(session, f"bad masked vector header: {exc}")
        return
    # The slot is held from here: the progress watch (`watch_streams`) frees it when
    # chunks stop arriving.
    if session.upload is not None:
        session.upload_moved(session.upload, hub.clock.now())


def cancel_upload(hub: Hub, session: SiloStream) -> None:
    session.upload = None
    end_upload(hub, session)


def watch_streams(hub: Hub, now: float) -> None:
    """Every tick: drop the silos whose outbound queue overflowed (they do not read) like
    disconnected ones, and the uploads that received no chunk for [deadlines]
    upload_progress_s (the silo drops out of the round; its slot and buffer are freed)."""
    limit = hub.config.deadlines.upload_progress_s
    for s in list(hub.sessions.values()):
        if s.overflow is not None:  # logged when it happened (SiloStream._overflowed)
            hub.on_disconnect(s, f"outbound queue overflow: {s.overflow}")
            continue
        upload = s.upload
        if upload is None:
            continue
        if upload is not s.upload_watched:  # an update whose header just arrived
            s.upload_moved(upload, now)
            continue
        idle = now - s.upload_moved_at
        # A slot is also bounded in total: a chunk every (limit - 1) s must not hold it for
        # the whole phase. Allowed: the progress limit plus the size at UPLOAD_MIN_RATE.
        allowed = limit + upload.meta.total_bytes / UPLOAD_MIN_RATE
        held = now - s.upload_started_at
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


def take_buffer(hub: Hub, length: int, dtype: np.dtype[Any]) -> np.ndarray:
    while hub.free_buffers:
        buffer = hub.free_buffers.pop()
        if buffer.shape == (length,) and buffer.dtype == dtype:
            return buffer
    return np.empty(length, dtype=dtype)


def on_masked_vector(hub: Hub, session: SiloStream, sha256: bytes) -> None:
    sr, masked_header, vector = hub.secure, session.masked_header, session.upload_buffer
    session.masked_header = None
    try:
        if sr is None or masked_header is None or vector is None:
            return
        # The transport hashed exactly these bytes as they arrived: no second pass.
        step = sr.masked_vector(
            session.silo_id, masked_header, vector, hub.clock.now(), vector_sha256=sha256
        )
    finally:
        end_upload(hub, session)  # added into the accumulator (or refused): reused
    hub.apply_secure(step)


def on_blob_header(hub: Hub, session: SiloStream, header: pb.BlobHeader) -> None:
    if header.kind == pb.MASKED_VECTOR:
        on_masked_header(hub, session, header)
        return
    report = session.report
    if report is None or not current_phase(hub, session, header.round_id):
        hub.peer_log.info(
            "stray blob",
            session.silo_id,
            "ignoring blob from %s for round %d",
            session.silo_id,
            header.round_id,
        )
        session.upload = None
        return
    if header.kind != pb.PLAINTEXT_UPDATE or header.sha256 != report.update_sha256:
        hub.reject(session, "update blob does not match its train report")
        return
    try:
        meta = BlobMeta(header.total_bytes, header.sha256, header.chunk_count)
        limit = 2 * hub.model_len + (1 << 20)
        session.upload = Reassembler(meta, max_total_bytes=limit)
    except ChunkError as exc:
        hub.reject(session, f"bad update header: {exc}")


def on_chunk(hub: Hub, session: SiloStream, chunk: pb.BlobChunk) -> None:
    upload = session.upload
    if upload is None:
        return  # a blob we decided to ignore
    masked = session.upload_buffer is not None
    try:
        upload.add(chunk.index, chunk.data)
        session.upload_moved(upload, hub.clock.now())  # it moves
        if not upload.complete:
            return
        data = upload.finish_into() if masked else upload.finish()
    except ChunkError as exc:
        cancel_upload(hub, session)
        hub.reject(session, f"bad update chunk: {exc}")
        return
    session.upload = None
    if masked:
        on_masked_vector(hub, session, upload.sha256)
    else:
        assert isinstance(data, bytes)
        on_update(hub, session, chunk.round_id, data)


def on_update(hub: Hub, session: SiloStream, round_id: int, data: bytes) -> None:
    m, agg, report = hub.machine, hub.aggregation, session.report
    if m is None or agg is None or report is None or not current_phase(hub, session, round_id):
        return
    try:
        update = state_from_bytes(data)
        # Checked whole before any of it is added (aggregation.check_update): a refused
        # update drops this silo from the round (INVALID) and leaves the accumulator as it was.
        agg.contribute(session.silo_id, int(report.num_examples), update)
    except (AggregationError, StateDecodeError) as exc:
        hub.reject(session, f"update refused: {exc}")
        return
    session.metrics = dict(report.metrics)
    _, events = m.done(session.silo_id, round_id, "train", hub.clock.now())
    hub.apply(events)

"""The silo's ledger (`<state_dir>/ledger.jsonl`): every round message that left the site.

Rule: this module is the one writer of the ledger file and states its format;
`ledger_verify.py` is its one reader, and the comparison with the coordinator's export.

What is recorded, and when: `SentLedger.on_sent` is the stream's (`connection.Link`) callback,
called once per item after gRPC has taken it — a message once its send completed, a blob once
its header and every chunk were sent. So a line is the record of something that left, never of
something queued: a message still in the queue when the stream broke or the process stopped is
not listed. Hello is not round data and is not recorded.

Format 2 (written now): one JSON object per sent message, sorted keys: `format` (2), `round_id`
(the id the message carried), `at` (unix s), `message` (e.g. `TrainReport`,
`SecAggFrame(UnmaskShares)`, `Blob(MASKED_VECTOR)`), `bytes` and `sha256` (of the protobuf
message in its deterministic serialization; of the payload for a SecAggFrame; of the whole blob
for a blob), `aggregation` and `model_in_sha256` (from the round offer the silo took), and the
message's details (`_describe`; docs/auditing.md lists them). Format 1 (one line per upload,
written by silofed before this) reads as the one update blob it described; its other messages
were not recorded.
Lines are only appended, so a crash can at worst leave a torn last line, which
`ledger_verify.read_ledger` reports with its line number instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos import federation_pb2 as pb
from protos.names import EVALUATE, abort_name
from secagg.chunking import chunk_count_for
from secagg.messages import (
    AbortNotice,
    Advertise,
    Consistency,
    MaskedHeader,
    Message,
    ShareKeys,
    SignedEnvelope,
    UnmaskShares,
    decode_message,
)
from silo_agent.transport.connection import OutBlob

log = logging.getLogger("silofed.silo")

LEDGER_FILENAME = "ledger.jsonl"
FORMAT = 2
# Lines with round id 0 record events of the silo that belong to no round (RosterAdopted);
# round ids start at 1, so `verify` does not compare them with the export.
NO_ROUND = 0
# The recorded aggregation of the final evaluation (silo_agent/runtime/final_model.py): not a
# round of its own, it reuses the last completed round's id to evaluate the model that round
# produced.
FINAL_EVALUATION = EVALUATE
# How many rounds' offers and index maps are kept for labelling late messages (a TrainReport
# can leave after its round was aborted); older rounds' lines carry null there.
KEEP_ROUNDS = 16


# ---- recording -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Round:
    aggregation: str | None = None
    model_in_sha256: str | None = None
    indices: dict[int, str] = field(default_factory=dict)


class SentLedger:
    """Appends one line per sent round message. Thread-safe: `on_sent` runs on gRPC's sending
    thread, `note_round` and `note_indices` on the runner's.

    Each line is one write(2) with O_APPEND, not fsync'd: the line is written after its message
    left, so no ordering with the send is gained by waiting for the disk, and fsync on gRPC's
    sending thread would hold the stream for every frame. A process crash loses nothing that was
    written (the kernel has it); only a machine crash can lose the last lines, and `ledger verify`
    then names the round the coordinator counts but the ledger lacks."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._rounds: OrderedDict[int, _Round] = OrderedDict()

    def note_round(self, round_id: int, aggregation: str, model_in_sha256: bytes | str) -> None:
        """The silo took round `round_id`'s offer: its lines carry these from now on."""
        digest = model_in_sha256 if isinstance(model_in_sha256, str) else model_in_sha256.hex()
        with self._lock:
            r = self._round(round_id)
            r.aggregation, r.model_in_sha256 = aggregation, digest

    def note_indices(self, round_id: int, indices: Mapping[int, str]) -> None:
        """The round's secagg indices (index -> silo id), known once the key list was accepted;
        share lists are then recorded by silo id rather than by index."""
        with self._lock:
            self._round(round_id).indices = dict(indices)

    def on_sent(self, item: pb.SiloMessage | OutBlob) -> None:
        """The Link's callback. Never raises: recording must not break the stream."""
        try:
            with self._lock:
                line = self._line(item)
                if line is not None:
                    self._append(line)
        except Exception:  # noqa: BLE001 - a ledger fault must not stop the silo; it is logged
            log.exception("could not record a sent message in %s", self.path)

    def _round(self, round_id: int) -> _Round:
        r = self._rounds.get(round_id)
        if r is None:
            r = self._rounds[round_id] = _Round()
            while len(self._rounds) > KEEP_ROUNDS:
                self._rounds.popitem(last=False)
        return r

    def _line(self, item: pb.SiloMessage | OutBlob) -> dict[str, Any] | None:
        described = _describe(item, self._rounds)
        if described is None:
            return None
        round_id, message, size, sha256, details = described
        r = self._rounds.get(round_id, _Round())
        return {
            **details,
            "format": FORMAT,
            "round_id": round_id,
            "at": self._clock(),
            "message": message,
            "bytes": size,
            "sha256": sha256,
            "aggregation": r.aggregation,
            "model_in_sha256": r.model_in_sha256,
        }

    def _append(self, line: Mapping[str, Any]) -> None:
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A line torn by an earlier crash stays one bad line (read_ledger names it), never
            # two: the next line starts on a line of its own.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            os.write(fd, data)  # one write: a crash leaves whole lines or one torn last line
        finally:
            os.close(fd)


def record_roster_adopted(
    path: Path, *, at: float, roster_json: bytes, details: Mapping[str, Any]
) -> None:
    """Append the line that records this silo adopting a new roster (silo_agent.pki.roster_update).

    Not a round message, so `round_id` is NO_ROUND (0) and aggregation and model
    are null; `bytes` and `sha256` are those of the adopted roster file, and `details` (versions,
    digests, the silos added, changed and removed) are the line's other fields. One O_APPEND
    write, fsync'd: the roster file was already replaced, so the record must not be lost."""
    line = {
        **details,
        "format": FORMAT,
        "round_id": NO_ROUND,
        "at": at,
        "message": "RosterAdopted",
        "bytes": len(roster_json),
        "sha256": hashlib.sha256(roster_json).hexdigest(),
        "aggregation": None,
        "model_in_sha256": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_Described = tuple[int, str, int, str, dict[str, Any]]


def _describe(item: pb.SiloMessage | OutBlob, rounds: Mapping[int, _Round]) -> _Described | None:
    """(round id, message name, bytes, sha256 hex, details), or None for Hello."""
    if isinstance(item, OutBlob):
        size = memoryview(item.data).nbytes
        # The Link fills in the digest it put in the blob header; hashing is the fallback.
        digest = item.sha256 if item.sha256 is not None else hashlib.sha256(item.data).digest()
        name = f"Blob({_blob_kind(item.kind)})"
        chunks = item.chunk_count if item.chunk_count is not None else chunk_count_for(size)
        details: dict[str, Any] = {"chunks": chunks}
        if item.protocol_header:  # a masked vector: what its signed header states, and its digest
            r = rounds.get(item.round_id)
            header_name, header_details = _secagg(
                item.protocol_header, {} if r is None else r.indices
            )
            details["protocol_header"] = {
                **header_details,
                "message": header_name,
                "bytes": len(item.protocol_header),
                "sha256": hashlib.sha256(item.protocol_header).hexdigest(),
            }
        return item.round_id, name, size, digest.hex(), details
    kind = item.WhichOneof("kind")
    if kind == "train_report":
        report = item.train_report
        details = {
            "metrics": sorted(report.metrics),
            "num_examples": report.num_examples,
            "update_sha256": report.update_sha256.hex() or None,
        }
        return _proto(report.round_id, "TrainReport", report, details)
    if kind == "abort":
        notice = item.abort
        # The code's name, as the ledger always recorded it ("DECLINED"); the wire carries a number.
        details = {"reason": abort_name(notice.code), "detail": notice.detail}
        return _proto(notice.round_id, "AbortNotice", notice, details)
    if kind == "secagg":
        frame = item.secagg
        r = rounds.get(frame.round_id)
        name, details = _secagg(frame.payload, {} if r is None else r.indices)
        payload_sha = hashlib.sha256(frame.payload).hexdigest()
        return frame.round_id, f"SecAggFrame({name})", len(frame.payload), payload_sha, details
    if kind == "blob_header":  # the Link sends blobs as OutBlob; a raw one is still recorded
        header = item.blob_header
        name = f"BlobHeader({_blob_kind(header.kind)})"
        extra = {"total_bytes": header.total_bytes}
        return _proto(header.round_id, name, header, extra)
    if kind == "blob_chunk":
        chunk = item.blob_chunk
        name = f"BlobChunk({_blob_kind(chunk.kind)})"
        return _proto(chunk.round_id, name, chunk, {"index": chunk.index})
    return None  # hello: not round data


def _proto(round_id: int, name: str, message: Any, details: dict[str, Any]) -> _Described:
    # Deterministic serialization (map keys sorted), so a receiver that re-serializes the parsed
    # message gets the same bytes and digest.
    raw: bytes = message.SerializeToString(deterministic=True)
    return round_id, name, len(raw), hashlib.sha256(raw).hexdigest(), details


def _blob_kind(kind: int) -> str:
    try:
        return pb.BlobKind.Name(kind)  # type: ignore[arg-type]
    except ValueError:
        return str(kind)


def _secagg(payload: bytes, indices: Mapping[int, str]) -> tuple[str, dict[str, Any]]:
    """The secagg message's name and details; "undecodable" for anything that does not parse."""
    try:
        message: Message = decode_message(payload)
        signed = isinstance(message, SignedEnvelope)
        if isinstance(message, SignedEnvelope):  # Advertise, ShareKeys, Consistency: signed
            message = decode_message(message.payload)
        details = _secagg_details(message, indices)
    except Exception as exc:  # noqa: BLE001 - whatever it was, it left; record its size and digest
        return "undecodable", {"error": f"{type(exc).__name__}: {exc}"}
    if signed:
        details["signed"] = True
    return type(message).__name__, details


def _secagg_details(m: Message, indices: Mapping[int, str]) -> dict[str, Any]:
    def who(index: int) -> str | int:
        return indices.get(index, index)  # the index itself while the mapping is unknown

    match m:
        case Advertise():
            return {
                "signed_round_id": m.round_id,
                "config_digest": m.config_digest.hex(),
                "advertised_silo_id": m.silo_id,
            }
        case ShareKeys():
            return {
                "session_id": m.session_id.hex(),
                "index": m.index,
                "encrypted_shares_for": [who(v) for v, _ in m.cts],
            }
        case MaskedHeader():
            return {
                "session_id": m.session_id.hex(),
                "index": m.index,
                "length": m.length,
                "vector_sha256": m.vector_sha256.hex(),
                # Element 0 as sent: masked by the self-mask only, so once the seed is released
                # the coordinator decodes this silo's weight from it (docs/secagg-protocol.md §2.5).
                "weight_element": m.weight_element,
                "weight_scale": m.weight_scale,
                "uniform_weighting": m.uniform,
            }
        case Consistency():
            return {"session_id": m.session_id.hex(), "index": m.index, "digest": m.digest.hex()}
        case UnmaskShares():
            return {
                "session_id": m.session_id.hex(),
                "index": m.index,
                "b_shares_for": [who(v) for v, _ in m.b_shares],
                "s_shares_for": [who(v) for v, _ in m.s_shares],
            }
        case AbortNotice():
            return {"session_id": m.session_id.hex(), "reason": m.reason.name}
    return {}

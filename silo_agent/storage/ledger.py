"""The silo's ledger (`<state_dir>/ledger.jsonl`): every round message that left the site.

Rule: this module is the one reader and writer of the ledger file, and `verify` is a pure
comparison of ledger entries with the coordinator's `rounds export --format json` document.

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
Lines are only appended, so a crash can at worst leave a torn last line, which `read_ledger`
reports with its line number instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos import federation_pb2 as pb
from protos.names import EVALUATE, SECAGG
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
UPDATE_BLOBS = ("Blob(MASKED_VECTOR)", "Blob(PLAINTEXT_UPDATE)")
# Lines with round id 0 record events of the silo that belong to no round (RosterAdopted);
# round ids start at 1, so `verify` does not compare them with the export.
NO_ROUND = 0
# The recorded aggregation of the final evaluation (silo_agent/runtime/final_model.py): not a round
# of its
# own, it reuses the last completed round's id to evaluate the model that round produced.
FINAL_EVALUATION = EVALUATE
# How many rounds' offers and index maps are kept for labelling late messages (a TrainReport
# can leave after its round was aborted); older rounds' lines carry null there.
KEEP_ROUNDS = 16
# The fields every line has; everything else on a line is a detail of its message.
_BASE = ("format", "round_id", "at", "message", "bytes", "sha256", "aggregation", "model_in_sha256")
# Which participant set of the coordinator's export needs which messages from this silo.
_SET_NEEDS = {
    "U1": ("SecAggFrame(Advertise)",),
    "U2": ("SecAggFrame(ShareKeys)",),
    # The masked vector's blob carries its signed MaskedHeader (older ledgers also list the
    # header as a SecAggFrame of its own; the blob is what proves the upload either way).
    "U3": ("Blob(MASKED_VECTOR)",),
    "U4": ("SecAggFrame(Consistency)",),
    "U5": ("SecAggFrame(UnmaskShares)",),
}


class LedgerError(Exception):
    """The ledger or an export cannot be read; str() names the file, line and what to do."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One message that left the site (format 1 lines read as their update blob)."""

    round_id: int
    at: float
    message: str
    size: int  # "bytes" on the line
    sha256: str
    aggregation: str | None = None
    model_in_sha256: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def is_update(self) -> bool:
        return self.message in UPDATE_BLOBS

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.details,
            "format": self.format,
            "round_id": self.round_id,
            "at": self.at,
            "message": self.message,
            "bytes": self.size,
            "sha256": self.sha256,
            "aggregation": self.aggregation,
            "model_in_sha256": self.model_in_sha256,
        }


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One disagreement between the ledger and the coordinator's export."""

    round_id: int
    field: str
    ledger: object
    coordinator: object
    explanation: str

    def __str__(self) -> str:
        return (
            f"round {self.round_id}: {self.field} differs — ledger {self.ledger!r}, "
            f"coordinator {self.coordinator!r} ({self.explanation})"
        )


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
        details: dict[str, Any] = {"chunks": chunk_count_for(size)}
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
        details = {"reason": notice.reason, "detail": notice.detail}
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


# ---- reading -------------------------------------------------------------------------------


def _need(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LedgerError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise LedgerError(f"{where}: field {key!r} must be a string or null, got {value!r}")
    return value


def _at(obj: Mapping[str, Any], where: str) -> float:
    at = obj.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise LedgerError(f"{where}: field 'at' must be a number, got {at!r}")
    return float(at)


def _entry(obj: object, where: str) -> LedgerEntry:
    if not isinstance(obj, dict):
        raise LedgerError(f"{where}: expected a JSON object")
    version = obj.get("format", 1)
    if version == 1:
        return _format1(obj, where)
    if version != FORMAT:
        raise LedgerError(
            f"{where}: ledger format {version!r} is not known to this silofed (it reads 1 and 2); "
            "read this ledger with the silofed version that wrote it"
        )
    size = _need(obj, "bytes", int, where)
    if size < 0:
        raise LedgerError(f"{where}: field 'bytes' must be >= 0, got {size}")
    return LedgerEntry(
        round_id=_need(obj, "round_id", int, where),
        at=_at(obj, where),
        message=_need(obj, "message", str, where),
        size=size,
        sha256=_need(obj, "sha256", str, where),
        aggregation=_optional_str(obj, "aggregation", where),
        model_in_sha256=_optional_str(obj, "model_in_sha256", where),
        details={k: v for k, v in obj.items() if k not in _BASE},
    )


def _format1(obj: Mapping[str, Any], where: str) -> LedgerEntry:
    """A line of the old one-line-per-upload format, read as the update blob it described. Its
    `messages` list was written as a fixed list, not a record, so it is kept only as a detail."""
    fields = {k: _need(obj, k, str, where) for k in ("aggregation", "model_in_sha256")}
    round_id = _need(obj, "round_id", int, where)
    update_sha256 = _need(obj, "update_sha256", str, where)
    update_bytes = _need(obj, "update_bytes", int, where)
    num_examples = _need(obj, "num_examples", int, where)
    at = _at(obj, where)
    blob = "MASKED_VECTOR" if fields["aggregation"] == SECAGG else "PLAINTEXT_UPDATE"
    return LedgerEntry(
        round_id=round_id,
        at=at,
        message=f"Blob({blob})",
        size=update_bytes,
        sha256=update_sha256,
        aggregation=fields["aggregation"],
        model_in_sha256=fields["model_in_sha256"],
        details={"num_examples": num_examples, "format1_messages": obj.get("messages")},
        format=1,
    )


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Every entry in file order. Raises LedgerError naming the file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise LedgerError(
            f"{path}: no ledger here; it is written by `silofed-silo run` in the silo's "
            "[silo] state_dir from its first round message — check --config / --state-dir"
        ) from exc
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror}") from exc
    entries: list[LedgerEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{where}: not valid JSON ({exc.msg}); the line is damaged") from exc
        entries.append(_entry(obj, where))
    return entries


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What one round id's messages were, in the order they left: the round's own, and the
    final evaluation's when it evaluated this round's model (`final_evaluation`)."""

    round_id: int
    entries: tuple[LedgerEntry, ...]

    @property
    def own(self) -> tuple[LedgerEntry, ...]:
        return tuple(e for e in self.entries if e.aggregation != FINAL_EVALUATION)

    @property
    def final_evaluation(self) -> tuple[LedgerEntry, ...]:
        return tuple(e for e in self.entries if e.aggregation == FINAL_EVALUATION)

    @property
    def aggregation(self) -> str | None:
        return next((e.aggregation for e in self.own if e.aggregation is not None), None)

    @property
    def model_in_sha256(self) -> str | None:
        return next((e.model_in_sha256 for e in self.own if e.model_in_sha256), None)

    @property
    def update(self) -> LedgerEntry | None:
        return next((e for e in reversed(self.own) if e.is_update), None)

    @property
    def messages(self) -> tuple[str, ...]:
        return tuple(e.message for e in self.entries)

    @property
    def complete(self) -> bool:
        """False for rounds read from format-1 lines (only their upload was recorded)."""
        return all(e.format == FORMAT for e in self.entries)

    def share_releases(self) -> dict[str, list[str | int]]:
        """Whose key shares this silo released (UnmaskShares): `b_shares_for`, `s_shares_for`."""
        out: dict[str, list[str | int]] = {}
        for e in self.entries:
            if e.message == "SecAggFrame(UnmaskShares)":
                for key in ("b_shares_for", "s_shares_for"):
                    out.setdefault(key, []).extend(e.details.get(key) or [])
        return out


def by_round(entries: Iterable[LedgerEntry]) -> list[RoundRecord]:
    """Entries grouped per round id (rounds ascending, messages in ledger order)."""
    grouped: dict[int, list[LedgerEntry]] = {}
    for e in entries:
        grouped.setdefault(e.round_id, []).append(e)
    return [RoundRecord(r, tuple(grouped[r])) for r in sorted(grouped)]


def entries_for(entries: Iterable[LedgerEntry], round_id: int) -> list[LedgerEntry]:
    return [e for e in entries if e.round_id == round_id]


# ---- checking against the coordinator ------------------------------------------------------


def load_export(path: Path) -> Mapping[str, Any]:
    """A `silofed-coordinator rounds export --format json` document. Raises LedgerError."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LedgerError(
            f"{path}: no such export; make one with `silofed-coordinator rounds export "
            "--state-dir DIR --format json --output FILE`"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise LedgerError(
            f"{path}: not a JSON round-log export ({exc}); make one with "
            "`silofed-coordinator rounds export --format json`"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise LedgerError(f"{path}: not a round-log export (no 'rounds' list)")
    return data


def _silo_stats(round_doc: Mapping[str, Any], silo_id: str) -> Mapping[str, Any] | None:
    for s in round_doc.get("silos") or []:
        if isinstance(s, dict) and s.get("silo_id") == silo_id:
            return s
    return None


def _participants(doc: Mapping[str, Any], name: str) -> list[Any]:
    found = (doc.get("participants") or {}).get(name) or []
    return list(found) if isinstance(found, list) else []


def verify(
    entries: Sequence[LedgerEntry], export: Mapping[str, Any], silo_id: str
) -> list[Mismatch]:
    """Compare what this silo sent with what the coordinator logged; [] when they agree.

    Per round in the ledger: the round exists, invited this silo, used the same aggregation and
    sent the model the silo received (`model_in_sha256`), and the coordinator logged at least
    the update blob's bytes from this silo (`silos.bytes_in` counts every message of the round,
    so it is >= the blob); a final evaluation under that round id was of the model the round
    produced (`model_out_sha256`). Per round in the export: a round whose `participants.finished`
    names this silo has an update blob in the ledger, and every participant set U1..U5 that
    names it has the message that set stands for (Advertise, ShareKeys, the masked vector with its
    signed header, Consistency, UnmaskShares) — the coordinator cannot count a message this
    silo never sent. Rounds read from format-1 lines (uploads only) skip the set check, and
    lines of no round (`NO_ROUND`: a roster adoption) are not compared.
    """
    rounds: dict[int, Mapping[str, Any]] = {}
    for doc in export.get("rounds", []):
        if isinstance(doc, dict) and isinstance(doc.get("round"), int):
            rounds[doc["round"]] = doc
    sent = {r.round_id: r for r in by_round(entries) if r.round_id != NO_ROUND}
    problems: list[Mismatch] = []
    for r in sent.values():
        doc = rounds.get(r.round_id)
        if doc is None:
            what = f"{len(r.entries)} message(s) sent"
            problems.append(
                Mismatch(r.round_id, "round", what, None, "the export has no such round")
            )
            continue
        problems += _check_sent_round(r, doc, silo_id)
    for round_id, doc in sorted(rounds.items()):
        problems += _check_export_round(round_id, doc, sent.get(round_id), silo_id)
    return sorted(problems, key=lambda m: (m.round_id, m.field))


def _check_sent_round(r: RoundRecord, doc: Mapping[str, Any], silo_id: str) -> list[Mismatch]:
    problems: list[Mismatch] = []
    invited = _participants(doc, "invited")
    if r.own and silo_id not in invited:  # the final evaluation asks every connected silo
        problems.append(
            Mismatch(r.round_id, "participants.invited", silo_id, invited, "not invited")
        )
    evaluated = next((e.model_in_sha256 for e in r.final_evaluation), None)
    if evaluated is not None and evaluated != doc.get("model_out_sha256"):
        problems.append(
            Mismatch(
                r.round_id,
                "model_out_sha256",
                evaluated,
                doc.get("model_out_sha256"),
                "this silo's final evaluation was of another model than this round produced",
            )
        )
    for name, mine in (("aggregation", r.aggregation), ("model_in_sha256", r.model_in_sha256)):
        # None: the silo sent something for a round whose offer it never took (nothing to compare).
        if mine is not None and doc.get(name) != mine:
            problems.append(Mismatch(r.round_id, name, mine, doc.get(name), "values differ"))
    update = r.update
    if update is not None:
        stats = _silo_stats(doc, silo_id)
        received = None if stats is None else stats.get("bytes_in")
        if not isinstance(received, int) or received < update.size:
            problems.append(
                Mismatch(
                    r.round_id,
                    "silos.bytes_in",
                    update.size,
                    received,
                    "the coordinator logged fewer bytes from this silo than its update's size",
                )
            )
    return problems


def _check_export_round(
    round_id: int, doc: Mapping[str, Any], r: RoundRecord | None, silo_id: str
) -> list[Mismatch]:
    problems: list[Mismatch] = []
    if silo_id in _participants(doc, "finished") and (r is None or r.update is None):
        problems.append(
            Mismatch(
                round_id,
                "participants.finished",
                None,
                silo_id,
                "the coordinator counts an upload from this silo that the ledger lacks",
            )
        )
    if r is not None and not r.complete:
        return problems
    messages = set() if r is None else set(r.messages)
    for set_name, needed in _SET_NEEDS.items():
        missing = [m for m in needed if m not in messages]
        if silo_id in _participants(doc, set_name) and missing:
            problems.append(
                Mismatch(
                    round_id,
                    f"participants.{set_name}",
                    None,
                    silo_id,
                    f"the coordinator counts this silo in {set_name}, but the ledger has no "
                    + ", no ".join(missing),
                )
            )
    return problems

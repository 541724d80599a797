"""Reading the silo's ledger (`<state_dir>/ledger.jsonl`) and checking it against the export.

Rule: the one reader of the ledger file (`ledger.py` is its one writer and states the format),
and `verify` is a pure comparison of ledger entries with the coordinator's `rounds export
--format json` document. A torn or damaged line is reported with its file and line number
instead of guessed at; format 1 lines (one per upload, written by silofed before format 2) read
as the one update blob they described.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos.names import SECAGG
from silo_agent.storage.ledger import FINAL_EVALUATION, FORMAT, NO_ROUND

UPDATE_BLOBS = ("Blob(MASKED_VECTOR)", "Blob(PLAINTEXT_UPDATE)")
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

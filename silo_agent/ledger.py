"""The silo's upload ledger (`<state_dir>/ledger.jsonl`): what left the site, one line per upload.

Rule: this module is the one reader and writer of the ledger file, and `verify` is a pure
comparison of ledger entries with the coordinator's `rounds export --format json` document.
Each line is one JSON object (sorted keys): `round_id`, `at` (unix seconds), `aggregation`,
`model_in_sha256` (the global model this silo received), `update_sha256` and `update_bytes`
(the update blob it sent), `num_examples`, and `messages` (the protocol messages that carried
it). Lines are only appended, so a crash can at worst leave a torn last line, which `read_ledger`
reports with its line number instead of guessing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_FILENAME = "ledger.jsonl"

# What carries a plaintext update today (see protos/federation.proto): the report that names the
# update's digest, then the blob header and its chunks.
PLAINTEXT_MESSAGES = ("TrainReport", "BlobHeader(PLAINTEXT_UPDATE)", "BlobChunk")
# What a secure round sends: keys, encrypted shares, metrics, the masked vector, signature, shares.
SECURE_MESSAGES = (
    "SecAggFrame(Advertise)",
    "SecAggFrame(ShareKeys)",
    "TrainReport(metrics only)",
    "SecAggFrame(MaskedHeader)",
    "BlobHeader(MASKED_VECTOR)",
    "BlobChunk",
    "SecAggFrame(Consistency)",
    "SecAggFrame(UnmaskShares)",
)


class LedgerError(Exception):
    """The ledger or an export cannot be read; str() names the file, line and what to do."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    round_id: int
    at: float
    aggregation: str
    model_in_sha256: str
    update_sha256: str
    update_bytes: int
    num_examples: int
    messages: tuple[str, ...] = PLAINTEXT_MESSAGES

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "at": self.at,
            "aggregation": self.aggregation,
            "model_in_sha256": self.model_in_sha256,
            "update_sha256": self.update_sha256,
            "update_bytes": self.update_bytes,
            "num_examples": self.num_examples,
            "messages": list(self.messages),
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


def append_entry(path: Path, entry: LedgerEntry) -> None:
    """Append one entry (creating the file's folder); one write per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(entry.to_dict(), sort_keys=True) + "\n")


_FIELDS: dict[str, type] = {
    "round_id": int,
    "aggregation": str,
    "model_in_sha256": str,
    "update_sha256": str,
    "update_bytes": int,
    "num_examples": int,
}


def _entry(obj: object, where: str) -> LedgerEntry:
    if not isinstance(obj, dict):
        raise LedgerError(f"{where}: expected a JSON object")
    for key, kind in _FIELDS.items():
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise LedgerError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    at = obj.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise LedgerError(f"{where}: field 'at' must be a number, got {at!r}")
    messages = obj.get("messages", list(PLAINTEXT_MESSAGES))
    if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
        raise LedgerError(f"{where}: field 'messages' must be a list of strings")
    return LedgerEntry(
        round_id=obj["round_id"],
        at=float(at),
        aggregation=obj["aggregation"],
        model_in_sha256=obj["model_in_sha256"],
        update_sha256=obj["update_sha256"],
        update_bytes=obj["update_bytes"],
        num_examples=obj["num_examples"],
        messages=tuple(messages),
    )


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Every entry in file order. Raises LedgerError naming the file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise LedgerError(
            f"{path}: no ledger here; it is written by `silofed-silo run` in the silo's "
            "[silo] state_dir after its first upload — check --config / --state-dir"
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


def verify(
    entries: Sequence[LedgerEntry], export: Mapping[str, Any], silo_id: str
) -> list[Mismatch]:
    """Compare this silo's uploads with what the coordinator logged; [] when they agree.

    Per ledger entry: the round exists, invited this silo, used the same aggregation, sent the
    model the silo received (`model_in_sha256`), and the coordinator received at least the
    update's bytes from this silo (`bytes_in` counts every message, so it is >= the blob).
    Per export round that counts this silo among `finished`: the ledger has its upload.
    """
    rounds: dict[int, Mapping[str, Any]] = {}
    for doc in export.get("rounds", []):
        if isinstance(doc, dict) and isinstance(doc.get("round"), int):
            rounds[doc["round"]] = doc
    problems: list[Mismatch] = []
    seen: set[int] = set()
    for e in entries:
        seen.add(e.round_id)
        doc = rounds.get(e.round_id)
        if doc is None:
            problems.append(
                Mismatch(e.round_id, "round", "uploaded", None, "the export has no such round")
            )
            continue
        participants = doc.get("participants") or {}
        invited = participants.get("invited") or []
        if silo_id not in invited:
            problems.append(
                Mismatch(e.round_id, "participants.invited", silo_id, invited, "not invited")
            )
        for name in ("aggregation", "model_in_sha256"):
            if doc.get(name) != getattr(e, name):
                problems.append(
                    Mismatch(e.round_id, name, getattr(e, name), doc.get(name), "values differ")
                )
        stats = _silo_stats(doc, silo_id)
        received = None if stats is None else stats.get("bytes_in")
        if not isinstance(received, int) or received < e.update_bytes:
            problems.append(
                Mismatch(
                    e.round_id,
                    "silos.bytes_in",
                    e.update_bytes,
                    received,
                    "the coordinator logged fewer bytes from this silo than its update's size",
                )
            )
    for round_id, doc in sorted(rounds.items()):
        finished = (doc.get("participants") or {}).get("finished") or []
        if silo_id in finished and round_id not in seen:
            problems.append(
                Mismatch(
                    round_id,
                    "participants.finished",
                    None,
                    silo_id,
                    "the coordinator counts an upload from this silo that the ledger lacks",
                )
            )
    return sorted(problems, key=lambda m: (m.round_id, m.field))


def entries_for(entries: Iterable[LedgerEntry], round_id: int) -> list[LedgerEntry]:
    return [e for e in entries if e.round_id == round_id]

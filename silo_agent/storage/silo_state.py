"""The silo's persisted secure-aggregation state: `last_round_id` and the submission log.

Rule: every journal entry a `secagg.SiloSession` emits (round accepted, masked input recorded,
survivors recorded, exclusion recorded) is written to ONE small JSON file in the silo's state
dir, atomically (silofed.files: temporary file, fsync, rename) and BEFORE the session's next
message leaves (docs/secagg-protocol.md §5 steps 0.2, 3.7, 4.3): a crash can lose a message,
never the record that it may have been sent. The file holds hashes, round ids, session ids and
silo ids only, never a model, a key or an update.

Format 2 keys the submission log by `model_digest` (the digest of the model's tensors the driver
computes); format 1 files are still read, their `model_sha256` (a hash of the model file) kept as
the record's key, so inputs already sent stay counted. A record's `excluded` (silos proven to
have sent an out-of-range weight in that session) is optional: files written before it existed
read as excluding no one, and an older agent that ignores it only refuses more retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from secagg.silo import (
    ExclusionRecorded,
    JournalEntry,
    MaskedInputRecorded,
    RoundAccepted,
    SiloPolicy,
    SubmissionRecord,
    SurvivorsRecorded,
)
from silofed.files import write_atomically

STATE_FILENAME = "secagg-state.json"
_FORMAT = 2
_READABLE_FORMATS = (1, 2)
_DIGEST_KEY = {1: "model_sha256", 2: "model_digest"}


class SiloStateError(ValueError):
    """The state file is unreadable or malformed; str() names the file and what to fix."""


@dataclass(frozen=True, slots=True)
class SiloSecAggState:
    """What the silo remembers across rounds and restarts."""

    last_round_id: int = 0
    submission_log: Mapping[bytes, tuple[SubmissionRecord, ...]] = field(default_factory=dict)

    def apply(self, entry: JournalEntry) -> SiloSecAggState:
        """The state after one journal entry (pure)."""
        if isinstance(entry, RoundAccepted):
            return replace(self, last_round_id=max(self.last_round_id, entry.round_id))
        log = {k: tuple(v) for k, v in self.submission_log.items()}
        rec = entry.record
        if isinstance(entry, MaskedInputRecorded):
            log[rec.model_digest] = (*log.get(rec.model_digest, ()), rec)
        elif isinstance(entry, SurvivorsRecorded | ExclusionRecorded):
            old = log.get(rec.model_digest, ())
            kept = tuple(r for r in old if r.session_id != rec.session_id)
            log[rec.model_digest] = (*kept, rec)
        return replace(self, submission_log=log)

    def policy(self, base: SiloPolicy) -> SiloPolicy:
        """`base` (the configured policy) with this persisted state filled in."""
        return replace(
            base, last_round_id=self.last_round_id, submission_log=dict(self.submission_log)
        )

    def to_json(self) -> str:
        records = [
            {
                "model_digest": r.model_digest.hex(),
                "round_id": r.round_id,
                "session_id": r.session_id.hex(),
                "survivors": None if r.survivors is None else sorted(r.survivors),
                "members": None if r.members is None else sorted(r.members),
                "excluded": sorted(r.excluded),
            }
            for recs in self.submission_log.values()
            for r in recs
        ]
        obj = {"format": _FORMAT, "last_round_id": self.last_round_id, "submissions": records}
        # No indent: json's C encoder serves only unindented output, and the file is rewritten
        # at every journal entry with every record's member lists (2.5x faster at n = 100).
        return json.dumps(obj, sort_keys=True)

    @staticmethod
    def from_json(text: str, *, source: str) -> SiloSecAggState:
        try:
            obj: Any = json.loads(text)
            fmt = obj.get("format")
            if type(fmt) is not int or fmt not in _READABLE_FORMATS:
                raise ValueError(f"format must be one of {_READABLE_FORMATS}, got {fmt!r}")
            digest_key = _DIGEST_KEY[fmt]
            last = obj["last_round_id"]
            if not isinstance(last, int) or last < 0:
                raise ValueError(f"last_round_id must be an int >= 0, got {last!r}")
            log: dict[bytes, tuple[SubmissionRecord, ...]] = {}
            for r in obj["submissions"]:
                surv, members = r["survivors"], r.get("members")
                excluded = r.get("excluded", [])
                if not isinstance(excluded, list):
                    raise ValueError(f"excluded must be a list of silo ids, got {excluded!r}")
                rec = SubmissionRecord(
                    bytes.fromhex(r[digest_key]),
                    int(r["round_id"]),
                    bytes.fromhex(r["session_id"]),
                    None if surv is None else frozenset(str(s) for s in surv),
                    None if members is None else frozenset(str(s) for s in members),
                    frozenset(str(s) for s in excluded),
                )
                log[rec.model_digest] = (*log.get(rec.model_digest, ()), rec)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SiloStateError(
                f"{source}: malformed secure-aggregation state ({e}); restore it from a backup "
                "(deleting it lets this silo re-submit for models it already answered)"
            ) from None
        return SiloSecAggState(last, log)


class SiloStateStore:
    """The state file in `state_dir`; `journal` is the callback a SiloSession takes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILENAME
        self.state = self._load()

    def _load(self) -> SiloSecAggState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return SiloSecAggState()
        return SiloSecAggState.from_json(text, source=str(self.path))

    def journal(self, entry: JournalEntry) -> None:
        """Apply `entry` and make it durable before returning (the session then proceeds)."""
        new = self.state.apply(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, new.to_json().encode("utf-8"), mode=0o600)
        self.state = new

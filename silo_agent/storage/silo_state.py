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

Format 3 bounds the log: it keeps the records of the `remembered_models` models used most
recently (by the highest round id of their records) and only the digest of older ones, in
`retired_models`. A retired model's records are gone, so the silo sends no further masked input
for it (`SiloSession` refuses the offer): forgetting never re-opens a retry. A record holds the
ids of its round's members and survivors (about 90 bytes per member) and the file is rewritten
whole at each journal entry, so without the bound both its size and the cost of each write grew
with every round; a retired model costs its 32-byte digest. Formats 1 and 2 read as retiring
nothing.
"""

from __future__ import annotations

import json
import re
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
_FORMAT = 3
_READABLE_FORMATS = (1, 2, 3)
_DIGEST_KEY = {1: "model_sha256", 2: "model_digest", 3: "model_digest"}
# `[secagg] remembered_models` unset: how many models' records the log keeps (a rollback
# deeper than this many models is refused by the silo).
DEFAULT_REMEMBERED_MODELS = 64
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")


class SiloStateError(ValueError):
    """The state file is unreadable or malformed; str() names the file and what to fix."""


@dataclass(frozen=True, slots=True)
class SiloSecAggState:
    """What the silo remembers across rounds and restarts."""

    last_round_id: int = 0
    submission_log: Mapping[bytes, tuple[SubmissionRecord, ...]] = field(default_factory=dict)
    retired_models: frozenset[bytes] = frozenset()

    def apply(
        self, entry: JournalEntry, remembered_models: int = DEFAULT_REMEMBERED_MODELS
    ) -> SiloSecAggState:
        """The state after one journal entry (pure), the log cut to `remembered_models` models
        (module docstring). A model is never both in the log and retired: an entry for a
        retired model leaves it retired and its record out."""
        if remembered_models < 1:
            raise ValueError("remembered_models must be >= 1")
        if isinstance(entry, RoundAccepted):
            return replace(self, last_round_id=max(self.last_round_id, entry.round_id))
        rec = entry.record
        if rec.model_digest in self.retired_models:
            return self
        log = {k: tuple(v) for k, v in self.submission_log.items()}
        if isinstance(entry, MaskedInputRecorded):
            log[rec.model_digest] = (*log.get(rec.model_digest, ()), rec)
        elif isinstance(entry, SurvivorsRecorded | ExclusionRecorded):
            old = log.get(rec.model_digest, ())
            kept = tuple(r for r in old if r.session_id != rec.session_id)
            log[rec.model_digest] = (*kept, rec)
        retired = set(self.retired_models)
        if len(log) > remembered_models:
            # Least recently used first (highest round id of a model's records); the model
            # of this entry, the newest, always stays.
            by_age = sorted(
                (k for k in log if k != rec.model_digest),
                key=lambda k: (max(r.round_id for r in log[k]), k),
            )
            for digest in by_age[: len(log) - remembered_models]:
                del log[digest]
                retired.add(digest)
        return replace(self, submission_log=log, retired_models=frozenset(retired))

    def policy(self, base: SiloPolicy) -> SiloPolicy:
        """`base` (the configured policy) with this persisted state filled in."""
        return replace(
            base,
            last_round_id=self.last_round_id,
            submission_log=dict(self.submission_log),
            retired_models=self.retired_models,
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
        obj = {
            "format": _FORMAT,
            "last_round_id": self.last_round_id,
            "submissions": records,
            "retired_models": sorted(d.hex() for d in self.retired_models),
        }
        # No indent: json's C encoder serves only unindented output, and the file is rewritten
        # at every journal entry with every record's member lists (four records of 100 members:
        # 0.16 -> 0.06 ms).
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
            # Format 3 must list its retired models, even none: a file that lost the key
            # would otherwise re-open every retired model's retries.
            retired_hex = obj["retired_models"] if fmt >= 3 else []
            if not isinstance(retired_hex, list) or not all(
                isinstance(d, str) and _DIGEST_HEX.fullmatch(d) for d in retired_hex
            ):
                raise ValueError(
                    "retired_models must be a list of 64-digit lowercase hex digests, got "
                    f"{retired_hex!r:.80}"
                )
            retired = frozenset(bytes.fromhex(d) for d in retired_hex)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SiloStateError(
                f"{source}: malformed secure-aggregation state ({e}); restore it from a backup "
                "(deleting it lets this silo re-submit for models it already answered)"
            ) from None
        # A model both logged and retired stays retired (the direction that refuses retries).
        log = {k: v for k, v in log.items() if k not in retired}
        return SiloSecAggState(last, log, retired)


class SiloStateStore:
    """The state file in `state_dir`; `journal` is the callback a SiloSession takes."""

    def __init__(self, state_dir: Path, remembered_models: int = DEFAULT_REMEMBERED_MODELS) -> None:
        self.path = state_dir / STATE_FILENAME
        self.remembered_models = remembered_models
        self.state = self._load()

    def _load(self) -> SiloSecAggState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return SiloSecAggState()
        return SiloSecAggState.from_json(text, source=str(self.path))

    def journal(self, entry: JournalEntry) -> None:
        """Apply `entry` and make it durable before returning (the session then proceeds)."""
        new = self.state.apply(entry, self.remembered_models)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, new.to_json().encode("utf-8"), mode=0o600)
        self.state = new

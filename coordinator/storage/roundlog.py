"""The round log: one SQLite file per federation recording what every round did, append-only.

Rule: it records facts about rounds — status, timings, participant sets per phase, dropouts and
their phase, bytes and evaluation metrics per silo, model and checkpoint hashes, the aggregate's
weight sum, abort reasons, privacy figures —, the final evaluation of the federation's last model
(not a round: it counts nowhere as one), and never an individual silo's update. Every write is
one transaction; a finished round (completed, aborted, interrupted) is never modified again, and
a final evaluation is written once. Timestamps are float unix seconds passed in by the caller
(no clock is read here). A log of an older schema version is upgraded when a writer opens it
(`_MIGRATIONS`); a reader of a not-yet-upgraded log sees no final evaluations.

Readers open the file with `RoundLog.open_readonly` (SQLite URI ``mode=ro``) and may do so while
the coordinator writes: WAL mode lets them read the last committed state without blocking it.
Field meanings and the stable export names are documented in docs/round-log.md.
"""

from __future__ import annotations

import enum
import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.identity import SiloId

SCHEMA_VERSION = 2
LOG_FILENAME = "rounds.sqlite"  # the round log's name inside the coordinator's state_dir
PHASE_SETS = ("invited", "U1", "U2", "U3", "U4", "U5", "finished")

_SCHEMA = """
CREATE TABLE rounds (
    round_id          INTEGER PRIMARY KEY CHECK (round_id >= 1),
    status            TEXT NOT NULL
                      CHECK (status IN ('running', 'completed', 'aborted', 'interrupted')),
    started_at        REAL NOT NULL,
    ended_at          REAL,
    aggregation       TEXT NOT NULL,
    config_digest     TEXT NOT NULL,
    model_in_sha256   TEXT NOT NULL,
    model_out_sha256  TEXT,
    rollback_of       INTEGER,
    weight_sum        REAL,
    global_metrics    TEXT NOT NULL DEFAULT '{}',
    abort_reason      TEXT,
    extra             TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE phases (
    round_id    INTEGER NOT NULL REFERENCES rounds(round_id),
    seq         INTEGER NOT NULL,
    phase       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    PRIMARY KEY (round_id, seq)
);
CREATE TABLE participants (
    round_id   INTEGER NOT NULL REFERENCES rounds(round_id),
    phase_set  TEXT NOT NULL
               CHECK (phase_set IN ('invited', 'U1', 'U2', 'U3', 'U4', 'U5', 'finished')),
    silo_id    TEXT NOT NULL,
    PRIMARY KEY (round_id, phase_set, silo_id)
);
CREATE TABLE dropouts (
    round_id  INTEGER NOT NULL REFERENCES rounds(round_id),
    silo_id   TEXT NOT NULL,
    phase     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (round_id, silo_id)
);
CREATE TABLE silo_stats (
    round_id   INTEGER NOT NULL REFERENCES rounds(round_id),
    silo_id    TEXT NOT NULL,
    bytes_in   INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out  INTEGER NOT NULL CHECK (bytes_out >= 0),
    metrics    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round_id, silo_id)
);
CREATE TABLE privacy (
    round_id          INTEGER PRIMARY KEY REFERENCES rounds(round_id),
    mechanism         TEXT NOT NULL,
    noise_multiplier  REAL NOT NULL,
    clip_norm         REAL NOT NULL,
    epsilon           REAL NOT NULL,
    delta             REAL NOT NULL,
    details           TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE checkpoints (
    round_id  INTEGER PRIMARY KEY CHECK (round_id >= 0),
    path      TEXT NOT NULL,
    sha256    TEXT NOT NULL
);
"""

# Schema version 2: the final evaluation of the federation's last model (one row per evaluated
# round's model; it is not a round, so no other table refers to it).
_FINAL_EVALUATIONS = """
CREATE TABLE final_evaluations (
    round_id        INTEGER PRIMARY KEY REFERENCES rounds(round_id),
    model_sha256    TEXT NOT NULL,
    started_at      REAL NOT NULL,
    ended_at        REAL NOT NULL,
    asked           TEXT NOT NULL DEFAULT '[]',
    answered        TEXT NOT NULL DEFAULT '[]',
    refusals        TEXT NOT NULL DEFAULT '{}',
    silo_metrics    TEXT NOT NULL DEFAULT '{}',
    global_metrics  TEXT NOT NULL DEFAULT '{}'
)
"""
# Statements that bring a log of version N to N + 1, run in one transaction per step.
_MIGRATIONS: Mapping[int, tuple[str, ...]] = {1: (_FINAL_EVALUATIONS,)}


class RoundStatus(enum.Enum):
    """A round's status; only RUNNING rounds accept writes."""

    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


class RoundLogError(Exception):
    """The round log refused a write or cannot be read; the message says what to do."""


class RoundNotFound(RoundLogError):
    """No round with that number is in the log."""

    def __init__(self, round_id: int, last: int) -> None:
        hint = "the log is empty" if last == 0 else f"rounds are numbered 1..{last}"
        super().__init__(f"round {round_id} is not in the round log ({hint})")
        self.round_id = round_id


class RoundLogUnavailable(RoundLogError):
    """The log file is missing, unreadable, or not a silofed round log of a known version."""


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint the log vouches for: the model state after `round_id` (0 = initial model)."""

    round_id: int
    path: Path
    sha256: str


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    phase: str
    started_at: float
    ended_at: float

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class Dropout:
    silo_id: SiloId
    phase: str
    reason: str


@dataclass(frozen=True, slots=True)
class SiloStats:
    """Traffic and local evaluation metrics of one silo in one round (never its update)."""

    silo_id: SiloId
    bytes_in: int
    bytes_out: int
    metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class PrivacyRecord:
    """Differential-privacy figures of a round: the noise added and the privacy spent so far."""

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    epsilon: float
    delta: float
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FinalEvaluation:
    """The evaluation, on the silos, of the model a completed round produced, run once when the
    federation finished. Not a round: it trains nothing and counts nowhere as one."""

    round_id: int  # the completed round whose model (`model_sha256`) was evaluated
    model_sha256: str
    started_at: float
    ended_at: float
    asked: tuple[SiloId, ...]  # silos sent the model to evaluate
    answered: tuple[SiloId, ...]  # silos whose `eval_*` metrics arrived
    refusals: Mapping[SiloId, str]  # silo -> the reason code it declined with
    silo_metrics: Mapping[SiloId, Mapping[str, float]]
    global_metrics: Mapping[str, float]  # unweighted mean over `answered` of each metric

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The stable export form (field names documented in docs/round-log.md)."""
        return {
            "round": self.round_id,
            "model_sha256": self.model_sha256,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "asked": list(self.asked),
            "answered": list(self.answered),
            "refusals": dict(sorted(self.refusals.items())),
            "global_metrics": _export_metrics(self.global_metrics),
            "silos": [
                {"silo_id": s, "metrics": _export_metrics(self.silo_metrics[s])}
                for s in sorted(self.silo_metrics)
            ],
        }


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """One row of `rounds list`."""

    round_id: int
    status: RoundStatus
    started_at: float
    ended_at: float | None
    aggregation: str
    invited: int
    finished: int
    dropped: int
    global_metrics: Mapping[str, float]
    silo_metrics: Mapping[SiloId, Mapping[str, float]]

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class RoundDetail:
    """Everything the log holds about one round (`rounds show N`)."""

    round_id: int
    status: RoundStatus
    started_at: float
    ended_at: float | None
    aggregation: str
    config_digest: str
    model_in_sha256: str
    model_out_sha256: str | None
    rollback_of: int | None
    weight_sum: float | None
    global_metrics: Mapping[str, float]
    abort_reason: str | None
    extra: Mapping[str, object]
    phases: tuple[PhaseTiming, ...]
    participants: Mapping[str, tuple[SiloId, ...]]
    dropouts: tuple[Dropout, ...]
    silos: tuple[SiloStats, ...]
    privacy: PrivacyRecord | None
    checkpoint: CheckpointRecord | None
    final_evaluation: FinalEvaluation | None = None  # of this round's model, if it was the last

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The stable export form (field names documented in docs/round-log.md)."""
        return {
            "round": self.round_id,
            "status": self.status.value,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "aggregation": self.aggregation,
            "config_digest": self.config_digest,
            "model_in_sha256": self.model_in_sha256,
            "model_out_sha256": self.model_out_sha256,
            "rollback_of": self.rollback_of,
            "weight_sum": self.weight_sum,
            "global_metrics": _export_metrics(self.global_metrics),
            "abort_reason": self.abort_reason,
            "extra": dict(self.extra),
            "phases": [
                {
                    "phase": p.phase,
                    "started_at": p.started_at,
                    "ended_at": p.ended_at,
                    "duration_s": p.duration_s,
                }
                for p in self.phases
            ],
            "participants": {k: list(v) for k, v in self.participants.items()},
            "dropouts": [
                {"silo_id": d.silo_id, "phase": d.phase, "reason": d.reason} for d in self.dropouts
            ],
            "silos": [
                {
                    "silo_id": s.silo_id,
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                    "metrics": _export_metrics(s.metrics),
                }
                for s in self.silos
            ],
            "privacy": None
            if self.privacy is None
            else {
                "mechanism": self.privacy.mechanism,
                "noise_multiplier": self.privacy.noise_multiplier,
                "clip_norm": self.privacy.clip_norm,
                "epsilon": self.privacy.epsilon,
                "delta": self.privacy.delta,
                "details": dict(self.privacy.details),
            },
            "checkpoint": None
            if self.checkpoint is None
            else {"path": str(self.checkpoint.path), "sha256": self.checkpoint.sha256},
            "final_evaluation": None
            if self.final_evaluation is None
            else self.final_evaluation.to_dict(),
        }


def _export_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    # Exports must be valid JSON: a non-finite metric (stored as null) goes out as null.
    return {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}


def _metrics_json(metrics: Mapping[str, float], what: str) -> str:
    clean: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: metric names must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what}: metric {key!r} must be a number, got {value!r}")
        # A diverged silo may report NaN loss; JSON has no NaN, so it is stored as null.
        clean[key] = float(value) if math.isfinite(value) else None
    return json.dumps(clean, sort_keys=True, allow_nan=False)


def _metrics_from_json(text: str) -> dict[str, float]:
    raw = json.loads(text)
    return {k: (math.nan if v is None else float(v)) for k, v in sorted(raw.items())}


def _object_json(value: Mapping[str, object], what: str) -> str:
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from exc


def _final_evaluation(row: Sequence[Any]) -> FinalEvaluation:
    round_id, sha, started, ended, asked, answered, refusals, silo_metrics, global_metrics = row
    per_silo = json.loads(silo_metrics)
    return FinalEvaluation(
        round_id=int(round_id),
        model_sha256=str(sha),
        started_at=float(started),
        ended_at=float(ended),
        asked=tuple(SiloId(s) for s in json.loads(asked)),
        answered=tuple(SiloId(s) for s in json.loads(answered)),
        refusals={SiloId(k): str(v) for k, v in sorted(json.loads(refusals).items())},
        silo_metrics={
            SiloId(s): _metrics_from_json(json.dumps(m)) for s, m in sorted(per_silo.items())
        },
        global_metrics=_metrics_from_json(global_metrics),
    )


def _check_silo(silo_id: str) -> str:
    if not isinstance(silo_id, str) or not silo_id:
        raise ValueError(f"silo id must be a non-empty string, got {silo_id!r}")
    return silo_id


class RoundLog:
    """The coordinator's round log. Writers construct it; readers use `open_readonly`.

    Thread-safe: one connection guarded by a lock (the coordinator writes from its round driver
    and reads from its status service).
    """

    def __init__(self, path: Path, *, _readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = _readonly
        self._lock = threading.RLock()
        if _readonly:
            if not self.path.is_file():
                raise RoundLogUnavailable(
                    f"no round log at {self.path}; pass the coordinator's --state-dir "
                    "(the log is <state_dir>/rounds.sqlite) or --log with the file's path"
                )
            try:
                self._conn = sqlite3.connect(
                    self.path.resolve().as_uri() + "?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._check_version(self._conn.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise RoundLogUnavailable(
                    f"cannot read round log {self.path}: {exc}; check the file is a silofed "
                    "round log and readable by this user"
                ) from exc
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except sqlite3.Error as exc:
                raise RoundLogUnavailable(f"cannot open round log {self.path}: {exc}") from exc

    @classmethod
    def open_readonly(cls, path: Path) -> RoundLog:
        """Open an existing log for reading only (safe while the coordinator writes).

        Raises RoundLogUnavailable if it is missing, unreadable or of an unknown schema version.
        """
        return cls(path, _readonly=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RoundLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------------

    def _check_version(self, version: int) -> None:
        if version == 0:
            raise RoundLogUnavailable(
                f"{self.path} is not a silofed round log (no schema); point --log at "
                "<state_dir>/rounds.sqlite"
            )
        if version > SCHEMA_VERSION:
            raise RoundLogUnavailable(
                f"{self.path} has round-log schema version {version}, newer than this silofed "
                f"understands ({SCHEMA_VERSION}); upgrade silofed to read it"
            )

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                has_tables = self._conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type='table'"
                ).fetchone()[0]
                if has_tables:
                    raise RoundLogUnavailable(
                        f"{self.path} is an SQLite database but not a silofed round log; "
                        "choose another state_dir"
                    )
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.execute(_FINAL_EVALUATIONS)
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            else:
                self._check_version(version)
                self._upgrade(version)

    def _upgrade(self, version: int) -> None:
        """Bring a log written by an older silofed to SCHEMA_VERSION, one step per transaction
        (a crash between steps leaves a consistent log of the intermediate version)."""
        while version < SCHEMA_VERSION:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another writer may have upgraded it meanwhile.
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    self._conn.execute("COMMIT")
                    break
                for statement in _MIGRATIONS[version]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={version + 1}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            version += 1

    def _has_table(self, name: str) -> bool:
        # A reader of a log written by an older silofed (not upgraded yet) lacks newer tables.
        rows = self._read("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return bool(rows)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise RoundLogError(f"round log {self.path} was opened read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _require_running(self, conn: sqlite3.Connection, round_id: int) -> None:
        row = conn.execute("SELECT status FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        if row is None:
            raise RoundNotFound(round_id, self._last_round_id(conn))
        if row[0] != RoundStatus.RUNNING.value:
            raise RoundLogError(
                f"round {round_id} is already {row[0]}; a finished round is never modified"
            )

    # -- writes -------------------------------------------------------------------------------

    def start_round(
        self,
        round_id: int,
        *,
        started_at: float,
        aggregation: str,
        config_digest: str,
        model_in_sha256: str,
        invited: Iterable[str],
        rollback_of: int | None = None,
    ) -> None:
        """Open round `round_id` (status running) and record its invited set.

        Raises RoundLogError if the round already exists or `round_id` < 1.
        """
        if round_id < 1:
            raise RoundLogError(f"round ids start at 1, got {round_id}")
        silos = sorted({_check_silo(s) for s in invited})
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM rounds WHERE round_id=?", (round_id,)).fetchone():
                raise RoundLogError(
                    f"round {round_id} is already in the round log; the next round is "
                    f"{self._last_round_id(conn) + 1}"
                )
            conn.execute(
                "INSERT INTO rounds (round_id, status, started_at, aggregation, config_digest,"
                " model_in_sha256, rollback_of) VALUES (?, 'running', ?, ?, ?, ?, ?)",
                (round_id, started_at, aggregation, config_digest, model_in_sha256, rollback_of),
            )
            conn.executemany(
                "INSERT INTO participants VALUES (?, 'invited', ?)",
                [(round_id, s) for s in silos],
            )

    def record_phase(
        self, round_id: int, phase: str, *, started_at: float, ended_at: float
    ) -> None:
        """Append a phase's timing (phases keep the order they were recorded in)."""
        if not phase:
            raise ValueError("phase name must be non-empty")
        if ended_at < started_at:
            raise ValueError(f"phase {phase!r} ends ({ended_at}) before it starts ({started_at})")
        with self._write() as conn:
            self._require_running(conn, round_id)
            seq = conn.execute(
                "SELECT coalesce(max(seq), 0) + 1 FROM phases WHERE round_id=?", (round_id,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO phases VALUES (?, ?, ?, ?, ?)",
                (round_id, seq, phase, started_at, ended_at),
            )

    def record_participants(self, round_id: int, phase_set: str, silo_ids: Iterable[str]) -> None:
        """Add silos to a phase's participant set (one of PHASE_SETS)."""
        if phase_set not in PHASE_SETS:
            raise ValueError(f"phase set must be one of {', '.join(PHASE_SETS)}; got {phase_set!r}")
        silos = sorted({_check_silo(s) for s in silo_ids})
        with self._write() as conn:
            self._require_running(conn, round_id)
            conn.executemany(
                "INSERT OR IGNORE INTO participants VALUES (?, ?, ?)",
                [(round_id, phase_set, s) for s in silos],
            )

    def record_dropout(self, round_id: int, silo_id: str, *, phase: str, reason: str) -> None:
        """Record that `silo_id` dropped out in `phase`; a silo drops at most once per round."""
        _check_silo(silo_id)
        with self._write() as conn:
            self._require_running(conn, round_id)
            try:
                conn.execute(
                    "INSERT INTO dropouts VALUES (?, ?, ?, ?)", (round_id, silo_id, phase, reason)
                )
            except sqlite3.IntegrityError as exc:
                raise RoundLogError(
                    f"silo {silo_id} already has a dropout recorded in round {round_id}"
                ) from exc

    def record_silo_stats(
        self,
        round_id: int,
        silo_id: str,
        *,
        bytes_in: int,
        bytes_out: int,
        metrics: Mapping[str, float],
    ) -> None:
        """Set a silo's traffic (bytes the coordinator received from / sent to it) and metrics.

        Called again for the same silo in a running round, it replaces the earlier figures.
        """
        _check_silo(silo_id)
        if bytes_in < 0 or bytes_out < 0:
            raise ValueError(f"byte counts must be >= 0, got in={bytes_in} out={bytes_out}")
        text = _metrics_json(metrics, f"silo {silo_id}")
        with self._write() as conn:
            self._require_running(conn, round_id)
            conn.execute(
                "INSERT OR REPLACE INTO silo_stats VALUES (?, ?, ?, ?, ?)",
                (round_id, silo_id, bytes_in, bytes_out, text),
            )

    def record_privacy(
        self,
        round_id: int,
        *,
        mechanism: str,
        noise_multiplier: float,
        clip_norm: float,
        epsilon: float,
        delta: float,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Record the round's differential-privacy figures (epsilon is the cumulative spend)."""
        text = _object_json(details or {}, "privacy details")
        with self._write() as conn:
            self._require_running(conn, round_id)
            conn.execute(
                "INSERT OR REPLACE INTO privacy VALUES (?, ?, ?, ?, ?, ?, ?)",
                (round_id, mechanism, noise_multiplier, clip_norm, epsilon, delta, text),
            )

    def finish_round(
        self,
        round_id: int,
        *,
        status: str | RoundStatus,
        ended_at: float,
        model_out_sha256: str | None = None,
        checkpoint_path: Path | str | None = None,
        checkpoint_sha256: str | None = None,
        weight_sum: float | None = None,
        global_metrics: Mapping[str, float] | None = None,
        abort_reason: str | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """Close a running round as completed or aborted (with its checkpoint, if any).

        Raises RoundLogError if the round is not running, the status is not completed/aborted,
        an aborted round has no reason, or only one of checkpoint path and hash is given.
        """
        final = RoundStatus(status)
        if final not in (RoundStatus.COMPLETED, RoundStatus.ABORTED):
            raise RoundLogError(f"a round finishes as completed or aborted, not {final.value}")
        if final is RoundStatus.ABORTED and not abort_reason:
            raise RoundLogError(f"round {round_id} is aborted but no abort_reason was given")
        if (checkpoint_path is None) != (checkpoint_sha256 is None):
            raise RoundLogError("give both checkpoint_path and checkpoint_sha256, or neither")
        metrics = _metrics_json(global_metrics or {}, f"round {round_id} global metrics")
        extra_text = _object_json(extra or {}, "extra")
        with self._write() as conn:
            self._require_running(conn, round_id)
            conn.execute(
                "UPDATE rounds SET status=?, ended_at=?, model_out_sha256=?, weight_sum=?,"
                " global_metrics=?, abort_reason=?, extra=? WHERE round_id=?",
                (
                    final.value,
                    ended_at,
                    model_out_sha256,
                    weight_sum,
                    metrics,
                    abort_reason,
                    extra_text,
                    round_id,
                ),
            )
            if checkpoint_path is not None and checkpoint_sha256 is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                    (round_id, str(checkpoint_path), checkpoint_sha256),
                )

    def record_checkpoint(self, round_id: int, path: Path | str, sha256: str) -> None:
        """Record a checkpoint outside `finish_round` (round 0: the initial model).

        A checkpoint of round N >= 1 may only be recorded while N is running or once it
        completed; a checkpoint already recorded is never replaced.
        """
        with self._write() as conn:
            if round_id >= 1:
                row = conn.execute(
                    "SELECT status FROM rounds WHERE round_id=?", (round_id,)
                ).fetchone()
                if row is None:
                    raise RoundNotFound(round_id, self._last_round_id(conn))
                if row[0] not in (RoundStatus.RUNNING.value, RoundStatus.COMPLETED.value):
                    raise RoundLogError(f"round {round_id} is {row[0]}; it has no checkpoint")
            elif round_id < 0:
                raise RoundLogError(f"checkpoint round ids start at 0, got {round_id}")
            existing = conn.execute(
                "SELECT sha256 FROM checkpoints WHERE round_id=?", (round_id,)
            ).fetchone()
            if existing is not None:
                if existing[0] == sha256:
                    return
                raise RoundLogError(
                    f"round {round_id} already has checkpoint {existing[0]}; it is never replaced"
                )
            conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", (round_id, str(path), sha256))

    def mark_interrupted(self, *, ended_at: float) -> list[int]:
        """Close rounds a crash left running as interrupted; returns their numbers."""
        with self._write() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT round_id FROM rounds WHERE status='running' ORDER BY round_id"
                )
            ]
            conn.executemany(
                "UPDATE rounds SET status='interrupted', ended_at=?, abort_reason=?"
                " WHERE round_id=?",
                [(ended_at, "coordinator stopped while the round was running", i) for i in ids],
            )
        return ids

    def record_final_evaluation(
        self,
        round_id: int,
        *,
        model_sha256: str,
        started_at: float,
        ended_at: float,
        asked: Iterable[str],
        silo_metrics: Mapping[str, Mapping[str, float]],
        refusals: Mapping[str, str] | None = None,
        global_metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Record the final evaluation of completed round `round_id`'s model, once.

        `silo_metrics` holds the silos that answered (a subset of `asked`), `refusals` those
        that declined. Raises RoundLogError if the round is not completed, `model_sha256` is
        not its model, an answer or refusal comes from a silo not asked, or the round's model
        was already evaluated (a final evaluation is never replaced).
        """
        if ended_at < started_at:
            raise ValueError(f"final evaluation ends ({ended_at}) before it starts ({started_at})")
        asked_set = sorted({_check_silo(s) for s in asked})
        answered = sorted(silo_metrics)
        refused = dict(sorted((refusals or {}).items()))
        strangers = sorted((set(answered) | set(refused)) - set(asked_set))
        if strangers:
            raise RoundLogError(
                f"final evaluation of round {round_id}: {', '.join(strangers)} answered but "
                "was not asked"
            )
        metrics_text = json.dumps(
            {s: json.loads(_metrics_json(silo_metrics[s], f"silo {s}")) for s in answered},
            sort_keys=True,
        )
        global_text = _metrics_json(global_metrics or {}, "final evaluation global metrics")
        with self._write() as conn:
            row = conn.execute(
                "SELECT status, model_out_sha256 FROM rounds WHERE round_id=?", (round_id,)
            ).fetchone()
            if row is None:
                raise RoundNotFound(round_id, self._last_round_id(conn))
            if row[0] != RoundStatus.COMPLETED.value:
                raise RoundLogError(
                    f"round {round_id} is {row[0]}; only a completed round's model is evaluated"
                )
            if row[1] != model_sha256:
                raise RoundLogError(
                    f"round {round_id}'s model is {row[1]}, not {model_sha256}; the final "
                    "evaluation records the model the round produced"
                )
            try:
                conn.execute(
                    "INSERT INTO final_evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        round_id,
                        model_sha256,
                        started_at,
                        ended_at,
                        json.dumps(asked_set),
                        json.dumps(answered),
                        json.dumps(refused, sort_keys=True),
                        metrics_text,
                        global_text,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise RoundLogError(
                    f"round {round_id}'s model already has a final evaluation; it is never replaced"
                ) from exc

    # -- reads --------------------------------------------------------------------------------

    def _last_round_id(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT coalesce(max(round_id), 0) FROM rounds").fetchone()[0])

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, tuple(args)).fetchall())
            except sqlite3.Error as exc:
                raise RoundLogUnavailable(f"cannot read round log {self.path}: {exc}") from exc

    def last_round_id(self) -> int:
        """The highest round number in the log (0 when empty)."""
        return int(self._read("SELECT coalesce(max(round_id), 0) FROM rounds")[0][0])

    def latest_checkpoint(self) -> CheckpointRecord | None:
        """The checkpoint to resume from: that of the latest completed round, else round 0."""
        rows = self._read(
            "SELECT c.round_id, c.path, c.sha256 FROM checkpoints c"
            " LEFT JOIN rounds r ON r.round_id = c.round_id"
            " WHERE c.round_id = 0 OR r.status = 'completed'"
            " ORDER BY c.round_id DESC LIMIT 1"
        )
        if not rows:
            return None
        round_id, path, sha = rows[0]
        return CheckpointRecord(round_id=int(round_id), path=Path(path), sha256=str(sha))

    def checkpoint(self, round_id: int) -> CheckpointRecord | None:
        """The checkpoint recorded for `round_id` (0: the initial model), or None."""
        rows = self._read("SELECT path, sha256 FROM checkpoints WHERE round_id=?", (round_id,))
        if not rows:
            return None
        return CheckpointRecord(round_id=round_id, path=Path(rows[0][0]), sha256=str(rows[0][1]))

    def private_rounds_completed(self) -> int:
        """Completed rounds that spent privacy (the DP accountant composes over them)."""
        rows = self._read(
            "SELECT count(*) FROM privacy JOIN rounds USING (round_id)"
            " WHERE rounds.status = 'completed'"
        )
        return int(rows[0][0])

    def final_evaluations(self) -> list[FinalEvaluation]:
        """Every recorded final evaluation, by round (at most one per federation run)."""
        if not self._has_table("final_evaluations"):
            return []
        return [
            _final_evaluation(row)
            for row in self._read(
                "SELECT round_id, model_sha256, started_at, ended_at, asked, answered, refusals,"
                " silo_metrics, global_metrics FROM final_evaluations ORDER BY round_id"
            )
        ]

    def final_evaluation(self, round_id: int) -> FinalEvaluation | None:
        """The final evaluation of round `round_id`'s model, or None."""
        if not self._has_table("final_evaluations"):
            return None
        rows = self._read(
            "SELECT round_id, model_sha256, started_at, ended_at, asked, answered, refusals,"
            " silo_metrics, global_metrics FROM final_evaluations WHERE round_id=?",
            (round_id,),
        )
        return _final_evaluation(rows[0]) if rows else None

    def rounds(self) -> list[RoundSummary]:
        """A summary of every round, in order."""
        counts: dict[tuple[int, str], int] = {
            (int(r), str(s)): int(n)
            for r, s, n in self._read(
                "SELECT round_id, phase_set, count(*) FROM participants"
                " GROUP BY round_id, phase_set"
            )
        }
        dropped: dict[int, int] = {
            int(r): int(n)
            for r, n in self._read("SELECT round_id, count(*) FROM dropouts GROUP BY round_id")
        }
        silo_metrics: dict[int, dict[SiloId, Mapping[str, float]]] = {}
        for r, silo, text in self._read(
            "SELECT round_id, silo_id, metrics FROM silo_stats ORDER BY round_id, silo_id"
        ):
            silo_metrics.setdefault(int(r), {})[SiloId(silo)] = _metrics_from_json(text)
        out: list[RoundSummary] = []
        for r, status, started, ended, aggregation, metrics in self._read(
            "SELECT round_id, status, started_at, ended_at, aggregation, global_metrics"
            " FROM rounds ORDER BY round_id"
        ):
            rid = int(r)
            out.append(
                RoundSummary(
                    round_id=rid,
                    status=RoundStatus(status),
                    started_at=float(started),
                    ended_at=None if ended is None else float(ended),
                    aggregation=str(aggregation),
                    invited=counts.get((rid, "invited"), 0),
                    finished=counts.get((rid, "finished"), 0),
                    dropped=dropped.get(rid, 0),
                    global_metrics=_metrics_from_json(metrics),
                    silo_metrics=silo_metrics.get(rid, {}),
                )
            )
        return out

    def round_detail(self, round_id: int) -> RoundDetail:
        """Everything recorded about one round; raises RoundNotFound."""
        rows = self._read(
            "SELECT status, started_at, ended_at, aggregation, config_digest, model_in_sha256,"
            " model_out_sha256, rollback_of, weight_sum, global_metrics, abort_reason, extra"
            " FROM rounds WHERE round_id=?",
            (round_id,),
        )
        if not rows:
            raise RoundNotFound(round_id, self.last_round_id())
        status, started, ended, aggregation, digest, m_in, m_out = rows[0][:7]
        rollback, wsum, gm, reason, ex = rows[0][7:]
        participants: dict[str, list[SiloId]] = {}
        for phase_set, silo in self._read(
            "SELECT phase_set, silo_id FROM participants WHERE round_id=? ORDER BY silo_id",
            (round_id,),
        ):
            participants.setdefault(str(phase_set), []).append(SiloId(silo))
        privacy_rows = self._read(
            "SELECT mechanism, noise_multiplier, clip_norm, epsilon, delta, details"
            " FROM privacy WHERE round_id=?",
            (round_id,),
        )
        checkpoint_rows = self._read(
            "SELECT path, sha256 FROM checkpoints WHERE round_id=?", (round_id,)
        )
        return RoundDetail(
            round_id=round_id,
            status=RoundStatus(status),
            started_at=float(started),
            ended_at=None if ended is None else float(ended),
            aggregation=str(aggregation),
            config_digest=str(digest),
            model_in_sha256=str(m_in),
            model_out_sha256=None if m_out is None else str(m_out),
            rollback_of=None if rollback is None else int(rollback),
            weight_sum=None if wsum is None else float(wsum),
            global_metrics=_metrics_from_json(gm),
            abort_reason=None if reason is None else str(reason),
            extra=dict(json.loads(ex)),
            phases=tuple(
                PhaseTiming(phase=str(p), started_at=float(s), ended_at=float(e))
                for p, s, e in self._read(
                    "SELECT phase, started_at, ended_at FROM phases WHERE round_id=? ORDER BY seq",
                    (round_id,),
                )
            ),
            participants={k: tuple(participants[k]) for k in PHASE_SETS if k in participants},
            dropouts=tuple(
                Dropout(silo_id=SiloId(s), phase=str(p), reason=str(why))
                for s, p, why in self._read(
                    "SELECT silo_id, phase, reason FROM dropouts WHERE round_id=? ORDER BY silo_id",
                    (round_id,),
                )
            ),
            silos=tuple(
                SiloStats(
                    silo_id=SiloId(s),
                    bytes_in=int(bi),
                    bytes_out=int(bo),
                    metrics=_metrics_from_json(m),
                )  # fmt: skip
                for s, bi, bo, m in self._read(
                    "SELECT silo_id, bytes_in, bytes_out, metrics FROM silo_stats"
                    " WHERE round_id=? ORDER BY silo_id",
                    (round_id,),
                )
            ),
            privacy=None
            if not privacy_rows
            else PrivacyRecord(
                mechanism=str(privacy_rows[0][0]),
                noise_multiplier=float(privacy_rows[0][1]),
                clip_norm=float(privacy_rows[0][2]),
                epsilon=float(privacy_rows[0][3]),
                delta=float(privacy_rows[0][4]),
                details=dict(json.loads(privacy_rows[0][5])),
            ),
            checkpoint=None
            if not checkpoint_rows
            else CheckpointRecord(
                round_id=round_id,
                path=Path(checkpoint_rows[0][0]),
                sha256=str(checkpoint_rows[0][1]),
            ),
            final_evaluation=self.final_evaluation(round_id),
        )

    def export(self) -> dict[str, Any]:
        """The whole log in its stable export form: schema version, checkpoints, every round."""
        return {
            "schema_version": SCHEMA_VERSION,
            "checkpoints": [
                {"round": int(r), "path": str(p), "sha256": str(s)}
                for r, p, s in self._read(
                    "SELECT round_id, path, sha256 FROM checkpoints ORDER BY round_id"
                )
            ],
            "rounds": [self.round_detail(s.round_id).to_dict() for s in self.rounds()],
        }

"""The round log: one SQLite file per federation recording what every round did, append-only.

Rule: it records facts about rounds — status, timings, participant sets per phase, dropouts and
their phase, bytes and evaluation metrics per silo, model and checkpoint hashes, the aggregate's
weight sum, abort reasons, privacy figures —, the final evaluation of the federation's last model
(not a round: it counts nowhere as one), and never an individual silo's update. Every write is
one transaction; a finished round (completed, aborted, interrupted) is never modified again, and
a final evaluation is written once. Timestamps are float unix seconds passed in by the caller
(no clock is read here). A log of an older schema version is upgraded when a writer opens it
(`MIGRATIONS`); a reader of a not-yet-upgraded log sees no final evaluations.

Readers open the file with `RoundLog.open_readonly` (SQLite URI ``mode=ro``) and may do so while
the coordinator writes: WAL mode lets them read the last committed state without blocking it.
Field meanings and the stable export names are documented in docs/round-log.md.

This module holds the writes and is the round log's one import; its parts are
roundlog_schema (tables, migrations), roundlog_records (what a read returns) and
roundlog_queries (the connection and the reads).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coordinator.storage.roundlog_queries import RoundLogQueries
from coordinator.storage.roundlog_records import (
    CheckpointRecord,
    Dropout,
    FinalEvaluation,
    PhaseTiming,
    PrivacyRecord,
    RoundDetail,
    RoundLogError,
    RoundLogUnavailable,
    RoundNotFound,
    RoundStatus,
    RoundSummary,
    SiloStats,
    _check_silo,
    _metrics_json,
    _object_json,
)
from coordinator.storage.roundlog_schema import LOG_FILENAME, PHASE_SETS, SCHEMA_VERSION

# The round log's public names, wherever they are defined (records and schema are its parts).
__all__ = [
    "LOG_FILENAME",
    "PHASE_SETS",
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "Dropout",
    "FinalEvaluation",
    "PhaseTiming",
    "PrivacyRecord",
    "RoundDetail",
    "RoundLog",
    "RoundLogError",
    "RoundLogUnavailable",
    "RoundNotFound",
    "RoundStatus",
    "RoundSummary",
    "SiloStats",
]


class RoundLog(RoundLogQueries):
    """The coordinator's round log. Writers construct it; readers use `open_readonly`.

    The writes are here; the connection and the reads are RoundLogQueries'.
    """

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
            self._completed = None  # under the lock, before the commit: never a stale count
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

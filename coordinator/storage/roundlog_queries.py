"""The read side of the round log: its connection, opened for writing or read-only, and every
query.

Rule: `RoundLogQueries` is the base of coordinator.storage.roundlog.RoundLog and never used
alone. Readers open the file with `RoundLog.open_readonly` (SQLite URI ``mode=ro``) and may do so
while the coordinator writes: WAL mode lets them read the last committed state without blocking
it. Every read goes through `_read`, under the connection's lock, and a failing one is a
RoundLogUnavailable; a reader of a not-yet-upgraded log sees no final evaluations.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from coordinator.storage import roundlog_records as records
from coordinator.storage.roundlog_schema import PHASE_SETS, SCHEMA_VERSION, check_version, migrate
from secagg.identity import SiloId


class RoundLogQueries:
    """The round log's connection and reads (see coordinator.storage.roundlog.RoundLog).

    Thread-safe: one connection guarded by a lock (the coordinator writes from its round driver
    and reads from its status service).
    """

    def __init__(self, path: Path, *, _readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = _readonly
        self._lock = threading.RLock()
        # count_completed's answer and the PRAGMA data_version it was counted at: status is asked
        # twice a second, so it must not count the rounds each time (cleared by finish_round).
        self._completed: tuple[int, int] | None = None
        if _readonly:
            if not self.path.is_file():
                raise records.RoundLogUnavailable(
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
                check_version(self.path, self._conn.execute("PRAGMA user_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise records.RoundLogUnavailable(
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
                with self._lock:
                    migrate(self._conn, self.path)
            except sqlite3.Error as exc:
                raise records.RoundLogUnavailable(
                    f"cannot open round log {self.path}: {exc}"
                ) from exc

    @classmethod
    def open_readonly(cls, path: Path) -> Self:
        """Open an existing log for reading only (safe while the coordinator writes).

        Raises RoundLogUnavailable if it is missing, unreadable or of an unknown schema version.
        """
        return cls(path, _readonly=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _has_table(self, name: str) -> bool:
        # A reader of a log written by an older silofed (not upgraded yet) lacks newer tables.
        rows = self._read("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return bool(rows)

    # -- reads --------------------------------------------------------------------------------

    def _last_round_id(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT coalesce(max(round_id), 0) FROM rounds").fetchone()[0])

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, tuple(args)).fetchall())
            except sqlite3.Error as exc:
                raise records.RoundLogUnavailable(
                    f"cannot read round log {self.path}: {exc}"
                ) from exc

    def last_round_id(self) -> int:
        """The highest round number in the log (0 when empty)."""
        return int(self._read("SELECT coalesce(max(round_id), 0) FROM rounds")[0][0])

    def latest_checkpoint(self) -> records.CheckpointRecord | None:
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
        return records.CheckpointRecord(round_id=int(round_id), path=Path(path), sha256=str(sha))

    def checkpoint(self, round_id: int) -> records.CheckpointRecord | None:
        """The checkpoint recorded for `round_id` (0: the initial model), or None."""
        rows = self._read("SELECT path, sha256 FROM checkpoints WHERE round_id=?", (round_id,))
        if not rows:
            return None
        return records.CheckpointRecord(
            round_id=round_id, path=Path(rows[0][0]), sha256=str(rows[0][1])
        )

    def count_completed(self) -> int:
        """How many rounds completed, without reading them: counted once, then again only after
        a round finished here or another connection committed (SQLite's data_version)."""
        with self._lock:
            version = int(self._read("PRAGMA data_version")[0][0])
            if self._completed is None or self._completed[0] != version:
                rows = self._read("SELECT count(*) FROM rounds WHERE status = 'completed'")
                self._completed = (version, int(rows[0][0]))
            return self._completed[1]

    def rounds_after(self, round_id: int) -> list[records.RoundDetail]:
        """Everything recorded about each round numbered above `round_id`, in order: a reader
        that keeps what it read of finished rounds (they never change) asks only for the rest."""
        ids = self._read(
            "SELECT round_id FROM rounds WHERE round_id > ? ORDER BY round_id", (round_id,)
        )
        return [self.round_detail(int(r)) for (r,) in ids]

    def private_rounds_completed(self) -> int:
        """Completed rounds that spent privacy (the DP accountant composes over them)."""
        rows = self._read(
            "SELECT count(*) FROM privacy JOIN rounds USING (round_id)"
            " WHERE rounds.status = 'completed'"
        )
        return int(rows[0][0])

    def final_evaluations(self) -> list[records.FinalEvaluation]:
        """Every recorded final evaluation, by round (at most one per federation run)."""
        if not self._has_table("final_evaluations"):
            return []
        return [
            records._final_evaluation(row)
            for row in self._read(
                "SELECT round_id, model_sha256, started_at, ended_at, asked, answered, refusals,"
                " silo_metrics, global_metrics FROM final_evaluations ORDER BY round_id"
            )
        ]

    def final_evaluation(self, round_id: int) -> records.FinalEvaluation | None:
        """The final evaluation of round `round_id`'s model, or None."""
        if not self._has_table("final_evaluations"):
            return None
        rows = self._read(
            "SELECT round_id, model_sha256, started_at, ended_at, asked, answered, refusals,"
            " silo_metrics, global_metrics FROM final_evaluations WHERE round_id=?",
            (round_id,),
        )
        return records._final_evaluation(rows[0]) if rows else None

    def rounds(self) -> list[records.RoundSummary]:
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
            silo_metrics.setdefault(int(r), {})[SiloId(silo)] = records._metrics_from_json(text)
        out: list[records.RoundSummary] = []
        for r, status, started, ended, aggregation, metrics in self._read(
            "SELECT round_id, status, started_at, ended_at, aggregation, global_metrics"
            " FROM rounds ORDER BY round_id"
        ):
            rid = int(r)
            out.append(
                records.RoundSummary(
                    round_id=rid,
                    status=records.RoundStatus(status),
                    started_at=float(started),
                    ended_at=None if ended is None else float(ended),
                    aggregation=str(aggregation),
                    invited=counts.get((rid, "invited"), 0),
                    finished=counts.get((rid, "finished"), 0),
                    dropped=dropped.get(rid, 0),
                    global_metrics=records._metrics_from_json(metrics),
                    silo_metrics=silo_metrics.get(rid, {}),
                )
            )
        return out

    def round_detail(self, round_id: int) -> records.RoundDetail:
        """Everything recorded about one round; raises RoundNotFound."""
        rows = self._read(
            "SELECT status, started_at, ended_at, aggregation, config_digest, model_in_sha256,"
            " model_out_sha256, rollback_of, weight_sum, global_metrics, abort_reason, extra"
            " FROM rounds WHERE round_id=?",
            (round_id,),
        )
        if not rows:
            raise records.RoundNotFound(round_id, self.last_round_id())
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
        return records.RoundDetail(
            round_id=round_id,
            status=records.RoundStatus(status),
            started_at=float(started),
            ended_at=None if ended is None else float(ended),
            aggregation=str(aggregation),
            config_digest=str(digest),
            model_in_sha256=str(m_in),
            model_out_sha256=None if m_out is None else str(m_out),
            rollback_of=None if rollback is None else int(rollback),
            weight_sum=None if wsum is None else float(wsum),
            global_metrics=records._metrics_from_json(gm),
            abort_reason=None if reason is None else str(reason),
            extra=dict(json.loads(ex)),
            phases=tuple(
                records.PhaseTiming(phase=str(p), started_at=float(s), ended_at=float(e))
                for p, s, e in self._read(
                    "SELECT phase, started_at, ended_at FROM phases WHERE round_id=? ORDER BY seq",
                    (round_id,),
                )
            ),
            participants={k: tuple(participants[k]) for k in PHASE_SETS if k in participants},
            dropouts=tuple(
                records.Dropout(silo_id=SiloId(s), phase=str(p), reason=str(why))
                for s, p, why in self._read(
                    "SELECT silo_id, phase, reason FROM dropouts WHERE round_id=? ORDER BY silo_id",
                    (round_id,),
                )
            ),
            silos=tuple(
                records.SiloStats(
                    silo_id=SiloId(s),
                    bytes_in=int(bi),
                    bytes_out=int(bo),
                    metrics=records._metrics_from_json(m),
                )  # fmt: skip
                for s, bi, bo, m in self._read(
                    "SELECT silo_id, bytes_in, bytes_out, metrics FROM silo_stats"
                    " WHERE round_id=? ORDER BY silo_id",
                    (round_id,),
                )
            ),
            privacy=None
            if not privacy_rows
            else records.PrivacyRecord(
                mechanism=str(privacy_rows[0][0]),
                noise_multiplier=float(privacy_rows[0][1]),
                clip_norm=float(privacy_rows[0][2]),
                epsilon=float(privacy_rows[0][3]),
                delta=float(privacy_rows[0][4]),
                details=dict(json.loads(privacy_rows[0][5])),
            ),
            checkpoint=None
            if not checkpoint_rows
            else records.CheckpointRecord(
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

"""The round log's final evaluation: its table, its rules, the migration of a version-1 log, and
how `rounds list|show|export` present it (it is never counted as a round)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from coordinator.storage.roundlog import (
    LOG_FILENAME,
    SCHEMA_VERSION,
    RoundLog,
    RoundLogError,
    RoundLogUnavailable,
    RoundNotFound,
)
from coordinator.storage.roundlog_schema import _upgrade
from tests.federation_helpers import run_rounds_command

A, B, C = (f"spiffe://demo/silo/{n}" for n in ("a", "b", "c"))

# The schema as silofed wrote it at version 1 (before the final evaluation existed), frozen
# here so the migration is tested against what old logs really contain.
SCHEMA_V1 = """
CREATE TABLE rounds (
    round_id INTEGER PRIMARY KEY CHECK (round_id >= 1),
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'aborted', 'interrupted')),
    started_at REAL NOT NULL, ended_at REAL, aggregation TEXT NOT NULL,
    config_digest TEXT NOT NULL, model_in_sha256 TEXT NOT NULL, model_out_sha256 TEXT,
    rollback_of INTEGER, weight_sum REAL, global_metrics TEXT NOT NULL DEFAULT '{}',
    abort_reason TEXT, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE phases (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id), seq INTEGER NOT NULL,
    phase TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL NOT NULL,
    PRIMARY KEY (round_id, seq));
CREATE TABLE participants (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    phase_set TEXT NOT NULL
        CHECK (phase_set IN ('invited', 'U1', 'U2', 'U3', 'U4', 'U5', 'finished')),
    silo_id TEXT NOT NULL, PRIMARY KEY (round_id, phase_set, silo_id));
CREATE TABLE dropouts (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id), silo_id TEXT NOT NULL,
    phase TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (round_id, silo_id));
CREATE TABLE silo_stats (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id), silo_id TEXT NOT NULL,
    bytes_in INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    metrics TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (round_id, silo_id));
CREATE TABLE privacy (
    round_id INTEGER PRIMARY KEY REFERENCES rounds(round_id), mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL, epsilon REAL NOT NULL,
    delta REAL NOT NULL, details TEXT NOT NULL DEFAULT '{}');
CREATE TABLE checkpoints (
    round_id INTEGER PRIMARY KEY CHECK (round_id >= 0), path TEXT NOT NULL,
    sha256 TEXT NOT NULL);
"""


def write_v1_log(path: Path) -> None:
    """A version-1 log with two completed rounds, as the version-1 writer left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_V1)
    conn.execute("INSERT INTO checkpoints VALUES (0, 'checkpoints/round-000000.safetensors', 'h0')")
    for r in (1, 2):
        conn.execute(
            "INSERT INTO rounds VALUES (?, 'completed', ?, ?, 'secagg', 'cfg', ?, ?, NULL, 30.0,"
            " '{\"eval_score\": 0.5}', NULL, '{}')",
            (r, 10.0 * r, 10.0 * r + 3, f"h{r - 1}", f"h{r}"),
        )
        for silo in (A, B, C):
            conn.execute("INSERT INTO participants VALUES (?, 'invited', ?)", (r, silo))
            conn.execute("INSERT INTO participants VALUES (?, 'finished', ?)", (r, silo))
        conn.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?)",
            (r, f"checkpoints/round-{r:06d}.safetensors", f"h{r}"),
        )
    conn.execute("PRAGMA user_version=1")
    conn.close()


def completed_round(log: RoundLog, r: int) -> None:
    log.start_round(
        r,
        started_at=10.0 * r,
        aggregation="secagg",
        config_digest="cfg",
        model_in_sha256=f"h{r - 1}",
        invited=[A, B, C],
    )
    log.record_participants(r, "finished", [A, B, C])
    log.finish_round(
        r,
        status="completed",
        ended_at=10.0 * r + 3,
        model_out_sha256=f"h{r}",
        checkpoint_path=f"checkpoints/round-{r:06d}.safetensors",
        checkpoint_sha256=f"h{r}",
        weight_sum=30.0,
        global_metrics={"eval_score": 0.5},
    )


def record_final(log: RoundLog, r: int = 2) -> None:
    log.record_final_evaluation(
        r,
        model_sha256=f"h{r}",
        started_at=100.0,
        ended_at=101.5,
        asked=[C, A, B],
        silo_metrics={A: {"eval_score": 0.9}, B: {"eval_score": 0.7}},
        refusals={C: "NOT_THE_FINAL_MODEL"},
        global_metrics={"eval_score": 0.8},
    )


def test_a_version_1_log_is_migrated_and_keeps_its_rounds(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILENAME
    write_v1_log(path)
    # A reader of the not-yet-upgraded log sees its rounds and no final evaluation.
    with RoundLog.open_readonly(path) as old:
        assert old.final_evaluations() == [] and old.final_evaluation(2) is None
        before = old.export()
    with RoundLog(path) as log:  # the writer upgrades it
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
        assert SCHEMA_VERSION == 2
        after = log.export()
        assert after["rounds"] == [dict(r, final_evaluation=None) for r in before["rounds"]]
        assert after["checkpoints"] == before["checkpoints"]
        record_final(log)
        completed_round(log, 3)  # and it goes on recording rounds as before
    with RoundLog(path) as again:  # opening an upgraded log changes nothing
        final = again.final_evaluation(2)
        assert final is not None and final.answered == (A, B)
        assert [r.round_id for r in again.rounds()] == [1, 2, 3]


def test_the_final_evaluation_is_recorded_once_and_read_back(tmp_path: Path) -> None:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        for r in (1, 2):
            completed_round(log, r)
        record_final(log)
        (final,) = log.final_evaluations()
        assert final.round_id == 2 and final.model_sha256 == "h2"
        assert final.asked == (A, B, C) and final.answered == (A, B)
        assert final.refusals == {C: "NOT_THE_FINAL_MODEL"}
        assert final.silo_metrics == {A: {"eval_score": 0.9}, B: {"eval_score": 0.7}}
        assert final.global_metrics == {"eval_score": 0.8}
        assert final.duration_s == pytest.approx(1.5)
        assert log.round_detail(2).final_evaluation == final
        assert log.round_detail(1).final_evaluation is None
        # Not a round: the rounds, their count and their metrics are what they were.
        assert [r.round_id for r in log.rounds()] == [1, 2]
        assert log.last_round_id() == 2
        assert log.round_detail(2).global_metrics == {"eval_score": 0.5}
        with pytest.raises(RoundLogError, match="never replaced"):
            record_final(log)


def test_the_final_evaluation_is_refused_for_a_model_no_round_produced(tmp_path: Path) -> None:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        completed_round(log, 1)
        log.start_round(
            2,
            started_at=20.0,
            aggregation="secagg",
            config_digest="cfg",
            model_in_sha256="h1",
            invited=[A],
        )
        log.finish_round(2, status="aborted", ended_at=21.0, abort_reason="too few silos")

        def final(r: int, sha: str, **kw: object) -> None:
            args: dict[str, object] = {
                "model_sha256": sha,
                "started_at": 1.0,
                "ended_at": 2.0,
                "asked": [A],
                "silo_metrics": {A: {"eval_score": 1.0}},
            }
            args.update(kw)
            log.record_final_evaluation(r, **args)  # type: ignore[arg-type]

        with pytest.raises(RoundLogError, match="aborted"):
            final(2, "h1")
        with pytest.raises(RoundNotFound):
            final(7, "h7")
        with pytest.raises(RoundLogError, match="not h9"):
            final(1, "h9")
        with pytest.raises(RoundLogError, match="was not asked"):
            final(1, "h1", silo_metrics={B: {"eval_score": 1.0}})
        with pytest.raises(ValueError, match="before it starts"):
            final(1, "h1", ended_at=0.5)
        assert log.final_evaluations() == []


def test_a_newer_schema_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILENAME
    RoundLog(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RoundLogUnavailable, match="newer"):
        RoundLog(path)


def test_a_failed_upgrade_step_is_rolled_back_and_releases_the_file(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILENAME
    write_v1_log(path)
    conn = sqlite3.connect(path, isolation_level=None)
    # A stray table of the step's name makes its CREATE TABLE fail inside the transaction.
    conn.execute("CREATE TABLE final_evaluations (x)")
    conn.close()
    with pytest.raises(RoundLogUnavailable, match="already exists"):
        RoundLog(path)
    check = sqlite3.connect(path, timeout=0.5)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 1
    # The failed writer left no transaction open: another writer takes the lock at once.
    check.execute("DROP TABLE final_evaluations")
    check.commit()
    check.close()
    with RoundLog(path) as log:
        assert [r.round_id for r in log.rounds()] == [1, 2]
        assert log._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION


def test_an_upgrade_that_finds_the_log_already_upgraded_commits_and_stops(tmp_path: Path) -> None:
    # Another writer may upgrade the file between this writer's version read and its lock.
    path = tmp_path / LOG_FILENAME
    RoundLog(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    _upgrade(conn, SCHEMA_VERSION - 1)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# ---- rounds list / show / export ------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        for r in (1, 2):
            completed_round(log, r)
        record_final(log)
    return tmp_path


def test_list_ends_with_the_final_line(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "list", "--state-dir", str(state_dir), "--json"], capsys
    )
    assert code == 0
    doc = json.loads(out)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    (final,) = doc["final_evaluations"]
    assert final["round"] == 2 and final["metric"] == "eval_score"
    assert (final["asked"], final["answered"], final["refused"]) == (3, 2, 1)
    assert final["global"] == 0.8
    assert (final["worst_silo"], final["worst_silo_value"]) == (B, 0.7)
    code, out, _ = run_rounds_command(["rounds", "list", "--state-dir", str(state_dir)], capsys)
    last_row = [line for line in out.splitlines() if "final (2)" in line]
    assert code == 0 and len(last_row) == 1 and "0.8000" in last_row[0] and "evaluated" in out


def test_show_and_export_carry_the_final_evaluation(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "show", "2", "--state-dir", str(state_dir), "--json"], capsys
    )
    final = json.loads(out)["final_evaluation"]
    assert code == 0 and final["model_sha256"] == "h2"
    assert final["asked"] == [A, B, C] and final["answered"] == [A, B]
    assert final["refusals"] == {C: "NOT_THE_FINAL_MODEL"}
    assert final["silos"] == [
        {"silo_id": A, "metrics": {"eval_score": 0.9}},
        {"silo_id": B, "metrics": {"eval_score": 0.7}},
    ]
    code, out, _ = run_rounds_command(
        ["rounds", "show", "2", "--state-dir", str(state_dir)], capsys
    )
    assert code == 0 and "final evaluation of this round's model" in out
    assert "refused: NOT_THE_FINAL_MODEL" in out and "2 of 3 silos answered" in out
    code, out, _ = run_rounds_command(
        ["rounds", "show", "1", "--state-dir", str(state_dir), "--json"], capsys
    )
    assert json.loads(out)["final_evaluation"] is None

    code, out, _ = run_rounds_command(
        ["rounds", "export", "--format", "csv", "--state-dir", str(state_dir)], capsys
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    facts = {(r["round"], r["scope"], r["subject"], r["field"]): r["value"] for r in rows}
    assert facts[("2", "final_evaluation", "", "model_sha256")] == "h2"
    assert facts[("2", "final_global_metric", "", "eval_score")] == "0.8"
    assert facts[("2", "final_silo_metric", B, "eval_score")] == "0.7"
    assert facts[("2", "final_refusal", C, "reason")] == "NOT_THE_FINAL_MODEL"
    asked = [
        r["value"] for r in rows if r["scope"] == "final_participant" and r["subject"] == "asked"
    ]
    assert asked == [A, B, C]
    assert not [r for r in rows if r["round"] == "1" and r["scope"].startswith("final")]

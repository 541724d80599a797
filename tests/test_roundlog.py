"""The round log: what it records, what it refuses, and that it survives crashes and restarts."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.storage.roundlog import (
    PHASE_SETS,
    RoundLog,
    RoundLogError,
    RoundLogUnavailable,
    RoundNotFound,
    RoundStatus,
)
from secagg.identity import SiloId

ROOT = Path(__file__).resolve().parent.parent
INVITED = ["spiffe://demo/silo/a", "spiffe://demo/silo/b", "spiffe://demo/silo/c"]


def run_round(log: RoundLog, round_id: int, *, t0: float, drop: str | None = None) -> None:
    log.start_round(
        round_id,
        started_at=t0,
        aggregation="secagg",
        config_digest="cfg-1",
        model_in_sha256=f"in-{round_id}",
        invited=INVITED,
    )
    survivors = [s for s in INVITED if s != drop]
    log.record_participants(round_id, "U1", INVITED)
    log.record_phase(round_id, "advertise_keys", started_at=t0, ended_at=t0 + 0.5)
    if drop is not None:
        log.record_dropout(round_id, drop, phase="masked_input", reason="deadline passed")
    log.record_participants(round_id, "U2", survivors)
    log.record_phase(round_id, "masked_input", started_at=t0 + 0.5, ended_at=t0 + 2.0)
    log.record_participants(round_id, "finished", survivors)
    for i, silo in enumerate(INVITED):
        log.record_silo_stats(
            round_id,
            silo,
            bytes_in=1000 + i,
            bytes_out=2000 + i,
            metrics={"loss": 0.5 - i / 10, "accuracy": 0.8 + i / 100},
        )
    log.finish_round(
        round_id,
        status="completed",
        ended_at=t0 + 3.0,
        model_out_sha256=f"out-{round_id}",
        checkpoint_path=f"checkpoints/round-{round_id:06d}.safetensors",
        checkpoint_sha256=f"out-{round_id}",
        weight_sum=300.0 + round_id,
        global_metrics={"accuracy": 0.9 + round_id / 100},
    )


@pytest.fixture
def log(tmp_path: Path) -> RoundLog:
    return RoundLog(tmp_path / "rounds.sqlite")


def test_round_detail_holds_everything_recorded(log: RoundLog) -> None:
    run_round(log, 1, t0=100.0, drop=INVITED[1])
    log.start_round(
        2,
        started_at=200.0,
        aggregation="secagg",
        config_digest="cfg-2",
        model_in_sha256="out-1",
        invited=INVITED,
    )
    log.record_privacy(
        2, mechanism="gaussian", noise_multiplier=1.1, clip_norm=0.5, epsilon=2.5, delta=1e-5
    )
    log.finish_round(2, status="aborted", ended_at=203.5, abort_reason="fewer than t in U3")

    d = log.round_detail(1)
    assert d.status is RoundStatus.COMPLETED
    assert (d.started_at, d.ended_at, d.duration_s) == (100.0, 103.0, 3.0)
    assert d.config_digest == "cfg-1"
    assert (d.model_in_sha256, d.model_out_sha256) == ("in-1", "out-1")
    assert d.weight_sum == 301.0
    assert [(p.phase, p.duration_s) for p in d.phases] == [
        ("advertise_keys", 0.5),
        ("masked_input", 1.5),
    ]
    assert d.participants["invited"] == tuple(sorted(INVITED))
    assert d.participants["U2"] == (INVITED[0], INVITED[2])
    assert list(d.participants) == ["invited", "U1", "U2", "finished"]
    assert [(x.silo_id, x.phase, x.reason) for x in d.dropouts] == [
        (INVITED[1], "masked_input", "deadline passed")
    ]
    assert [(s.bytes_in, s.bytes_out) for s in d.silos] == [
        (1000, 2000),
        (1001, 2001),
        (1002, 2002),
    ]
    assert d.silos[2].metrics == {"accuracy": 0.8 + 2 / 100, "loss": 0.5 - 2 / 10}  # exact
    assert d.checkpoint is not None and d.checkpoint.sha256 == "out-1"
    assert d.privacy is None

    a = log.round_detail(2)
    assert a.status is RoundStatus.ABORTED
    assert a.abort_reason == "fewer than t in U3"
    assert a.privacy is not None and (a.privacy.epsilon, a.privacy.delta) == (2.5, 1e-5)
    assert a.checkpoint is None

    summaries = log.rounds()
    assert [(s.round_id, s.invited, s.finished, s.dropped) for s in summaries] == [
        (1, 3, 2, 1),
        (2, 3, 0, 0),
    ]
    assert summaries[0].silo_metrics[SiloId(INVITED[0])]["accuracy"] == 0.8
    assert log.last_round_id() == 2


def test_export_is_plain_json_with_stable_names(log: RoundLog) -> None:
    log.record_checkpoint(0, "checkpoints/round-000000.safetensors", "init")
    run_round(log, 1, t0=10.0)
    exported = json.loads(json.dumps(log.export(), allow_nan=False))
    assert exported["schema_version"] == 2
    assert [c["round"] for c in exported["checkpoints"]] == [0, 1]
    r = exported["rounds"][0]
    assert set(r) == {
        "round", "status", "started_at", "ended_at", "duration_s", "aggregation",
        "config_digest", "model_in_sha256", "model_out_sha256", "rollback_of", "weight_sum",
        "global_metrics", "abort_reason", "extra", "phases", "participants", "dropouts",
        "silos", "privacy", "checkpoint", "final_evaluation",
    }  # fmt: skip
    assert r["silos"][0] == {
        "silo_id": INVITED[0],
        "bytes_in": 1000,
        "bytes_out": 2000,
        "metrics": {"accuracy": 0.8, "loss": 0.5},
    }


def test_metrics_are_sorted_json_and_non_finite_becomes_null(log: RoundLog) -> None:
    run_round(log, 1, t0=0.0)
    log.start_round(
        2, started_at=5, aggregation="x", config_digest="c", model_in_sha256="m", invited=INVITED
    )
    log.record_silo_stats(2, INVITED[0], bytes_in=1, bytes_out=1, metrics={"z": 1.0, "a": math.nan})
    raw = (
        sqlite3.connect(log.path)
        .execute("SELECT metrics FROM silo_stats WHERE round_id=2")
        .fetchone()[0]
    )
    assert raw == '{"a": null, "z": 1.0}'
    assert math.isnan(log.round_detail(2).silos[0].metrics["a"])
    assert json.loads(json.dumps(log.export(), allow_nan=False))["rounds"][1]["silos"][0][
        "metrics"
    ] == {"a": None, "z": 1.0}


def test_finished_round_is_never_modified(log: RoundLog) -> None:
    run_round(log, 1, t0=0.0)
    writes: list[Callable[[], None]] = [
        lambda: log.record_phase(1, "late", started_at=9, ended_at=10),
        lambda: log.record_participants(1, "U3", INVITED),
        lambda: log.record_dropout(1, INVITED[0], phase="late", reason="x"),
        lambda: log.record_silo_stats(1, INVITED[0], bytes_in=0, bytes_out=0, metrics={}),
        lambda: log.finish_round(1, status="aborted", ended_at=20, abort_reason="again"),
    ]
    before = log.export()
    for write in writes:
        with pytest.raises(RoundLogError, match="already completed"):
            write()
    assert log.export() == before


def test_refusals_name_the_problem(log: RoundLog) -> None:
    run_round(log, 1, t0=0.0)
    with pytest.raises(RoundLogError, match="next round is 2"):
        run_round(log, 1, t0=0.0)
    with pytest.raises(RoundNotFound, match=r"round 7 is not in the round log \(rounds are"):
        log.round_detail(7)
    with pytest.raises(RoundNotFound):
        log.record_phase(7, "x", started_at=0, ended_at=1)
    log.start_round(
        2, started_at=5, aggregation="x", config_digest="c", model_in_sha256="m", invited=INVITED
    )
    with pytest.raises(ValueError, match="phase set must be one of"):
        log.record_participants(2, "U9", INVITED)
    with pytest.raises(RoundLogError, match="no abort_reason"):
        log.finish_round(2, status="aborted", ended_at=6)
    with pytest.raises(RoundLogError, match="both checkpoint_path and checkpoint_sha256"):
        log.finish_round(2, status="completed", ended_at=6, checkpoint_path="p")
    with pytest.raises(RoundLogError, match="completed or aborted"):
        log.finish_round(2, status="interrupted", ended_at=6)
    log.record_dropout(2, INVITED[0], phase="U1", reason="gone")
    with pytest.raises(RoundLogError, match="already has a dropout"):
        log.record_dropout(2, INVITED[0], phase="U2", reason="gone again")
    # Refused writes left nothing behind: round 2 is still running, one dropout.
    detail = log.round_detail(2)
    assert detail.status is RoundStatus.RUNNING
    assert len(detail.dropouts) == 1
    assert set(PHASE_SETS) >= set(detail.participants)


def test_checkpoints_resume_from_latest_completed_round(log: RoundLog) -> None:
    assert log.latest_checkpoint() is None
    log.record_checkpoint(0, "c0", "h0")
    latest = log.latest_checkpoint()
    assert latest is not None and (latest.round_id, latest.sha256) == (0, "h0")
    run_round(log, 1, t0=0.0)
    log.start_round(
        2, started_at=5, aggregation="x", config_digest="c", model_in_sha256="m", invited=INVITED
    )
    log.record_checkpoint(2, "c2", "h2")  # written, but round 2 never completes
    log.mark_interrupted(ended_at=9.0)
    latest = log.latest_checkpoint()
    assert latest is not None and (latest.round_id, latest.sha256) == (1, "out-1")
    with pytest.raises(RoundLogError, match="never replaced"):
        log.record_checkpoint(0, "c0", "other")


def test_readonly_reader_sees_committed_state_while_writer_holds_a_transaction(
    log: RoundLog,
) -> None:
    run_round(log, 1, t0=0.0)
    reader = RoundLog.open_readonly(log.path)
    with log._write() as conn:  # the coordinator mid-write
        conn.execute(
            "INSERT INTO rounds (round_id, status, started_at, aggregation, config_digest,"
            " model_in_sha256) VALUES (2, 'running', 1, 'x', 'c', 'm')"
        )
        assert [s.round_id for s in reader.rounds()] == [1]
    assert [s.round_id for s in reader.rounds()] == [1, 2]
    with pytest.raises(RoundLogError, match="read-only"):
        reader.mark_interrupted(ended_at=0)
    reader.close()


def test_readonly_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(RoundLogUnavailable, match="--state-dir"):
        RoundLog.open_readonly(missing)
    assert not missing.exists()
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(RoundLogUnavailable, match="not a silofed round log"):
        RoundLog.open_readonly(other)
    with pytest.raises(RoundLogUnavailable, match="not a silofed round log"):
        RoundLog(other)
    newer = tmp_path / "newer.sqlite"
    RoundLog(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version=99")
    conn.commit()
    conn.close()
    with pytest.raises(RoundLogUnavailable, match="upgrade silofed"):
        RoundLog.open_readonly(newer)
    text = tmp_path / "text.sqlite"
    text.write_text("hello, not a database at all " * 10)
    with pytest.raises(RoundLogUnavailable):
        RoundLog.open_readonly(text)


def test_schema_has_no_place_for_an_update(log: RoundLog) -> None:
    conn = sqlite3.connect(log.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert len(tables) >= 7
    for table in tables:
        types = {r[2].upper() for r in conn.execute(f"PRAGMA table_info({table})")}
        assert "BLOB" not in types, table


CRASHER = """
import os, sys
from pathlib import Path
from coordinator.storage.roundlog import RoundLog
log = RoundLog(Path(sys.argv[1]))
start = log.last_round_id() + 1
for r in range(start, start + 2):
    log.start_round(r, started_at=float(r), aggregation="x", config_digest="c",
                    model_in_sha256="m", invited=["s"])
    log.record_participants(r, "finished", ["s"])
    log.finish_round(r, status="completed", ended_at=r + 0.5, checkpoint_path=f"c{r}",
                     checkpoint_sha256=f"h{r}")
r = start + 2
log.start_round(r, started_at=float(r), aggregation="x", config_digest="c",
                model_in_sha256="m", invited=["s"])
log.record_phase(r, "train", started_at=r, ended_at=r + 0.1)
os._exit(3)  # crash: no close, no cleanup, round left running
"""


def test_log_survives_a_crashing_writer_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "rounds.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", CRASHER, str(path)],
            cwd=ROOT,
            env=env,
            timeout=60,
            capture_output=True,
        )
        assert proc.returncode == 3, proc.stderr.decode()
        restarted = RoundLog(path)
        interrupted = restarted.mark_interrupted(ended_at=1000.0)
        assert interrupted == [restarted.last_round_id()]
        restarted.close()
    final = RoundLog.open_readonly(path)
    statuses = [(s.round_id, s.status.value) for s in final.rounds()]
    assert statuses == [
        (1, "completed"),
        (2, "completed"),
        (3, "interrupted"),
        (4, "completed"),
        (5, "completed"),
        (6, "interrupted"),
    ]
    latest = final.latest_checkpoint()
    assert latest is not None and (latest.round_id, latest.sha256) == (5, "h5")
    assert final.round_detail(6).phases[0].phase == "train"
    assert final.round_detail(6).abort_reason == "coordinator stopped while the round was running"


silo_names = st.sampled_from([f"spiffe://fed/silo/s{i}" for i in range(6)])
metric_values = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=30, deadline=None)
@given(
    invited=st.sets(silo_names, min_size=1),
    u1=st.sets(silo_names),
    stats=st.dictionaries(
        silo_names,
        st.tuples(
            st.integers(0, 2**40),
            st.integers(0, 2**40),
            st.dictionaries(st.text(min_size=1, max_size=8), metric_values, max_size=3),
        ),
        max_size=4,
    ),
    weight=st.floats(min_value=0, max_value=1e12),
)
def test_what_is_written_is_what_is_read(
    tmp_path_factory: pytest.TempPathFactory,
    invited: set[str],
    u1: set[str],
    stats: dict[str, tuple[int, int, dict[str, float]]],
    weight: float,
) -> None:
    path = tmp_path_factory.mktemp("prop") / "rounds.sqlite"
    with RoundLog(path) as log:
        log.start_round(
            1,
            started_at=0,
            aggregation="a",
            config_digest="c",
            model_in_sha256="m",
            invited=invited,
        )
        log.record_participants(1, "U1", u1)
        for silo, (b_in, b_out, metrics) in stats.items():
            log.record_silo_stats(1, silo, bytes_in=b_in, bytes_out=b_out, metrics=metrics)
        log.finish_round(1, status="completed", ended_at=1, weight_sum=weight)
    with RoundLog.open_readonly(path) as reader:
        d = reader.round_detail(1)
        json.dumps(reader.export(), allow_nan=False)  # always valid JSON
    assert set(d.participants["invited"]) == invited
    assert set(d.participants.get("U1", ())) == u1
    assert d.weight_sum == weight
    assert {s.silo_id for s in d.silos} == set(stats)
    for s in d.silos:
        b_in, b_out, metrics = stats[s.silo_id]
        assert (s.bytes_in, s.bytes_out) == (b_in, b_out)
        assert set(s.metrics) == set(metrics)
        for key, value in metrics.items():
            got = s.metrics[key]
            assert got == value if math.isfinite(value) else math.isnan(got)


def test_concurrent_writers_in_one_process_do_not_interleave(log: RoundLog) -> None:
    log.start_round(
        1, started_at=0, aggregation="a", config_digest="c", model_in_sha256="m", invited=INVITED
    )

    def report(i: int) -> None:
        silo = f"spiffe://demo/silo/t{i}"
        log.record_silo_stats(1, silo, bytes_in=i, bytes_out=i, metrics={"k": float(i)})
        log.record_phase(1, f"p{i}", started_at=i, ended_at=i + 1)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    d = log.round_detail(1)
    assert sorted(s.bytes_in for s in d.silos) == list(range(16))
    assert len({p.phase for p in d.phases}) == 16

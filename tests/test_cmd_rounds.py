"""`rounds list|show|export|plot` against a round log populated through the RoundLog API."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.commands.rounds_views import CSV_FIELDS
from coordinator.storage.roundlog import LOG_FILENAME, RoundLog
from tests.federation_helpers import run_rounds_command

ROOT = Path(__file__).resolve().parent.parent
A, B, C = (f"spiffe://demo/silo/{n}" for n in ("a", "b", "c"))


def populate(log: RoundLog) -> None:
    log.record_checkpoint(0, "checkpoints/round-000000.safetensors", "h0")
    accuracies = {1: (0.7, 0.8, 0.9), 2: (0.75, None, 0.95), 3: (0.8, 0.85, 0.9)}
    for r, accs in accuracies.items():
        t0 = 1_700_000_000.0 + 100 * r
        log.start_round(
            r,
            started_at=t0,
            aggregation="plaintext-insecure",
            config_digest="cfg",
            model_in_sha256=f"h{r - 1}",
            invited=[A, B, C],
        )
        log.record_phase(r, "offer", started_at=t0, ended_at=t0 + 1)
        log.record_phase(r, "train", started_at=t0 + 1, ended_at=t0 + 4)
        finished = [s for s, acc in zip((A, B, C), accs, strict=True) if acc is not None]
        if r == 2:
            log.record_dropout(r, B, phase="train", reason="deadline train_s passed")
        for silo, acc in zip((A, B, C), accs, strict=True):
            if acc is not None:
                log.record_silo_stats(
                    r,
                    silo,
                    bytes_in=5000,
                    bytes_out=7000,
                    metrics={"accuracy": acc, "loss": 1 - acc},
                )
        log.record_participants(r, "finished", finished)
        if r == 2:
            log.record_privacy(
                r, mechanism="gaussian", noise_multiplier=1.2, clip_norm=1.0, epsilon=0.75,
                delta=1e-5,
            )  # fmt: skip
        if r == 3:
            log.finish_round(r, status="aborted", ended_at=t0 + 5, abort_reason="only 1 silo left")
        else:
            log.finish_round(
                r,
                status="completed",
                ended_at=t0 + 5,
                model_out_sha256=f"h{r}",
                checkpoint_path=f"checkpoints/round-{r:06d}.safetensors",
                checkpoint_sha256=f"h{r}",
                weight_sum=300.0,
                global_metrics={"accuracy": 0.9 + r / 100, "loss": 0.1},
            )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        populate(log)
    return tmp_path


def test_list_json_reports_counts_global_and_worst_silo(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "list", "--state-dir", str(state_dir), "--json"], capsys
    )
    assert code == 0
    rows = json.loads(out)["rounds"]
    assert [(r["round"], r["status"]) for r in rows] == [
        (1, "completed"),
        (2, "completed"),
        (3, "aborted"),
    ]
    assert [(r["invited"], r["finished"], r["dropped"]) for r in rows] == [
        (3, 3, 0),
        (3, 2, 1),
        (3, 3, 0),
    ]
    assert [r["global"] for r in rows] == [0.91, 0.92, None]
    assert [(r["worst_silo"], r["worst_silo_value"]) for r in rows] == [
        (A, 0.7),
        (A, 0.75),
        (A, 0.8),
    ]
    assert rows[0]["duration_s"] == 5.0
    code, out, _ = run_rounds_command(
        ["rounds", "list", "--log", str(state_dir / LOG_FILENAME), "--json", "--metric", "loss"],
        capsys,
    )
    # For a loss the worst silo is the one with the highest value.
    assert [r["worst_silo_value"] for r in json.loads(out)["rounds"]] == pytest.approx(
        [0.3, 0.25, 0.2]
    )


def test_list_table_for_people(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_rounds_command(["rounds", "list", "--state-dir", str(state_dir)], capsys)
    assert code == 0
    assert "aborted" in out and "completed" in out
    assert "0.9100" in out and "0.7000 (a)" in out  # the worst silo, by its id's last segment
    assert "2023-11-14 22:15:00" in out  # round 1's start, UTC


def test_show_json_is_the_round_detail(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "show", "2", "--state-dir", str(state_dir), "--json"], capsys
    )
    assert code == 0
    shown = json.loads(out)
    assert shown.pop("spread") == {}  # no eval_* metric here (tests/test_rounds_spread.py)
    with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
        assert shown == json.loads(json.dumps(log.round_detail(2).to_dict()))
    assert shown["dropouts"] == [
        {"silo_id": B, "phase": "train", "reason": "deadline train_s passed"}
    ]
    assert shown["privacy"]["epsilon"] == 0.75


def test_show_table_has_phases_dropouts_bytes_and_reasons(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "show", "2", "--state-dir", str(state_dir)], capsys
    )
    assert code == 0
    for fragment in (
        "offer",
        "3.000 s",
        "deadline train_s passed",
        "5,000",
        "7,000",
        "epsilon 0.75",
    ):
        assert fragment in out, fragment
    code, out, _ = run_rounds_command(
        ["rounds", "show", "3", "--state-dir", str(state_dir)], capsys
    )
    assert "only 1 silo left" in out


def test_errors_say_what_to_do(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_rounds_command(
        ["rounds", "show", "99", "--state-dir", str(state_dir)], capsys
    )
    assert code == 1
    assert "round 99 is not in the round log (rounds are numbered 1..3)" in err
    code, _, err = run_rounds_command(
        ["rounds", "list", "--state-dir", str(state_dir / "nope")], capsys
    )
    assert code == 1 and "does not exist" in err
    code, _, err = run_rounds_command(["rounds", "list"], capsys)
    assert code == 1 and "--state-dir DIR" in err
    code, _, err = run_rounds_command(
        ["rounds", "list", "--log", str(state_dir / "missing.sqlite")], capsys
    )
    assert code == 1 and "no round log at" in err
    (state_dir / "junk.sqlite").write_bytes(b"definitely not sqlite" * 50)
    code, _, err = run_rounds_command(
        ["rounds", "list", "--log", str(state_dir / "junk.sqlite")], capsys
    )
    assert code == 1 and err.startswith("error: ")


def test_export_json_round_trips_the_log(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_rounds_command(
        ["rounds", "export", "--format", "json", "--state-dir", str(state_dir)], capsys
    )
    assert code == 0
    exported = json.loads(out)
    assert [r.pop("spread") for r in exported["rounds"]] == [{}, {}, {}]  # no eval_* metric
    with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
        assert exported == json.loads(json.dumps(log.export()))
    assert [c["round"] for c in exported["checkpoints"]] == [0, 1, 2]


def test_export_csv_long_format(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = state_dir / "log.csv"
    code, _, err = run_rounds_command(
        ["rounds", "export", "--format", "csv", "-o", str(target), "--state-dir", str(state_dir)],
        capsys,
    )
    assert code == 0 and "wrote 3 rounds as csv" in err
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert tuple(rows[0]) == CSV_FIELDS
    facts: dict[tuple[str, str, str, str], str] = {
        (r["round"], r["scope"], r["subject"], r["field"]): r["value"] for r in rows
    }
    assert facts[("2", "dropout", B, "phase")] == "train"
    assert facts[("2", "silo", C, "bytes_out")] == "7000"
    assert float(facts[("2", "silo_metric", C, "accuracy")]) == 0.95
    assert facts[("3", "round", "", "abort_reason")] == "only 1 silo left"
    assert facts[("2", "privacy", "", "noise_multiplier")] == "1.2"
    assert facts[("0", "checkpoint", "", "sha256")] == "h0"
    participants = [r["value"] for r in rows if r["scope"] == "participant" and r["round"] == "2"]
    assert sorted(participants) == sorted([A, B, C, A, C])


def test_plot_writes_png_with_every_series(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = state_dir / "acc.png"
    code, out, _ = run_rounds_command(
        ["rounds", "plot", "--metric", "accuracy", "-o", str(target), "--state-dir", str(state_dir),
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["series"] == {"global": 2, A: 3, B: 2, C: 3}
    assert summary["dropouts"] == [{"round": 2, "silo_id": B, "phase": "train"}]
    assert summary["not_completed"] == [3]
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_plot_unknown_metric_lists_known_ones(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = state_dir / "x.png"
    code, _, err = run_rounds_command(
        ["rounds", "plot", "--metric", "auc", "-o", str(target), "--state-dir", str(state_dir)],
        capsys,
    )
    assert code == 1
    assert "no round recorded metric 'auc'; metrics in this log: accuracy, loss" in err
    assert not target.exists()


def test_reads_while_the_coordinator_is_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = RoundLog(tmp_path / LOG_FILENAME)
    populate(writer)
    writer.start_round(
        4, started_at=2e9, aggregation="x", config_digest="c", model_in_sha256="h2", invited=[A]
    )
    code, out, _ = run_rounds_command(
        ["rounds", "list", "--state-dir", str(tmp_path), "--json"], capsys
    )
    assert code == 0
    assert json.loads(out)["rounds"][-1]["status"] == "running"
    writer.close()


def test_console_script_wiring(state_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "rounds", "list", "--state-dir", str(state_dir),
         "--json"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)["rounds"]
    assert len(rows) == 3


def test_list_defaults_to_the_agents_eval_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        log.start_round(
            1, started_at=0, aggregation="x", config_digest="c", model_in_sha256="m", invited=[A, B]
        )
        for silo, acc in ((A, 0.6), (B, 0.4)):
            log.record_silo_stats(
                1, silo, bytes_in=1, bytes_out=1, metrics={"eval_accuracy": acc, "train_loss": 2.0}
            )
        log.finish_round(
            1, status="completed", ended_at=1, global_metrics={"eval_accuracy": 0.5, "aaa": 9.0}
        )
    code, out, _ = run_rounds_command(
        ["rounds", "list", "--state-dir", str(tmp_path), "--json"], capsys
    )
    row = json.loads(out)["rounds"][0]
    assert (row["metric"], row["global"], row["worst_silo"]) == ("eval_accuracy", 0.5, B)
    code, out, _ = run_rounds_command(["rounds", "list", "--state-dir", str(tmp_path)], capsys)
    assert "global eval_accuracy" in out

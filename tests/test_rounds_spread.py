"""The spread of a metric across silos (coordinator.commands.rounds_spread): the one function on
hand numbers, then what `rounds list|show|export|plot` print from a real round log on disk."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from coordinator.commands.rounds_spread import (
    Spread,
    eval_spreads,
    lower_is_better,
    spread,
    spread_columns,
)
from coordinator.storage.roundlog import LOG_FILENAME, RoundLog
from secagg.identity import SiloId
from tests.federation_helpers import run_rounds_command

A, B, C, D = (SiloId(f"spiffe://fair/silo/{n}") for n in ("a", "b", "c", "d"))
THIRD_OF_0_08 = math.sqrt(0.08 / 3)  # population std of (x−0.2, x, x+0.2) and of (x, x±0.2)


# ---- the function ------------------------------------------------------------------------------


def test_mean_std_worst_best_n_on_hand_numbers() -> None:
    got = spread(
        {A: {"eval_accuracy": 0.6}, B: {"eval_accuracy": 0.8}, C: {"eval_accuracy": 1.0}},
        "eval_accuracy",
    )
    assert got is not None
    assert got.n == 3
    assert got.mean == pytest.approx(0.8)
    # population std: sqrt(((0.6−0.8)² + 0² + (1.0−0.8)²) / 3), not the sample's (/2 → 0.2)
    assert got.std == pytest.approx(THIRD_OF_0_08)
    assert (got.worst, got.worst_silo, got.best, got.best_silo) == (0.6, A, 1.0, C)


def test_for_losses_and_errors_the_worst_is_the_highest() -> None:
    metrics = {
        A: {"eval_loss": 0.9, "eval_Error_rate": 0.1},
        B: {"eval_loss": 0.1, "eval_Error_rate": 0.3},
    }
    loss = spread(metrics, "eval_loss")
    error = spread(metrics, "eval_Error_rate")
    assert loss is not None and error is not None
    assert (loss.worst, loss.worst_silo, loss.best, loss.best_silo) == (0.9, A, 0.1, B)
    assert (error.worst_silo, error.best_silo) == (B, A)
    assert [lower_is_better(m) for m in ("eval_loss", "MSE_ERROR", "eval_auc", "accuracy")] == [
        True,
        True,
        False,
        False,
    ]


def test_non_finite_values_and_absent_metrics_are_left_out() -> None:
    metrics = {
        A: {"eval_accuracy": 0.5},
        B: {"eval_accuracy": math.nan},  # a diverged silo (stored as null, read back as NaN)
        C: {"eval_accuracy": math.inf},
        D: {"train_loss": 1.0},
    }
    got = spread(metrics, "eval_accuracy")
    assert got is not None
    assert (got.n, got.mean, got.std, got.worst_silo, got.best_silo) == (1, 0.5, 0.0, A, A)
    assert spread(metrics, "eval_auc") is None
    assert spread({}, "eval_accuracy") is None
    assert spread({B: {"eval_accuracy": math.nan}}, "eval_accuracy") is None


def test_ties_go_to_the_first_silo_id_whatever_the_order_given() -> None:
    forward = spread({A: {"m": 0.5}, B: {"m": 0.5}, C: {"m": 0.5}}, "m")
    backward = spread({C: {"m": 0.5}, B: {"m": 0.5}, A: {"m": 0.5}}, "m")
    assert forward == backward
    assert forward is not None and (forward.worst_silo, forward.best_silo, forward.std) == (
        A,
        A,
        0.0,
    )


def test_eval_spreads_and_export_columns_cover_eval_metrics_only() -> None:
    metrics = {
        A: {"eval_accuracy": 0.6, "eval_loss": 0.4, "train_loss": 0.1},
        B: {"eval_accuracy": 0.8, "train_loss": 0.2},
    }
    assert list(eval_spreads(metrics)) == ["eval_accuracy", "eval_loss"]
    columns = spread_columns(metrics)
    assert columns == {
        "eval_accuracy_n": 2,
        "eval_accuracy_mean": pytest.approx(0.7),
        "eval_accuracy_std": pytest.approx(0.1),
        "eval_accuracy_worst": 0.6,
        "eval_accuracy_worst_silo": A,
        "eval_accuracy_best": 0.8,
        "eval_accuracy_best_silo": B,
        "eval_loss_n": 1,
        "eval_loss_mean": 0.4,
        "eval_loss_std": 0.0,
        "eval_loss_worst": 0.4,
        "eval_loss_worst_silo": A,
        "eval_loss_best": 0.4,
        "eval_loss_best_silo": A,
    }
    assert isinstance(next(iter(eval_spreads(metrics).values())), Spread)


# ---- the commands, on a round log on disk ------------------------------------------------------


def populate(log: RoundLog) -> None:
    """Round 1: three silos, D silent. Round 2: B diverged (NaN), D reported then dropped, so
    the silos' mean (A, C, D) is not the global value (finishing silos A, C). Round 3 aborted
    with no metrics. Then the final evaluation of round 2's model."""
    per_round: dict[int, dict[SiloId, dict[str, float]]] = {
        1: {
            A: {"eval_accuracy": 0.6, "eval_loss": 0.9, "train_loss": 0.3},
            B: {"eval_accuracy": 0.8, "eval_loss": 0.5, "train_loss": 0.2},
            C: {"eval_accuracy": 1.0, "eval_loss": 0.1, "train_loss": 0.1},
        },
        2: {
            A: {"eval_accuracy": 0.7, "eval_loss": 0.6},
            B: {"eval_accuracy": math.nan, "eval_loss": math.nan},
            C: {"eval_accuracy": 0.9, "eval_loss": 0.2},
            D: {"eval_accuracy": 0.5, "eval_loss": 1.2},
        },
        3: {},
    }
    for r, silos in per_round.items():
        log.start_round(
            r,
            started_at=1_800_000_000.0 + 60 * r,
            aggregation="secagg",
            config_digest="cfg",
            model_in_sha256=f"h{r - 1}",
            invited=[A, B, C, D],
        )
        for silo, metrics in silos.items():
            log.record_silo_stats(r, silo, bytes_in=100, bytes_out=200, metrics=metrics)
        if r == 2:
            log.record_dropout(r, D, phase="masked", reason="stream closed")
        if r == 3:
            log.finish_round(r, status="aborted", ended_at=1_800_000_200.0, abort_reason="x")
            continue
        finished = [A, B, C] if r == 1 else [A, C]
        log.record_participants(r, "finished", finished)
        log.finish_round(
            r,
            status="completed",
            ended_at=1_800_000_000.0 + 60 * r + 5,
            model_out_sha256=f"h{r}",
            checkpoint_path=f"checkpoints/round-{r:06d}.safetensors",
            checkpoint_sha256=f"h{r}",
            weight_sum=3.0,
            global_metrics={"eval_accuracy": 0.8, "eval_loss": 0.5 if r == 1 else 0.4},
        )
    log.record_final_evaluation(
        2,
        model_sha256="h2",
        started_at=1_800_000_300.0,
        ended_at=1_800_000_301.0,
        asked=[A, B, C],
        silo_metrics={
            A: {"eval_accuracy": 0.75},
            B: {"eval_accuracy": 0.85},
            C: {"eval_accuracy": 0.95},
        },
        global_metrics={"eval_accuracy": 0.85},
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        populate(log)
    return tmp_path


def row(out: str, first_cell: str) -> str:
    """The table line whose first cell is `first_cell`."""
    return next(
        line
        for line in out.splitlines()
        if line.startswith("│") and line.split("│")[1].strip() == first_cell
    )


def rounds(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run_rounds_command(["rounds", *argv], capsys)
    assert code == 0, err
    return out


def test_list_json_has_the_spread_of_the_chosen_metric(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(rounds(capsys, "list", "--state-dir", str(state_dir), "--json"))
    first, second, third = doc["rounds"]
    assert first["metric"] == "eval_accuracy"
    assert first["spread"] == {
        "n": 3,
        "mean": pytest.approx(0.8),
        "std": pytest.approx(THIRD_OF_0_08),
        "worst": 0.6,
        "worst_silo": A,
        "best": 1.0,
        "best_silo": C,
    }
    # B's NaN is left out, D (dropped after reporting) counts: mean 0.7, not the global 0.8.
    assert second["spread"]["n"] == 3 and second["global"] == 0.8
    assert second["spread"]["mean"] == pytest.approx(0.7)
    assert (second["worst_silo"], second["worst_silo_value"]) == (D, 0.5)
    assert (second["spread"]["best_silo"], second["spread"]["best"]) == (C, 0.9)
    assert third["spread"] is None and third["worst_silo"] is None
    (final,) = doc["final_evaluations"]
    assert final["spread"]["mean"] == pytest.approx(0.85)
    assert final["spread"]["std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert (final["spread"]["worst_silo"], final["spread"]["best_silo"]) == (A, C)

    loss = json.loads(
        rounds(capsys, "list", "--state-dir", str(state_dir), "--json", "--metric", "eval_loss")
    )["rounds"]
    assert [(r["spread"] or {}).get("worst") for r in loss] == [0.9, 1.2, None]
    assert [(r["spread"] or {}).get("best_silo") for r in loss] == [C, C, None]


def test_list_table_shows_mean_std_and_n(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rounds(capsys, "list", "--state-dir", str(state_dir))
    assert "silos: mean ± std (n)" in out
    row_1 = row(out, "1")
    assert "0.6000 (a)" in row_1 and "0.8000 ± 0.1633 (3)" in row_1
    row_2 = row(out, "2")
    assert "0.5000 (d)" in row_2 and "0.7000 ± 0.1633 (3)" in row_2
    final = row(out, "final (2)")
    assert "0.8500 ± 0.0816 (3)" in final
    assert "the worst is the lowest" in out
    out = rounds(capsys, "list", "--state-dir", str(state_dir), "--metric", "eval_loss")
    assert "0.9000 (a)" in out and "the worst is the highest" in out


def test_show_json_adds_the_spread_columns_to_the_round_detail(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = json.loads(rounds(capsys, "show", "2", "--state-dir", str(state_dir), "--json"))
    columns = shown.pop("spread")
    final_columns = shown["final_evaluation"].pop("spread")
    with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
        assert shown == json.loads(json.dumps(log.round_detail(2).to_dict()))
    assert sorted(columns) == sorted(
        f"{m}_{k}"
        for m in ("eval_accuracy", "eval_loss")
        for k in ("n", "mean", "std", "worst", "worst_silo", "best", "best_silo")
    )
    assert (columns["eval_loss_worst"], columns["eval_loss_worst_silo"]) == (1.2, D)
    assert columns["eval_accuracy_mean"] == pytest.approx(0.7)
    assert final_columns["eval_accuracy_best_silo"] == C
    aborted = json.loads(rounds(capsys, "show", "3", "--state-dir", str(state_dir), "--json"))
    assert aborted["spread"] == {}


def test_show_table_has_a_row_per_eval_metric(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rounds(capsys, "show", "1", "--state-dir", str(state_dir))
    assert "eval_* metrics across silos" in out
    lines = out.splitlines()
    accuracy = next(line for line in lines if "eval_accuracy (lower is worse)" in line)
    for cell in ("3", "0.8000", "0.1633", "0.6000", A, "1.0000", C):
        assert cell in accuracy, cell
    loss = next(line for line in lines if "eval_loss (higher is worse)" in line)
    assert "0.9000" in loss and loss.index(A) < loss.index(C)  # worst a, then best c
    assert not [line for line in lines if "train_loss (" in line]  # not a shared model's
    out = rounds(capsys, "show", "2", "--state-dir", str(state_dir))
    assert "final evaluation: eval_* metrics across silos" in out


def test_export_json_and_csv_carry_the_spread_columns(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = json.loads(rounds(capsys, "export", "--state-dir", str(state_dir), "--json"))
    by_round = {r["round"]: r for r in exported["rounds"]}
    assert by_round[1]["spread"]["eval_accuracy_std"] == pytest.approx(THIRD_OF_0_08)
    assert by_round[2]["spread"]["eval_accuracy_worst_silo"] == D
    assert by_round[2]["final_evaluation"]["spread"]["eval_accuracy_n"] == 3
    assert by_round[3]["spread"] == {}
    with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
        plain = json.loads(json.dumps(log.export()))
    for r in exported["rounds"]:
        r.pop("spread")
        if r["final_evaluation"] is not None:
            r["final_evaluation"].pop("spread")
    assert exported == plain  # nothing else changed

    out = rounds(capsys, "export", "--state-dir", str(state_dir), "--format", "csv")
    facts: dict[tuple[str, str, str, str], str] = {
        (r["round"], r["scope"], r["subject"], r["field"]): r["value"]
        for r in csv.DictReader(io.StringIO(out))
    }
    assert float(facts[("1", "spread", "", "eval_accuracy_mean")]) == pytest.approx(0.8)
    assert float(facts[("1", "spread", "", "eval_loss_worst")]) == 0.9
    assert facts[("2", "spread", "", "eval_accuracy_n")] == "3"
    assert facts[("2", "spread", "", "eval_accuracy_best_silo")] == C
    assert float(facts[("2", "final_spread", "", "eval_accuracy_std")]) == pytest.approx(
        math.sqrt(0.02 / 3)
    )
    assert not [k for k in facts if k[0] == "3" and k[1] == "spread"]
    assert not [k for k in facts if k[1] == "spread" and k[3].startswith("train_")]


def test_plot_draws_the_mean_and_the_worst_best_band(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = state_dir / "fair.png"
    summary: dict[str, Any] = json.loads(
        rounds(
            capsys,
            "plot",
            "--metric",
            "eval_accuracy",
            "-o",
            str(target),
            "--state-dir",
            str(state_dir),
            "--json",
        )
    )
    assert [(s["round"], s["n"], s["worst"], s["best"]) for s in summary["spread"]] == [
        (1, 3, 0.6, 1.0),
        (2, 3, 0.5, 0.9),
    ]
    assert [s["mean"] for s in summary["spread"]] == pytest.approx([0.8, 0.7])
    assert summary["series"] == {"global": 2, A: 2, B: 1, C: 2, D: 1}
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = rounds(
        capsys, "plot", "--metric", "eval_loss", "-o", str(target), "--state-dir", str(state_dir)
    )
    assert "their mean and worst-best band" in out

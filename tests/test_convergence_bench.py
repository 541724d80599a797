"""bench/convergence.py runs as a script and prints the issue's keys with values of their types.

Timing is not checked; the figures themselves are the bench's to report. A tiny budget (2
rounds over 3 silos) and an unreachable target make every method exhaust the budget, so its
rounds figure must be the budget plus one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METHODS = ("fedavg", "fedprox", "fedadam")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.convergence", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def parse(stdout: str) -> dict[str, str]:
    pairs = [line.split(": ", 1) for line in stdout.splitlines()]
    assert all(len(p) == 2 for p in pairs), stdout
    return dict((key, value) for key, value in pairs)


def test_prints_rounds_to_target_per_method_and_budget_plus_one_when_never_reached() -> None:
    done = run_bench("--silos", "3", "--rounds", "2", "--target", "1.0")
    assert done.returncode == 0, done.stderr
    figures = parse(done.stdout)
    expected = {"target_accuracy", "round_budget"} | {
        f"{m}_{suffix}" for m in METHODS for suffix in ("rounds", "accuracy", "best_accuracy", "s")
    }
    assert set(figures) == expected
    assert float(figures["target_accuracy"]) == 1.0
    assert int(figures["round_budget"]) == 2
    for method in METHODS:
        assert int(figures[f"{method}_rounds"]) == 3  # never reached 1.0: budget + 1
        accuracy = float(figures[f"{method}_accuracy"])
        assert 0.0 <= accuracy <= float(figures[f"{method}_best_accuracy"]) <= 1.0
        assert float(figures[f"{method}_s"]) >= 0.0
    # Every round of every method was scored on the held-out set (the per-round log).
    scored = [line for line in done.stderr.splitlines() if "held-out accuracy" in line]
    assert len(scored) == 2 * len(METHODS), done.stderr


def test_a_reached_target_stops_the_method_at_that_round() -> None:
    done = run_bench("--silos", "3", "--rounds", "3", "--target", "0.01", "--methods", "fedavg")
    assert done.returncode == 0, done.stderr
    figures = parse(done.stdout)
    assert int(figures["fedavg_rounds"]) == 1  # any trained model beats 1 % on ten digits
    assert float(figures["fedavg_accuracy"]) >= 0.01
    assert "fedprox_rounds" not in figures


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--methods", "fedsgd"), "--methods takes names from"),
        (("--target", "1.5"), "--target is an accuracy"),
    ],
)
def test_bad_flags_are_refused_with_what_to_pass(args: tuple[str, ...], message: str) -> None:
    done = run_bench(*args)
    assert done.returncode == 2
    assert message in done.stderr

"""The silo farm (bench/farm) end to end: many real silo agents per process, the real coordinator.

bench/_federation.py's `run_federation` starts a real coordinator and farm processes over mTLS
on 127.0.0.1, each farmed silo with its own certificate, connection and secure-aggregation
state. A farm process is SIGKILLed for real in the middle of a round (after its silos sent
their shares), and a single farmed silo's stream is cut by its farm: the round completes without
them, its aggregate is the mean of the survivors' updates (the no-op task's updates are known:
`STEP * (1 + silo_index)` per parameter), and the next round completes with the survivors.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from bench._federation import (
    CUT,
    SECURE,
    SIGKILL,
    FederationFailed,
    Kill,
    RunResult,
    run_federation,
)
from examples.noop.task import PARAMS_ENV, STEP

pytestmark = pytest.mark.e2e

CLIP_L2 = 1e3  # never clips the no-op update at these sizes


def _run(tmp_path: Path, *, silos: int, farms: int, kill: Kill) -> RunResult:
    try:
        return run_federation(
            tmp_path,
            silos=silos,
            params=1000,
            rounds=2,
            warmup=1,
            aggregation=SECURE,
            secagg={"clip_l2": CLIP_L2},
            phase_deadline_s=60.0,
            timeout_s=120.0,
            farm_processes=farms,
            kill=kill,
        )
    except FederationFailed as exc:
        pytest.fail(f"{exc}\n{exc.logs}")


def _names(ids: tuple[str, ...]) -> set[str]:
    return {i.rsplit("/", 1)[-1] for i in ids}


def _mean_step(names: set[str]) -> float:
    """The mean no-op update of silos `names` (s<index>)."""
    return statistics.fmean(STEP * (1 + int(n[1:])) for n in names)


def _check(result: RunResult, silos: int) -> None:
    every = {f"s{i:02d}" for i in range(silos)}
    survivors = every - set(result.killed)
    first, killed_round, after = result.rounds
    assert [r.status.value for r in result.rounds] == ["completed"] * 3, result.rounds
    # Round 1: every farmed silo is in the aggregate, each by its own mTLS identity.
    assert _names(first.participants["finished"]) == every
    # The kill round: the killed silos shared their keys (U2), then dropped before masking.
    assert killed_round.round_id == result.kill_round
    assert set(result.killed) <= _names(killed_round.participants["U2"])
    assert _names(killed_round.participants["finished"]) == survivors
    # ... because their connections ended (not a deadline: those are 60 s here), in the phase
    # that waits for the masked inputs.
    dropped = {d.silo_id.rsplit("/", 1)[-1]: d for d in killed_round.dropouts}
    assert set(dropped) == set(result.killed), killed_round.dropouts
    assert all(d.phase == "masked" and "DISCONNECTED" in d.reason for d in dropped.values())
    assert _names(after.participants["finished"]) == survivors
    # The models: each round added the mean update of the silos whose input it holds (the
    # silos evaluate the model they received: `small` starts at 1).
    expected = 1.0 + _mean_step(every) + _mean_step(survivors)
    assert after.global_metrics["eval_small_mean"] == pytest.approx(expected, abs=1e-5)
    # Every surviving silo's own threads did work in the measured rounds.
    assert result.per_silo_cpu_s() > 0 and math.isfinite(result.per_silo_cpu_s())


def test_a_farm_survives_the_sigkill_of_another_farm_mid_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 silos in 2 farm processes (9 + the 3 to be killed): SIGKILL of the second after its
    silos sent their shares; threshold 8 of 12 still holds, so that round and the next
    complete with the 9."""
    monkeypatch.setenv(PARAMS_ENV, "1000")  # run_federation sets it; restored after the test
    result = _run(tmp_path, silos=12, farms=1, kill=Kill(3, "share_keys", SIGKILL))
    assert len(result.farm_cpu) == 2  # the survivors' farm and the killed one
    _check(result, 12)


def test_one_farmed_silo_can_be_cut_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 silos in 2 farms: one silo's stream is cut by its farm after it sent its shares; its
    farm's other silo goes on, and the round (threshold 4 of 5) completes with the 4."""
    monkeypatch.setenv(PARAMS_ENV, "1000")
    result = _run(tmp_path, silos=5, farms=2, kill=Kill(1, "share_keys", CUT))
    assert len(result.farm_cpu) == 2
    _check(result, 5)

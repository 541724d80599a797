"""Acceptance 6: the round log and checkpoints survive a coordinator restart.

The coordinator is stopped (SIGTERM) in the middle of a run and started again on the same state
directory and port; the silos reconnect by themselves. The log still holds every round finished
before the stop, and training resumes from the last checkpoint: the first round after the
restart takes as input exactly the model the last completed round produced.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.roundlog import RoundLog
from tests.federation_helpers import (
    RECORDING_SPEC,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e


def test_restart_keeps_log_and_resumes_from_checkpoint(tmp_path: Path) -> None:
    names = ("a", "b")
    fed = provision(tmp_path / "fed", "restart", names)
    state = tmp_path / "coord"
    common = dict(
        state_dir=state, task_spec=RECORDING_SPEC, rounds=5, min_silos=2, train={"sleep_s": 0.3}
    )
    cfg = write_coordinator_config(tmp_path / "c1.toml", fed, **common)  # type: ignore[arg-type]
    with processes(tmp_path / "logs") as procs:
        first = procs.coordinator(cfg)
        port = wait_for_port(state, first)
        for i, name in enumerate(names):
            toml = write_silo_config(
                tmp_path / f"{name}.toml",
                fed.silos[name],
                port=port,
                task_spec=RECORDING_SPEC,
                options={
                    "silo_index": i,
                    "num_examples": 10 + i,
                    "record_dir": str(tmp_path / "sent" / name),
                },
            )
            procs.silo(name, toml)
        first.wait_for_log(r"round 2 completed", 60)
        assert procs.stop(first) in (0, 130), first.log()
        before = RoundLog.open_readonly(state / "rounds.sqlite")
        try:
            done_before = [r for r in before.rounds() if r.status.value == "completed"]
            last = before.round_detail(done_before[-1].round_id)
            kept = {
                r.round_id: before.round_detail(r.round_id).model_out_sha256 for r in done_before
            }
        finally:
            before.close()
        assert len(done_before) >= 2
        (state / "coordinator.port").unlink()
        cfg2 = write_coordinator_config(
            tmp_path / "c2.toml",
            fed,
            listen=f"127.0.0.1:{port}",
            **common,  # type: ignore[arg-type]
        )
        second = procs.start("coordinator-2", ["-m", "coordinator", "serve", "--config", str(cfg2)])
        assert second.wait(90) == 0, procs.logs()
        second.wait_for_log(r"resuming from the checkpoint of round \d+", 1)
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        rounds = log.rounds()
        completed = [r for r in rounds if r.status.value == "completed"]
        assert len(completed) == 5
        for round_id, sha in kept.items():  # nothing finished before the stop was lost or changed
            assert log.round_detail(round_id).model_out_sha256 == sha
        resumed = [r for r in rounds if r.round_id > last.round_id]
        first_after = log.round_detail(resumed[0].round_id)
        first_completed_after = log.round_detail(
            next(r.round_id for r in resumed if r.status.value == "completed")
        )
        assert first_completed_after.model_in_sha256 == last.model_out_sha256
        assert first_after.model_in_sha256 == last.model_out_sha256
    finally:
        log.close()

"""Acceptance 6: the round log and checkpoints survive a coordinator restart.

The coordinator is stopped (SIGTERM) in the middle of a run and started again on the same state
directory and port; the silos reconnect by themselves. The log still holds every round finished
before the stop, and training resumes from the last checkpoint: the first round after the
restart takes as input exactly the model the last completed round produced.
"""

from __future__ import annotations

import pytest

from coordinator.storage.roundlog import RoundLog
from tests.federation_helpers import NewFederation

pytestmark = pytest.mark.e2e


def test_restart_keeps_log_and_resumes_from_checkpoint(federation: NewFederation) -> None:
    run = federation("restart", ("a", "b"))
    state, procs = run.state, run.procs
    # The second coordinator listens where the first did (the run's port): the silos dial again.
    cfg = run.coordinator_config("c1.toml", rounds=5, min_silos=2, train={"sleep_s": 0.3})
    first = run.start_coordinator(cfg)
    run.start_recording_silos({"a": 10, "b": 11})
    first.wait_for_log(r"round 2 completed", 60)
    assert procs.stop(first) in (0, 130), first.log()
    before = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        done_before = [r for r in before.rounds() if r.status.value == "completed"]
        last = before.round_detail(done_before[-1].round_id)
        kept = {r.round_id: before.round_detail(r.round_id).model_out_sha256 for r in done_before}
    finally:
        before.close()
    assert len(done_before) >= 2
    (state / "coordinator.port").unlink()
    second = run.start_coordinator(cfg, name="coordinator-2")
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

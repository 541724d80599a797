"""Round options over real processes and mTLS: DP noise, a misconfigured threshold, and a silo
that will not send its update in the clear.

* DP: each completed round records the mechanism, the multiplier, the clip norm, δ and ε
  composed over the rounds so far (dp-accounting via secagg), so ε grows from round 1 to 2.
* A secure round that cannot be configured is logged once and the coordinator gives up.
* Under the insecure baseline, a silo without `[secagg] allow_plaintext_insecure` declines.
"""

from __future__ import annotations

import math

import pytest

from coordinator.storage.roundlog import RoundLog
from tests.federation_helpers import NewFederation

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c")


def test_dp_rounds_record_noise_and_privacy_spent(federation: NewFederation) -> None:
    run = federation("dp", NAMES)
    state = run.state
    cfg = run.coordinator_config(
        rounds=2,
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 1.0, "noise_multiplier": 1.5},
    )
    coordinator = run.start_coordinator(cfg)
    run.start_recording_silos(dict.fromkeys(NAMES, 10), allow_plaintext_insecure=False)
    assert coordinator.wait(120) == 0, run.logs()
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        privacy = [log.round_detail(r).privacy for r in (1, 2)]
        weights = [log.round_detail(r).weight_sum for r in (1, 2)]
    finally:
        log.close()
    epsilons = []
    for rounds_so_far, p in enumerate(privacy, start=1):
        assert p is not None
        assert p.mechanism == "distributed discrete Gaussian"
        assert (p.noise_multiplier, p.clip_norm) == (1.5, 1.0)
        assert p.details["rounds_composed"] == rounds_so_far
        assert p.details["honest_survivors"] >= 1
        assert 0 < p.delta < 1 and math.isfinite(p.epsilon) and p.epsilon > 0
        epsilons.append(p.epsilon)
    assert epsilons[1] > epsilons[0]
    assert weights == [3.0, 3.0]  # DP forces uniform weights: one per silo


def test_a_round_that_cannot_be_configured_is_logged_once_and_the_coordinator_gives_up(
    federation: NewFederation,
) -> None:
    """[secagg] threshold 4 with 3 silos: each attempt is recorded as aborted with the reason,
    the coordinator backs off between attempts instead of spinning, and after
    [rounds] max_consecutive_aborts attempts of that one cause it exits 4 with a diagnosis that
    says what to fix (also kept in the last round's log entry)."""
    run = federation("bad", NAMES)
    state = run.state
    cfg = run.coordinator_config(
        rounds=1,
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 1.0, "threshold": 4, "n_colluders": 0},
        rounds_extra={"max_consecutive_aborts": 3, "abort_backoff_initial_s": 0.5},
    )
    coordinator = run.start_coordinator(cfg)
    run.start_recording_silos(dict.fromkeys(NAMES, 10), allow_plaintext_insecure=False)
    assert coordinator.wait(60) == 4, run.logs()
    coordinator.wait_for_log(
        r"stopping: the federation cannot make progress: 3 rounds in a row \(1-3\) aborted "
        r"with cause CANNOT_CONFIGURE",
        1,
    )
    coordinator.wait_for_log(r"What to do: no secure round can be configured", 1)
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        rounds = log.rounds()
        details = [log.round_detail(r.round_id) for r in rounds]
    finally:
        log.close()
    assert [r.status.value for r in rounds] == ["aborted"] * 3  # three attempts, not a spin
    for d in details:
        assert (d.abort_reason or "").startswith("CANNOT_CONFIGURE: ")
        assert "threshold 4 is outside [3, 3]" in (d.abort_reason or "")
    starts = [d.started_at for d in details]
    assert starts[2] - starts[1] >= 2 * (starts[1] - starts[0]) * 0.8  # exponential backoff
    assert details[0].extra["aborted_in_a_row"] == 1
    stalled = details[2].extra["stalled"]
    assert isinstance(stalled, dict) and stalled["cause"] == "CANNOT_CONFIGURE"
    assert stalled["rounds"] == [1, 2, 3]


def test_a_silo_declines_the_plaintext_baseline_unless_it_opted_in(
    federation: NewFederation,
) -> None:
    run = federation("plain", NAMES)
    tmp_path, state = run.root, run.state
    cfg = run.coordinator_config(
        rounds=1, min_silos=2, start_silos=3, aggregation="plaintext-insecure"
    )
    coordinator = run.start_coordinator(cfg)
    silos = {
        **run.start_recording_silos({"a": 10, "b": 10}, record_root=tmp_path),
        # c keeps the default: masked only
        **run.start_recording_silos(
            {"c": 10}, record_root=tmp_path, allow_plaintext_insecure=False
        ),
    }
    assert coordinator.wait(120) == 0, run.logs()
    silos["c"].wait_for_log(r"declining aggregation 'plaintext-insecure'", 10)
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        detail = log.round_detail(1)
    finally:
        log.close()
    assert sorted(detail.participants["finished"]) == [
        "spiffe://plain/silo/a",
        "spiffe://plain/silo/b",
    ]
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [
        ("spiffe://plain/silo/c", "INVALID")
    ]
    assert not (tmp_path / "c" / "round-1.pt").exists()  # c never even trained

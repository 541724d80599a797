"""Secure rounds end to end: 5 silo processes (t = 4) over mTLS, killed for real at each phase.

One federation, seven rounds. In round r (1..5) silo r is frozen by `[debug]
pause_after_phase` right after it sent its message of one phase of the protocol
(docs/secagg-protocol.md §5), killed with SIGKILL, and restarted; the round completes, its new
model equals plaintext FedAvg over the survivors (U3) within the stated quantisation bound
(recomputed here from the updates each silo recorded), and the restarted silo takes part in the
next round. In round 6 three silos are
killed after advertising their keys: the round aborts (THRESHOLD_VIOLATION recorded), nothing is
unmasked, and round 7 completes from the unchanged model. The auditor's commands then run,
through their entry point, on that federation's round log.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coordinator.rounds.secure_config import SecAggSettings, WeightingMode
from coordinator.storage.roundlog import RoundLog
from tests.federation_helpers import (
    FederationRun,
    Proc,
    Processes,
    check_fedavg,
    processes,
    run_module,
)

pytestmark = pytest.mark.e2e

NAMES = ("s1", "s2", "s3", "s4", "s5")
EXAMPLES = {"s1": 40, "s2": 7, "s3": 13, "s4": 29, "s5": 21}
# (round, silo, pause point, the phase its loss is recorded in)
KILLS = (
    (1, "s1", "offer", "advertise"),
    (2, "s2", "advertise", "share_keys"),
    (3, "s3", "share_keys", "masked"),
    (4, "s4", "masked", "consistency"),
    (5, "s5", "consistency", None),  # U4 \\ U5: the round may finish before the loss shows
)
ABORT_ROUND, ABORT_KILLED = 6, ("s1", "s2", "s3")
# n_colluders 1 is the silos' default floor for 5 invited (⌊(5−1)/3⌋), so t = ⌊(5+1)/2⌋+1 = 4:
# one silo lost per round is survivable, three are not.
# Example weighting: the silos opt in (start), the check uses each silo's count.
SECAGG = {
    "clip_l2": 100.0,
    "threshold": 4,
    "n_colluders": 1,
    "weight_max": 40,
    "weighting": "examples",
}
# SECAGG as the coordinator reads it (to rebuild each round's configuration and its bound).
SETTINGS = SecAggSettings(
    clip_l2=100.0, threshold=4, n_colluders=1, weight_max=40, weighting=WeightingMode.EXAMPLES
)


def _silo_id(name: str) -> str:
    return f"spiffe://sec/silo/{name}"


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the whole federation once; returns its folder (the coordinator's state in coord/)."""
    tmp_path = tmp_path_factory.mktemp("secure")
    with processes(tmp_path / "logs") as procs:
        _run_secure_federation(FederationRun.provision(tmp_path, procs, "sec", NAMES))
    return tmp_path


def _run_secure_federation(run: FederationRun) -> None:
    fed, procs = run.fed, run.procs
    cfg = run.coordinator_config(
        rounds=6,  # completed rounds: 7 rounds in all with the aborted one
        min_silos=5,  # wait for all five (restarted ones too) before each round
        aggregation="secagg",
        secagg=SECAGG,
        offer_s=60.0,
        train_s=60.0,
        start_timeout_s=120.0,
        # The backoff after round 6's abort is not what this test looks at.
        rounds_extra={"abort_backoff_initial_s": 0.2},
    )
    coordinator = run.start_coordinator(cfg)

    def start(name: str, pause: str | None, in_round: int | None, number: int) -> Proc:
        started = run.start_recording_silos(
            {name: EXAMPLES[name]},  # recorded under tmp_path / "sent"
            run=number,
            allow_plaintext_insecure=False,
            allow_example_weighting=True,
            pause_after_phase=pause,
            pause_in_round=in_round,
        )
        return started[name]

    silos = {}
    for round_id, name, point, _ in KILLS:
        silos[name] = start(name, point, round_id, 0)
    for _round, name, point, _ in KILLS:
        _kill_when_paused(procs, silos[name], fed.silos[name].dir / "state", point)
        # Restarted; s1-s3 will freeze after advertising in the aborting round.
        again = ("advertise", ABORT_ROUND) if name in ABORT_KILLED else (None, None)
        silos[name] = start(name, *again, number=1)
    for name in ABORT_KILLED:
        _kill_when_paused(procs, silos[name], fed.silos[name].dir / "state", "advertise")
        silos[name] = start(name, None, None, number=2)
    assert coordinator.wait(180) == 0, procs.logs()


def test_kill_a_silo_after_each_phase_then_three(secure_run: Path) -> None:
    tmp_path, state = secure_run, secure_run / "coord"
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        rounds = log.rounds()
        assert [r.status.value for r in rounds] == ["completed"] * 5 + ["aborted", "completed"]
        assert all(r.aggregation == "secagg" for r in rounds)
        for round_id, name, point, phase in KILLS:
            _check_completed_round(log, tmp_path, round_id, name, point, phase)
            # The restarted silo takes part in the next round that completes.
            after = next(r for r in rounds[round_id:] if r.status.value == "completed")
            finished = log.round_detail(after.round_id).participants["finished"]
            assert _silo_id(name) in finished, (round_id, name)
        aborted = log.round_detail(ABORT_ROUND)
        assert "THRESHOLD_VIOLATION" in (aborted.abort_reason or "")
        dropped = {d.silo_id: d.phase for d in aborted.dropouts}
        # s5, frozen after signing in round 5 (which completed without its unmask shares), may
        # still have been connected when round 6 began: then its kill drops it there too.
        assert (
            {_silo_id(n) for n in ABORT_KILLED}
            <= set(dropped)
            <= {_silo_id(n) for n in (*ABORT_KILLED, "s5")}
        )
        assert {dropped[_silo_id(n)] for n in ABORT_KILLED} == {"share_keys"}
        # Nothing was unmasked: no masked vector was even asked for, no model came out.
        assert "U3" not in aborted.participants and "U5" not in aborted.participants
        assert aborted.model_out_sha256 is None and aborted.checkpoint is None
        last = log.round_detail(ABORT_ROUND + 1)
        assert last.model_in_sha256 == log.round_detail(ABORT_ROUND - 1).model_out_sha256
        assert sorted(last.participants["finished"]) == sorted(_silo_id(n) for n in NAMES)
    finally:
        log.close()


def _kill_when_paused(procs: Processes, silo: Proc, state_dir: Path, point: str) -> None:
    marker = state_dir / f"paused-{point}"
    silo.wait_for_log(rf"pause_after_phase = {point}: paused", 120)
    assert marker.exists()
    silo.popen.kill()  # SIGKILL: no goodbye on the stream
    silo.popen.wait(timeout=10)
    marker.unlink()
    del procs


def _check_completed_round(
    log: RoundLog,
    tmp_path: Path,
    round_id: int,
    killed: str,
    point: str,
    phase: str | None,
) -> None:
    detail = log.round_detail(round_id)
    assert detail.status.value == "completed", (round_id, detail.abort_reason)
    sets = detail.participants
    assert len(sets["invited"]) == 5
    for smaller, larger in (("U1", "invited"), ("U2", "U1"), ("U3", "U2"), ("U4", "U3")):
        assert set(sets[smaller]) <= set(sets[larger]), (round_id, smaller)
    assert set(sets["U5"]) <= set(sets["U4"])
    victim = _silo_id(killed)
    in_sets = {"offer": (), "advertise": ("U1",), "share_keys": ("U1", "U2")}.get(
        point, ("U1", "U2", "U3") if point == "masked" else ("U1", "U2", "U3", "U4")
    )
    for name in ("U1", "U2", "U3", "U4"):
        assert (victim in sets[name]) == (name in in_sets), (round_id, point, name, sets)
    assert victim not in sets["U5"]
    dropouts = {d.silo_id: d.phase for d in detail.dropouts}
    if phase is not None:
        assert dropouts == {victim: phase}, (round_id, dropouts)
    else:
        assert set(dropouts) <= {victim}
    assert sorted(sets["finished"]) == sorted(sets["U3"])
    # The round's configuration as the coordinator built it: the five silos invited.
    check_fedavg(
        tmp_path / "coord",
        detail,
        examples=EXAMPLES,
        record_root=tmp_path / "sent",
        settings=SETTINGS,
        invited=[_silo_id(n) for n in NAMES],
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("coordinator", *args)


def test_auditor_commands_on_the_secure_federations_log(secure_run: Path) -> None:
    """Issue 5 on a real log with dropouts at every phase and an aborted round."""
    state = str(secure_run / "coord")
    png = secure_run / "score.png"
    commands = {
        "list": ("rounds", "list", "--state-dir", state, "--json"),
        "show aborted": ("rounds", "show", str(ABORT_ROUND), "--state-dir", state),
        "show 3": ("rounds", "show", "3", "--state-dir", state, "--json"),
        "export": ("rounds", "export", "--format", "csv", "--state-dir", state),
        "plot": ("rounds", "plot", "--metric", "eval_score", "-o", str(png), "--state-dir", state),
        "show 99": ("rounds", "show", "99", "--state-dir", state),
    }
    # Read-only commands on one finished log, independent of each other: they run at once (each
    # is mostly a Python process start).
    with ThreadPoolExecutor(len(commands)) as pool:
        ran = dict(zip(commands, pool.map(lambda a: _cli(*a), commands.values()), strict=True))
    listed = ran["list"]
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["rounds"]
    assert [r["status"] for r in rows] == ["completed"] * 5 + ["aborted", "completed"]
    assert [r["dropped"] for r in rows[:4]] == [1, 1, 1, 1]

    aborted = ran["show aborted"]
    assert aborted.returncode == 0, aborted.stderr
    assert "THRESHOLD_VIOLATION in phase share_keys" in aborted.stdout
    shown = json.loads(ran["show 3"].stdout)
    assert shown["aggregation"] == "secagg"
    assert [(d["silo_id"], d["phase"]) for d in shown["dropouts"]] == [(_silo_id("s3"), "masked")]
    assert set(shown["participants"]) >= {"invited", "U1", "U2", "U3", "U4", "U5", "finished"}
    assert [p["phase"] for p in shown["phases"]] == [
        "advertise", "share_keys", "masked", "consistency", "unmask"
    ]  # fmt: skip

    csv_out = ran["export"]
    assert csv_out.returncode == 0 and "THRESHOLD_VIOLATION" in csv_out.stdout
    plotted = ran["plot"]
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 silos" in plotted.stdout and "dropouts marked" in plotted.stdout

    missing = ran["show 99"]
    assert missing.returncode != 0 and "99" in missing.stderr

"""Chaos: a secure federation heals by itself from ordinary failures and stops when it cannot.

Real coordinator and silo processes over mTLS on loopback, secure aggregation (threshold 3),
the silos recording the true update they masked in each round. Each recovery scenario ends with
the federation completing its configured rounds with no action but the scenario's own step, a
consistent round log (every round completed, aborted or interrupted; every completed round's
checkpoint file hashing to what the log records; every round's input model a checkpoint the
log vouches for) and every completed round's new model equal to the example-weighted FedAvg of
its survivors' recorded updates within `quantisation_bound`:

a. `rollback --to 1` after 3 rounds and a restart: the same silos accept the same model again
   (a retry with the same survivors) and the federation goes on;
b. a silo SIGKILLed right after its masked upload and restarted: that round aborts (t = n = 3),
   the next attempt with the same model completes;
c. a second agent on one silo's state directory exits 4 at once, naming the folder and the
   first one's pid; the federation never notices;
d. the coordinator SIGKILLed at each point of `coordinator.runtime.debug_pause` (one test per
point, one
   federation whose silo agents stay up throughout) and restarted: the interrupted round is
   marked, no unrecorded checkpoint is used, the silos reconnect by themselves;
e. a silo gone for good with t = n = 3: the coordinator stops with exit code 4 after at most
   `[rounds] max_consecutive_aborts` aborted rounds (counted in the round log), the diagnosis
   naming the cause, the silo and the options in its log and in the last aborted round's
   `extra`.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordinator.rounds.secure_config import SecAggSettings, WeightingMode
from coordinator.runtime.debug_pause import POINTS
from coordinator.storage.checkpoints import checkpoint_name
from coordinator.storage.roundlog import RoundDetail, RoundLog, RoundStatus
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    Proc,
    Processes,
    check_fedavg,
    processes,
    provision,
    run_module,
    to_toml,
    wait_for_port,
    write_recording_silo_config,
)

pytestmark = pytest.mark.e2e

EXAMPLES = {"s1": 40, "s2": 7, "s3": 13}
THRESHOLD, WEIGHT_MAX, CLIP_L2 = 3, 40, 100.0
# Example weighting: the silos opt in (silo_config), the check uses each silo's count.
SECAGG = {
    "clip_l2": CLIP_L2,
    "threshold": THRESHOLD,
    "n_colluders": 0,
    "weight_max": WEIGHT_MAX,
    "weighting": "examples",
}
# SECAGG as the coordinator reads it (to rebuild each round's configuration and its bound).
SETTINGS = SecAggSettings(
    clip_l2=CLIP_L2,
    threshold=THRESHOLD,
    n_colluders=0,
    weight_max=WEIGHT_MAX,
    weighting=WeightingMode.EXAMPLES,
)
NAMES = ("s1", "s2", "s3")
STARTUP_S = 90.0  # a process start (Python, torch) on 2 cores shared with other test runs
RUN_S = 180.0  # a federation run of a few rounds, start to exit


def _silo_id(fed: Federation, name: str) -> str:
    return f"spiffe://{fed.federation_id}/silo/{name}"


def _free_port() -> int:
    """A loopback port free now: the coordinator must come back on the same one after a kill."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("coordinator", *args, timeout_s=STARTUP_S)


@dataclass
class Chaos:
    """One federation of a scenario: its files, port, processes and the silo agents running."""

    tmp: Path
    fed: Federation
    procs: Processes
    names: tuple[str, ...]
    port: int = field(default_factory=_free_port)
    silos: dict[str, Proc] = field(default_factory=dict)
    runs: int = 0

    @property
    def state(self) -> Path:
        return self.tmp / "coord"

    def silo_state(self, name: str) -> Path:
        return self.tmp / "silos" / name

    def coordinator_config(
        self,
        rounds: int,
        *,
        pause: str | None = None,
        stall: Mapping[str, float] | None = None,
        start_timeout_s: float = 120.0,
    ) -> Path:
        tables: dict[str, Mapping[str, Any]] = {
            "federation": {"id": self.fed.federation_id, "state_dir": self.state},
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "tls": {
                "ca_cert": self.fed.ca_cert,
                "cert": self.fed.coordinator_cert,
                "key": self.fed.coordinator_key,
                "roster": self.fed.roster,
                "revoked": self.fed.revoked,
            },
            "task": {"spec": RECORDING_SPEC},
            "rounds": {
                "count": rounds,
                "min_silos": 3,
                "aggregation": "secagg",
                "start_timeout_s": start_timeout_s,
                **(stall or {}),
            },
            "deadlines": {"offer_s": 60.0, "train_s": 60.0},
            "secagg": SECAGG,
        }
        if pause is not None:
            tables["debug"] = {"pause_after_phase": pause}
        self.runs += 1
        path = self.tmp / f"coordinator-{self.runs}.toml"
        path.write_text(to_toml(tables))
        return path

    def start_coordinator(self, config: Path, *extra: str, listening: bool = True) -> Proc:
        """`serve` on `config`; returns once it listens, or at once if not `listening` (its
        silos dial `port` and retry until it does)."""
        (self.state / "coordinator.port").unlink(missing_ok=True)
        proc = self.procs.start(
            config.stem, ["-m", "coordinator", "serve", "--config", str(config), *extra]
        )
        if listening:
            wait_for_port(self.state, proc, STARTUP_S)
        return proc

    def silo_config(
        self, name: str, *, pause: str | None = None, in_round: int | None = None
    ) -> Path:
        path = self.tmp / f"{name}-{pause or 'plain'}.toml"
        return write_recording_silo_config(
            path,
            self.fed,
            name,
            port=self.port,
            num_examples=EXAMPLES[name],
            record_root=self.tmp / "sent",
            state_dir=self.silo_state(name),
            allow_plaintext_insecure=False,
            allow_example_weighting=True,
            pause_after_phase=pause,
            pause_in_round=in_round,
        )

    def start_silo(self, name: str, config: Path | None = None, *extra: str) -> Proc:
        proc = self.procs.silo(
            f"{name}-{len(self.procs.procs)}", config or self.silo_config(name), *extra
        )
        self.silos[name] = proc
        return proc

    def kill_when_paused(self, proc: Proc, state_dir: Path, point: str) -> None:
        """SIGKILL `proc` once `[debug] pause_after_phase` froze it at `point`."""
        proc.wait_for_log(rf"pause_after_phase = {point}: paused", RUN_S)
        marker = state_dir / f"paused-{point}"
        paused = marker.exists()
        proc.popen.kill()  # first: a coordinator left running would hold the next one's port
        proc.popen.wait(timeout=30)
        assert paused, marker
        marker.unlink()

    def roundlog(self) -> RoundLog:
        return RoundLog.open_readonly(self.state / "rounds.sqlite")

    def logs(self) -> str:
        return self.procs.logs()


@contextmanager
def _chaos(tmp: Path, federation_id: str, names: Sequence[str] = NAMES) -> Iterator[Chaos]:
    fed = provision(tmp / "fed", federation_id, list(names))
    with processes(tmp / "logs") as procs:
        try:
            yield Chaos(tmp, fed, procs, tuple(names))
        finally:
            # SIGTERM to all at once: they wind down in parallel, then `processes` waits for
            # each (and SIGKILLs any that outlive its grace period).
            for proc in procs.procs:
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGTERM)


# ---- what every scenario must leave behind ------------------------------------------------------


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked_log(c: Chaos) -> list[RoundDetail]:
    """Every round of the log, checked for consistency: each round completed, aborted or
    interrupted; each completed round's checkpoint file hashes to what the log records (and is
    the round's output); nothing else has a checkpoint; each round's input model is a checkpoint
    the log vouches for (never an unrecorded or half-written file)."""
    with c.roundlog() as log:
        details = [log.round_detail(r.round_id) for r in log.rounds()]
        checkpoints = log.export()["checkpoints"]
    vouched = {str(ck["sha256"]) for ck in checkpoints}
    with_checkpoint = {int(ck["round"]) for ck in checkpoints}
    for d in details:
        assert d.status in (RoundStatus.COMPLETED, RoundStatus.ABORTED, RoundStatus.INTERRUPTED), (
            d.round_id,
            d.status,
        )
        assert d.model_in_sha256 in vouched, (d.round_id, "input model not vouched for")
        if d.status is RoundStatus.COMPLETED:
            assert d.checkpoint is not None, d.round_id
            assert d.checkpoint.sha256 == d.model_out_sha256, d.round_id
            assert _sha256_file(Path(d.checkpoint.path)) == d.checkpoint.sha256, d.round_id
        else:
            assert d.model_out_sha256 is None and d.round_id not in with_checkpoint, d.round_id
            assert d.abort_reason, d.round_id
    return details


def _check_fedavg(c: Chaos, details: Sequence[RoundDetail]) -> None:
    """Each completed round: new model = old + example-weighted mean of the survivors' recorded
    updates, within the quantisation bound of that round's configuration."""
    checked = 0
    for d in details:
        if d.status is not RoundStatus.COMPLETED:
            continue
        assert len(d.participants["finished"]) >= THRESHOLD, (d.round_id, d.participants)
        check_fedavg(c.state, d, examples=EXAMPLES, record_root=c.tmp / "sent", settings=SETTINGS)
        checked += 1
    assert checked, "no completed round to check"


def _exit_code(proc: Proc, timeout_s: float, c: Chaos) -> int:
    """`proc`'s exit code; a failure with every log when it does not exit within `timeout_s`."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still runs after {timeout_s:.0f} s\n{c.logs()}")


def _statuses(details: Sequence[RoundDetail]) -> list[str]:
    return [d.status.value for d in details]


def _everyone(c: Chaos) -> set[str]:
    return {_silo_id(c.fed, n) for n in c.names}


# ---- a. rollback ------------------------------------------------------------------------------


def test_rollback_is_rerun_by_the_same_silos(tmp_path: Path) -> None:
    with _chaos(tmp_path, "chaosrollback") as c:
        first = c.start_coordinator(c.coordinator_config(3), listening=False)
        for name in c.names:
            c.start_silo(name, None, "--serve-forever")  # they wait for the next run
        assert _exit_code(first, RUN_S, c) == 0, c.logs()

        done = _cli("rollback", "--state-dir", str(c.state), "--to", "1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["next_round"] == 4

        second = c.start_coordinator(c.coordinator_config(3), "--rounds", "5")
        assert _exit_code(second, RUN_S, c) == 0, c.logs()
        assert all(s.popen.poll() is None for s in c.silos.values()), c.logs()

        details = _checked_log(c)
        assert _statuses(details) == ["completed"] * 5, c.logs()
        _check_fedavg(c, details)
        r1, r2, r4 = details[0], details[1], details[3]
        # Round 4 re-runs round 2's input (round 1's output) with the same members: a retry.
        assert r4.rollback_of == 1
        assert r4.model_in_sha256 == r1.model_out_sha256 == r2.model_in_sha256
        assert set(r4.participants["U3"]) == set(r2.participants["U3"]) == _everyone(c)
        assert r4.model_out_sha256 != r2.model_out_sha256  # new training, not a replay
        assert "REPLAY" not in second.log(), second.log()


# ---- b. a silo killed right after its masked upload -------------------------------------------


def test_silo_killed_after_its_masked_upload_then_restarted(tmp_path: Path) -> None:
    with _chaos(tmp_path, "chaossilokill") as c:
        coordinator = c.start_coordinator(c.coordinator_config(2), listening=False)
        c.start_silo("s1")
        c.start_silo("s2")
        victim = c.start_silo("s3", c.silo_config("s3", pause="masked", in_round=1))
        c.kill_when_paused(victim, c.silo_state("s3"), "masked")
        restarted = c.start_silo("s3")  # as systemd would: the same config, no [debug]
        assert _exit_code(coordinator, RUN_S, c) == 0, c.logs()
        for name in c.names:
            assert _exit_code(c.silos[name], STARTUP_S, c) == 0, c.logs()

        details = _checked_log(c)
        assert _statuses(details) == ["aborted", "completed", "completed"], c.logs()
        _check_fedavg(c, details)
        aborted, retry = details[0], details[1]
        s3 = _silo_id(c.fed, "s3")
        assert set(aborted.participants["U3"]) == _everyone(c)  # its upload got through
        assert s3 in {d.silo_id for d in aborted.dropouts}
        # The next attempt: the same model, the same survivors, and it completes.
        assert retry.model_in_sha256 == aborted.model_in_sha256
        assert set(retry.participants["finished"]) == _everyone(c)
        assert "REPLAY" not in restarted.log(), restarted.log()


# ---- c. the same agent started twice on one state directory -----------------------------------


def test_second_agent_on_one_state_dir_is_refused_at_once(tmp_path: Path) -> None:
    with _chaos(tmp_path, "chaosduplicate") as c:
        coordinator = c.start_coordinator(c.coordinator_config(3), listening=False)
        first = c.start_silo("s1")
        s1 = _silo_id(c.fed, "s1")
        coordinator.wait_for_log(f"silo connected: {s1} ", RUN_S)
        # The copy starts while the first agent is connected and a second silo joins. The last
        # silo (min_silos is 3) starts only once the copy has exited: a federation that
        # finished before the copy reached the lock would let it take the lock legitimately.
        duplicate = c.procs.silo("s1-duplicate", c.silo_config("s1"))
        others = [c.start_silo(c.names[1])]
        assert _exit_code(duplicate, STARTUP_S, c) == 4, c.logs()
        others += [c.start_silo(name) for name in c.names[2:]]
        text = duplicate.log()
        assert f"state_dir {c.silo_state('s1')}" in text, text
        assert f"pid {first.pid}" in text, text
        assert "starting; coordinator" not in text and "Traceback" not in text, text
        assert _exit_code(coordinator, RUN_S, c) == 0, c.logs()
        for proc in (first, *others):
            assert _exit_code(proc, STARTUP_S, c) == 0, c.logs()

        details = _checked_log(c)
        assert _statuses(details) == ["completed"] * 3, c.logs()
        assert all(set(d.participants["finished"]) == _everyone(c) for d in details)
        _check_fedavg(c, details)
        # The copy never reached the coordinator: s1 connected once and was never replaced.
        assert coordinator.log().count(f"silo connected: {s1} ") == 1, coordinator.log()
        assert "reconnected; closing its previous stream" not in coordinator.log()


# ---- d. the coordinator killed at each point of a round --------------------------------------

# The phases the round log holds for the interrupted round when the coordinator dies at a point.
_ALL_PHASES = ["advertise", "share_keys", "masked", "consistency", "unmask"]
PHASES_RECORDED = {
    "offer": [],
    "advertise": _ALL_PHASES[:1],
    "share_keys": _ALL_PHASES[:2],
    "masked": _ALL_PHASES[:3],
    "consistency": _ALL_PHASES[:4],
    "unmask": _ALL_PHASES,
    "checkpoint": _ALL_PHASES,
    "roundlog": _ALL_PHASES,
}


@pytest.fixture(scope="module")
def coordinator_kills(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    """One federation for every kill point; its silo agents stay up (--serve-forever) and
    reconnect by themselves to each new coordinator process on the same port."""
    with _chaos(tmp_path_factory.mktemp("coordinator-kills"), "chaoscoord") as c:
        yield c


@pytest.mark.parametrize("point", POINTS)
def test_coordinator_killed_at(point: str, coordinator_kills: Chaos) -> None:
    c = coordinator_kills
    before = done = 0
    if (c.state / "rounds.sqlite").exists():
        with c.roundlog() as log:
            before = log.last_round_id()
            done = sum(1 for r in log.rounds() if r.status is RoundStatus.COMPLETED)
    paused = c.start_coordinator(c.coordinator_config(done + 2, pause=point))
    for name in c.names:  # started once; again only if an earlier case lost one
        if name not in c.silos or c.silos[name].popen.poll() is not None:
            c.start_silo(name, None, "--serve-forever")
    c.kill_when_paused(paused, c.state, point)

    resumed = c.start_coordinator(c.coordinator_config(done + 2))  # no [debug]
    assert _exit_code(resumed, RUN_S, c) == 0, c.logs()
    assert all(s.popen.poll() is None for s in c.silos.values()), c.logs()

    details = _checked_log(c)
    new = [d for d in details if d.round_id > before]
    _check_fedavg(c, new)
    killed, after = new[0], new[1]
    if point == "roundlog":  # the round was recorded completed: the next one takes its model
        assert _statuses(new) == ["completed", "completed"], c.logs()
        assert after.model_in_sha256 == killed.model_out_sha256
    else:
        assert _statuses(new) == ["interrupted", "completed", "completed"], c.logs()
        assert after.model_in_sha256 == killed.model_in_sha256  # the last vouched-for model
    assert [p.phase for p in killed.phases] == PHASES_RECORDED[point], killed.phases
    assert set(after.participants["finished"]) == _everyone(c)  # all reconnected by themselves
    written = c.state / "checkpoints" / checkpoint_name(killed.round_id)
    if point == "checkpoint":  # written, never recorded, never used
        assert written.exists()
        assert _sha256_file(written) not in {d.model_in_sha256 for d in details}
    elif point != "roundlog":
        assert not written.exists()
    assert f"rounds [{killed.round_id}] were interrupted" in resumed.log() or point == "roundlog"


# ---- e. a silo gone for good: stop, do not spin ---------------------------------------------


def test_silo_gone_for_good_stops_with_a_diagnosis(tmp_path: Path) -> None:
    k = 3
    with _chaos(tmp_path, "chaosstall") as c:
        stall = {"max_consecutive_aborts": k, "abort_backoff_initial_s": 0.2,
                 "abort_backoff_max_s": 0.5}  # fmt: skip
        # The silos first, each up and dialling (retrying every 0.2-1 s) before the coordinator
        # starts: then all three connect within about a second of its listening, and the short
        # start_timeout_s (also what rounds 3 and up wait for the gone silo) is only that wait.
        c.start_silo("s1")
        c.start_silo("s2")
        gone = c.start_silo("s3", c.silo_config("s3", pause="offer", in_round=2))
        for silo in c.silos.values():
            silo.wait_for_log("reconnecting in", STARTUP_S)
        coordinator = c.start_coordinator(
            c.coordinator_config(3, stall=stall, start_timeout_s=3.0), listening=False
        )
        c.kill_when_paused(gone, c.silo_state("s3"), "offer")  # and never restarted
        assert _exit_code(coordinator, RUN_S, c) == 4, c.logs()

        details = _checked_log(c)
        aborted = details[1:]
        # Acceptance 2: at most K aborted rounds (K = [rounds] max_consecutive_aborts), then
        # the stop; never a spin.
        assert 1 <= len(aborted) <= k, c.logs()
        assert _statuses(details) == ["completed"] + ["aborted"] * len(aborted), c.logs()
        s3 = _silo_id(c.fed, "s3")
        stalled = aborted[-1].extra.get("stalled")
        assert isinstance(stalled, dict), aborted[-1].extra
        assert stalled["rounds"] == [d.round_id for d in aborted]
        assert s3 in stalled["silos"] and stalled["cause"] and stalled["options"]
        # Backed off between attempts, as each round's log entry announced.
        for this, nxt in zip(aborted, aborted[1:], strict=False):
            wait = this.extra["next_attempt_in_s"]
            assert isinstance(wait, float) and wait > 0, this.extra
            assert this.ended_at is not None and nxt.started_at - this.ended_at >= wait * 0.9

        text = coordinator.log()
        assert "cannot make progress" in text and str(stalled["cause"]) in text, text
        assert s3 in text and str(stalled["options"]) in text, text
        shown = _cli("rounds", "show", str(aborted[-1].round_id), "--state-dir", str(c.state),
                     "--json")  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["extra"]["stalled"] == stalled

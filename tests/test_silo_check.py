"""`silofed-silo check` through its entry point, against a real coordinator process over mTLS.

A ready silo gets one OK line per check and exit 0; an expired certificate, a stopped
coordinator and a bad task spec each get a FAIL line naming what to fix and a non-zero exit.

Each `check` is its own process (forked from the tests' warm launcher, so it does not pay for
importing torch again); its stdout and stderr go to one log, so a check's output is asserted
with nothing else mixed in.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.federation_helpers import (
    RECORDING_SPEC,
    Processes,
    issue_silo_cert,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e
CHECKS = ["config", "certificate", "roster pin", "coordinator", "task", "data"]


@dataclass(frozen=True)
class Checked:
    returncode: int
    stdout: str  # stdout and stderr, in the order written


def checks(procs: Processes, runs: dict[str, list[str]]) -> dict[str, Checked]:
    """`python -m silo_agent check <args>` for each run (name: args), all started at once, each
    waited for to its end (120 s at most)."""
    started = {
        name: procs.start(name, ["-m", "silo_agent", "check", *a]) for name, a in runs.items()
    }
    return {name: Checked(p.wait(timeout_s=120), p.log()) for name, p in started.items()}


def verdicts(done: Checked) -> dict[str, tuple[bool, str]]:
    doc = json.loads(done.stdout)
    return {c["check"]: (c["ok"], c["detail"]) for c in doc["checks"]}


def test_check_against_a_running_coordinator(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "checkfed", ["a"])
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=state, task_spec=RECORDING_SPEC, rounds=1,
        min_silos=1, start_timeout_s=120,
    )  # fmt: skip
    options = {"silo_index": 0, "num_examples": 3, "record_dir": str(tmp_path / "rec")}
    now = dt.datetime.now(dt.UTC)
    expired = issue_silo_cert(
        fed.ca_cert, fed.ca_key, tmp_path / "expired", federation_id="checkfed", name="a",
        not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1),
    )  # fmt: skip
    expired.roster.write_text(fed.silos["a"].roster.read_text())
    with processes(tmp_path / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        port = wait_for_port(state, coordinator)
        good = write_silo_config(
            tmp_path / "a.toml", fed.silos["a"], port=port, task_spec=RECORDING_SPEC,
            options=options,
        )  # fmt: skip
        old = write_silo_config(
            tmp_path / "old.toml", expired, port=port, task_spec=RECORDING_SPEC, options=options
        )
        no_task = write_silo_config(
            tmp_path / "nt.toml", fed.silos["a"], port=port, task_spec="no_such_module:TASK"
        )
        workers = tmp_path / "workers.toml"  # the recording task trains in one process only
        workers.write_text(good.read_text() + "\n[train]\nworkers = 2\n")
        # Four independent silos' checks against the same running coordinator, side by side.
        ran = checks(
            procs,
            {
                "check-good": ["--config", str(good)],
                "check-expired": ["--config", str(old), "--json"],
                "check-no-task": ["--config", str(no_task), "--json"],
                "check-workers": ["--config", str(workers), "--json"],
            },
        )
        done = ran["check-good"]
        assert done.returncode == 0, done.stdout
        lines = done.stdout.splitlines()
        assert [line.split()[0] for line in lines] == ["OK"] * len(CHECKS), done.stdout
        assert "spiffe://checkfed/silo/a" in done.stdout and "days)" in done.stdout

        bad = ran["check-expired"]
        assert bad.returncode == 1
        got = verdicts(bad)
        assert list(got) == CHECKS
        assert not got["certificate"][0] and "expired" in got["certificate"][1].lower()
        assert "re-enroll" in got["certificate"][1]
        assert got["task"][0] and got["data"][0]

        bad = ran["check-no-task"]
        assert bad.returncode == 1
        got = verdicts(bad)
        assert got["coordinator"][0] and got["certificate"][0]
        assert not got["task"][0] and "[task] spec" in got["task"][1]
        assert not got["data"][0]

        bad = ran["check-workers"]
        assert bad.returncode == 1
        got = verdicts(bad)
        assert not got["task"][0] and "[train] workers = 2" in got["task"][1], got["task"]
        assert "distributed = True" in got["task"][1]

        procs.stop(coordinator)
        down = checks(procs, {"check-down": ["--config", str(good), "--timeout", "2"]})[
            "check-down"
        ]
        assert down.returncode == 1
        line = next(x for x in down.stdout.splitlines() if "coordinator" in x)
        assert line.startswith("FAIL") and "is the coordinator running" in line


def test_check_names_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "silo.toml"
    broken.write_text("[silo]\nname = 'a'\n")
    with processes(tmp_path / "logs") as procs:
        done = checks(procs, {"check-broken": ["--config", str(broken)]})["check-broken"]
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL config") and "[coordinator]" in done.stdout

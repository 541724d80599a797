"""`silofed-silo check` through its entry point, against a real coordinator process over mTLS.

A ready silo gets one OK line per check and exit 0; an expired certificate, a stopped
coordinator and a bad task spec each get a FAIL line naming what to fix and a non-zero exit.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.federation_helpers import (
    RECORDING_SPEC,
    REPO,
    child_env,
    issue_silo_cert,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e
CHECKS = ["config", "certificate", "roster pin", "coordinator", "task", "data"]


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "silo_agent", "check", "--config", str(config), *extra],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def verdicts(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[bool, str]]:
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
        done = check(good)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert [line.split()[0] for line in lines] == ["OK"] * len(CHECKS), done.stdout
        assert "spiffe://checkfed/silo/a" in done.stdout and "days)" in done.stdout

        old = write_silo_config(
            tmp_path / "old.toml", expired, port=port, task_spec=RECORDING_SPEC, options=options
        )
        bad = check(old, "--json")
        assert bad.returncode == 1
        got = verdicts(bad)
        assert list(got) == CHECKS
        assert not got["certificate"][0] and "expired" in got["certificate"][1].lower()
        assert "re-enroll" in got["certificate"][1]
        assert got["task"][0] and got["data"][0]

        no_task = write_silo_config(
            tmp_path / "nt.toml", fed.silos["a"], port=port, task_spec="no_such_module:TASK"
        )
        bad = check(no_task, "--json")
        assert bad.returncode == 1
        got = verdicts(bad)
        assert got["coordinator"][0] and got["certificate"][0]
        assert not got["task"][0] and "[task] spec" in got["task"][1]
        assert not got["data"][0]

        procs.stop(coordinator)
        down = check(good, "--timeout", "2")
        assert down.returncode == 1
        line = next(x for x in down.stdout.splitlines() if "coordinator" in x)
        assert line.startswith("FAIL") and "is the coordinator running" in line


def test_check_names_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "silo.toml"
    broken.write_text("[silo]\nname = 'a'\n")
    done = check(broken)
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL config") and "[coordinator]" in done.stdout

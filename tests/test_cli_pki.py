"""The PKI commands through their real entry points: provision-dev, enroll -> sign, revoke."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_enroll_sign_revoke_through_the_commands(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    out = run("coordinator", "provision-dev", "--dir", str(fed), "--silos", "2")
    assert out.returncode == 0, out.stderr
    assert (fed / "silos" / "hospital-2" / "silo.pem").exists()

    site = tmp_path / "site"
    enrolled = run(
        "silo_agent", "enroll", "--dir", str(site), "--federation", "demo", "--name", "b"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert stat.S_IMODE((site / "silo.key").stat().st_mode) == 0o600

    signed = run(
        "coordinator",
        "sign",
        "--dir",
        str(fed),
        "--csr",
        str(site / "silo.csr"),
        "--out",
        str(site / "silo.pem"),
    )
    assert signed.returncode == 0, signed.stderr
    roster = json.loads((fed / "roster.json").read_text())
    assert "spiffe://demo/silo/b" in roster["silos"] and roster["version"] == 3

    revoked = run(
        "coordinator",
        "revoke",
        "--dir",
        str(fed),
        "--cert",
        str(site / "silo.pem"),
        "--reason",
        "laptop stolen",
    )
    assert revoked.returncode == 0, revoked.stderr
    entries = json.loads((fed / "revoked.json").read_text())["revoked"]
    assert [e["silo_id"] for e in entries] == ["spiffe://demo/silo/b"]

    # No command ever prints private key material.
    for result in (out, enrolled, signed, revoked):
        assert "PRIVATE KEY" not in result.stdout + result.stderr


def test_refusals_exit_non_zero_with_a_reason(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    assert run("coordinator", "provision-dev", "--dir", str(fed), "--silos", "1").returncode == 0
    again = run("coordinator", "provision-dev", "--dir", str(fed), "--silos", "1")
    assert again.returncode == 1 and "--force" in again.stdout

    site = tmp_path / "site"
    assert (
        run(
            "silo_agent", "enroll", "--dir", str(site), "--federation", "other", "--name", "x"
        ).returncode
        == 0
    )
    wrong = run(
        "coordinator",
        "sign",
        "--dir",
        str(fed),
        "--csr",
        str(site / "silo.csr"),
        "--out",
        str(site / "silo.pem"),
    )
    assert wrong.returncode == 1 and "spiffe://demo/silo/" in wrong.stdout
    assert not (site / "silo.pem").exists()

    twice = run("silo_agent", "enroll", "--dir", str(site), "--federation", "other", "--name", "x")
    assert twice.returncode == 1 and "already exists" in twice.stdout

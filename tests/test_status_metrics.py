"""`silofed-coordinator status` and the gRPC health probe while a real federation runs.

A coordinator and two silos run as processes (round training slowed so a round is live while we
look); `status --json` runs through the real entry point and must show both silos with the
expiry of the certificates the test issued, the running round and its phase. The standard
health service answers SERVING over mTLS. After the coordinator stops, `status` exits non-zero
saying what to check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from coordinator.storage.roundlog import RoundLog
from coordinator.transport.status_client import Credentials, StatusUnavailable, probe_health
from tests.federation_helpers import REPO, NewFederation, child_env, run_module

pytestmark = pytest.mark.e2e


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("coordinator", "status", *args, timeout_s=60)


def test_status_and_health_while_a_federation_runs(federation: NewFederation) -> None:
    names = ("a", "b")
    run = federation("statusfed", names)
    tmp_path, fed = run.root, run.fed
    cfg = run.coordinator_config(rounds=50, min_silos=2, train={"sleep_s": 1.5})
    expiry = {
        f"spiffe://statusfed/silo/{n}": x509.load_pem_x509_certificate(
            fed.silos[n].cert.read_bytes()
        ).not_valid_after_utc.timestamp()
        for n in names
    }
    procs = run.procs
    coordinator = run.start_coordinator(cfg)
    run.start_recording_silos(dict.fromkeys(names, 5))
    # The operator's client certificate: `issue-operator-cert` (clientAuth, URI SAN
    # spiffe://statusfed/operator/ops, not on the roster), through the real command (while the
    # federation starts).
    issued = subprocess.run(
        [sys.executable, "-m", "coordinator", "issue-operator-cert", "--dir", str(fed.root),
         "--name", "ops", "--out", str(tmp_path / "operator")],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stdout + issued.stderr
    op_cert, op_key = tmp_path / "operator" / "operator.pem", tmp_path / "operator" / "operator.key"
    who = ("--config", str(cfg), "--cert", str(op_cert), "--key", str(op_key))
    port = run.listening(coordinator)
    doc: dict[str, object] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = status(*who, "--json")
        assert done.returncode == 0, done.stderr + procs.logs()
        doc = json.loads(done.stdout)
        if doc["round"] is not None and len(doc["silos"]) == 2:  # type: ignore[arg-type]
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no live round with two silos seen: {doc}\n{procs.logs()}")
    assert doc["federation_id"] == "statusfed" and doc["health"] == "SERVING"
    # Plaintext rounds have an offer phase and a train phase (the aggregation's phases).
    assert doc["phase"] in ("offer", "train"), doc
    assert isinstance(doc["time_in_phase_s"], float) and 0 <= doc["time_in_phase_s"] < 60
    silos = {s["silo_id"]: s for s in doc["silos"]}  # type: ignore[attr-defined]
    assert set(silos) == set(expiry)
    for silo_id, not_after in expiry.items():
        assert silos[silo_id]["cert_not_after"] == pytest.approx(not_after)
        assert silos[silo_id]["cert_days_left"] > 1

    table = status(*who)
    assert table.returncode == 0, table.stderr
    assert "spiffe://statusfed/silo/a" in table.stdout and "phase" in table.stdout

    creds = Credentials(
        fed.ca_cert.read_bytes(), op_cert.read_bytes(), op_key.read_bytes(), "localhost"
    )
    address = f"127.0.0.1:{port}"
    assert probe_health(address, creds) == "SERVING"
    assert probe_health(address, creds, service="silofed.v1.Federation") == "SERVING"
    with pytest.raises(StatusUnavailable, match="NOT_FOUND"):
        probe_health(address, creds, service="no.such.Service")

    procs.stop(coordinator)
    down = status(*who, "--timeout", "2")
    assert down.returncode == 1
    assert "silofed-coordinator serve" in down.stderr


def test_status_without_a_target_says_what_to_pass(tmp_path: Path) -> None:
    done = status()
    assert done.returncode == 1 and "--config FILE" in done.stderr
    no_cert = status("--address", "127.0.0.1:1", "--ca-cert", str(tmp_path / "ca.pem"))
    assert no_cert.returncode == 1 and "issue-operator-cert" in no_cert.stderr


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_matches_the_round_log(federation: NewFederation) -> None:
    names = ("a", "b")
    run = federation("metricsfed", names)
    fed, state = run.fed, run.state
    cfg = run.coordinator_config(rounds=2, min_silos=2, train={"sleep_s": 0.3})
    cfg.write_text(cfg.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    coordinator = run.start_coordinator(cfg, "--keep-serving")
    run.start_recording_silos(dict.fromkeys(names, 5))
    # --keep-serving: after its rounds the coordinator keeps the silos connected, so the
    # figures are stable while we compare them with the log.
    coordinator.wait_for_log(r"all rounds done", 90)
    metrics_port = int((state / "metrics.port").read_text())
    got = scrape(metrics_port)
    with RoundLog.open_readonly(state / "rounds.sqlite") as rl:
        details = [rl.round_detail(r.round_id) for r in rl.rounds()]
    assert got[("silofed_connected_silos", ())] == 2
    assert got[("silofed_rounds_completed", ())] == 2
    assert got[("silofed_round_duration_seconds_count", (("status", "completed"),))] == 2
    assert got[("silofed_round_duration_seconds_sum", (("status", "completed"),))] == pytest.approx(
        sum(d.duration_s or 0 for d in details)
    )
    for phase in ("offer", "train"):
        assert got[("silofed_phase_duration_seconds_count", (("phase", phase),))] == 2
    sent = sum(s.bytes_out for d in details for s in d.silos)
    received = sum(s.bytes_in for d in details for s in d.silos)
    assert received > 0
    assert got[("silofed_bytes_total", (("direction", "in"),))] == received
    assert got[("silofed_bytes_total", (("direction", "out"),))] == sent
    now = time.time()
    for name in names:
        cert = x509.load_pem_x509_certificate(fed.silos[name].cert.read_bytes())
        days = (cert.not_valid_after_utc.timestamp() - now) / 86400
        key = ("silofed_cert_expiry_days", (("silo", f"spiffe://metricsfed/silo/{name}"),))
        assert got[key] == pytest.approx(days, abs=0.01)
    assert not any(name == "silofed_dropouts_total" for name, _ in got)


def test_dropouts_are_counted_by_phase_from_the_round_log(tmp_path: Path) -> None:
    """The dropout counter at non-zero values: a round log with recorded dropouts (written with
    the RoundLog API the coordinator uses), scraped over HTTP from the real endpoint."""
    from coordinator.observability.metrics import start_metrics
    from protos import federation_pb2 as pb

    silos = [f"spiffe://dropfed/silo/{n}" for n in "abc"]
    log = RoundLog(tmp_path / "rounds.sqlite")

    def start(round_id: int, at: float) -> None:
        log.start_round(
            round_id, started_at=at, aggregation="plaintext-insecure", config_digest="0" * 64,
            model_in_sha256="1" * 64, invited=silos,
        )  # fmt: skip

    start(1, 100.0)
    log.record_dropout(1, silos[2], phase="train", reason="deadline")
    log.finish_round(1, status="completed", ended_at=110.0, model_out_sha256="2" * 64)
    start(2, 120.0)
    log.record_dropout(2, silos[0], phase="offer", reason="disconnected")
    log.record_dropout(2, silos[1], phase="train", reason="deadline")
    log.finish_round(2, status="aborted", ended_at=125.0, abort_reason="too few silos")
    start(3, 130.0)
    server = start_metrics("127.0.0.1:0", tmp_path, lambda: pb.StatusReply(federation_id="f"))
    try:
        got = scrape(server.port)
        assert got[("silofed_dropouts_total", (("phase", "train"),))] == 2
        assert got[("silofed_dropouts_total", (("phase", "offer"),))] == 1
        # A dropout in the running round shows at the next scrape (running rounds not cached).
        log.record_dropout(3, silos[1], phase="train", reason="stream broke")
        again = scrape(server.port)
        assert again[("silofed_dropouts_total", (("phase", "train"),))] == 3
        assert again[("silofed_dropouts_total", (("phase", "offer"),))] == 1
        assert again[("silofed_rounds_completed", ())] == 1
        assert again[("silofed_round_duration_seconds_count", (("status", "aborted"),))] == 1
    finally:
        server.stop()
        log.close()

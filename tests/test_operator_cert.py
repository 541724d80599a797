"""Operator certificates: issued by the CA, answered by `GetStatus`, refused as silos.

Certificates are generated in each test (`provision_dev`, `issue-operator-cert`); every gRPC
call runs over real mutual TLS on 127.0.0.1 with a deadline. The coordinator runs as a real
process (`python -m coordinator serve`) and is stopped by PID when the test ends.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.pki import authority as pki
from coordinator.pki.operator import NotAnOperator, check_operator, operator_name
from coordinator.transport.servicer import FederationServicer
from coordinator.transport.status_client import (
    Credentials,
    StatusUnavailable,
    fetch_status,
    probe_health,
)
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from tests.federation_helpers import (
    RECORDING_SPEC,
    NewFederation,
    provision,
    run_module,
    write_coordinator_config,
)

NOW = dt.datetime.now(dt.UTC)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("coordinator", *args, timeout_s=60)


def creds(ca: Path, cert: Path, key: Path) -> Credentials:
    return Credentials(ca.read_bytes(), cert.read_bytes(), key.read_bytes(), "localhost")


# ---- issuing ---------------------------------------------------------------------------------


def test_issued_operator_certificate_has_its_own_identity(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path / "fed", "opfed", ["a"], now=NOW)
    op = fed.operator
    assert op is not None and op.dir == tmp_path / "fed" / "operators" / "operator"
    assert stat.S_IMODE(op.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(op.cert.read_bytes())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://opfed/operator/operator"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert op.ca_cert.read_bytes() == fed.ca_cert.read_bytes()
    # Never pinned: the roster lists the silo only.
    roster = json.loads(fed.roster.read_text())
    assert list(roster["silos"]) == ["spiffe://opfed/silo/a"]
    assert check_operator(op.cert.read_bytes(), "opfed") == "spiffe://opfed/operator/operator"


def test_check_operator_refuses_everyone_else(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path / "fed", "opfed", ["a"], now=NOW)
    assert fed.operator is not None
    op_pem = fed.operator.cert.read_bytes()
    with pytest.raises(NotAnOperator, match="spiffe://opfed/silo/a is not an operator"):
        check_operator(fed.silos["a"].cert.read_bytes(), "opfed")
    with pytest.raises(NotAnOperator, match="not an operator of federation 'other'"):
        check_operator(op_pem, "other")
    with pytest.raises(NotAnOperator, match="no client certificate"):
        check_operator(None, "opfed")
    serial = x509.load_pem_x509_certificate(op_pem).serial_number
    with pytest.raises(NotAnOperator, match="revoked"):
        check_operator(op_pem, "opfed", frozenset({serial}))
    assert operator_name("spiffe://opfed/operator/", "opfed") is None
    assert operator_name("spiffe://opfed/operator/x/y", "opfed") is None
    assert operator_name("spiffe://opfed/operator/ops-1", "opfed") == "ops-1"


def test_issue_operator_cert_command(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    pki.provision_dev(fed, "cmdfed", ["a"], now=NOW)
    out = cli("issue-operator-cert", "--dir", str(fed), "--name", "alice", "--days", "7")
    assert out.returncode == 0, out.stdout + out.stderr
    where = fed / "operators" / "alice"
    key = (where / "operator.key").read_text()
    assert stat.S_IMODE((where / "operator.key").stat().st_mode) == 0o600
    assert "spiffe://cmdfed/operator/alice" in out.stdout
    assert "PRIVATE KEY" not in out.stdout + out.stderr and key.strip() not in out.stdout
    cert = x509.load_pem_x509_certificate((where / "operator.pem").read_bytes())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 7
    again = cli("issue-operator-cert", "--dir", str(fed), "--name", "alice")
    assert again.returncode == 1 and "--force" in again.stdout
    assert (where / "operator.key").read_text() == key  # untouched
    forced = cli("issue-operator-cert", "--dir", str(fed), "--name", "alice", "--force")
    assert forced.returncode == 0 and (where / "operator.key").read_text() != key
    ca = pki.load_ca(fed, "cmdfed")
    with pytest.raises(pki.PkiError, match="letters, digits"):
        pki.issue_operator_cert(ca, tmp_path / "x", name="x/y", now=NOW)


# ---- over real mTLS ------------------------------------------------------------------------


def connect_as(address: str, c: Credentials, silo_id: str) -> grpc.RpcError:
    """Open a Connect stream with these credentials; return the error it ends with."""
    channel_creds = grpc.ssl_channel_credentials(c.ca_cert, c.key, c.cert)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(address, channel_creds, options=options) as channel:
        stub = pb_grpc.FederationStub(channel)
        hello = pb.SiloMessage(hello=pb.Hello(silo_id=silo_id))
        try:
            for _ in stub.Connect(iter([hello]), timeout=10):
                pass
        except grpc.RpcError as exc:
            return exc
    raise AssertionError("the coordinator accepted the stream")


@pytest.mark.e2e
def test_status_is_for_operators_only_on_a_running_coordinator(
    federation: NewFederation,
) -> None:
    run = federation("livefed", ["a"])
    fed, procs = run.fed, run.procs
    cfg = run.coordinator_config("coord.toml", rounds=1, min_silos=1, start_timeout_s=120)
    op_dir = fed.root / "operators" / "operator"
    operator = creds(fed.ca_cert, op_dir / "operator.pem", op_dir / "operator.key")
    silo = creds(fed.ca_cert, fed.silos["a"].cert, fed.silos["a"].key)
    coordinator = run.start_coordinator(cfg)
    address = f"127.0.0.1:{run.listening(coordinator)}"

    reply = fetch_status(address, operator, timeout_s=10)
    assert reply.federation_id == "livefed" and reply.current_round == 0

    with pytest.raises(StatusUnavailable) as refused:
        fetch_status(address, silo, timeout_s=10)
    text = str(refused.value)
    assert "PERMISSION_DENIED" in text and "operators only" in text
    assert "spiffe://livefed/silo/a" in text and "issue-operator-cert" in text
    # The health probe stays open to any client certificate from the CA (liveness).
    assert probe_health(address, silo, timeout_s=10) == "SERVING"

    # An operator certificate cannot join rounds: it is not on the roster.
    err = connect_as(address, operator, "spiffe://livefed/operator/operator")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert "roster" in (err.details() or "")

    # The CLI with --config only finds the dev operator under <fed>/operators/operator/.
    shown = cli("status", "--config", str(cfg), "--json", "--timeout", "10")
    assert shown.returncode == 0, shown.stderr + procs.logs()
    assert json.loads(shown.stdout)["federation_id"] == "livefed"
    as_silo = cli(
        "status", "--config", str(cfg), "--cert", str(fed.silos["a"].cert),
        "--key", str(fed.silos["a"].key), "--timeout", "10",
    )  # fmt: skip
    assert as_silo.returncode == 1 and "refused" in as_silo.stderr, as_silo.stderr
    assert "operators only" in as_silo.stderr
    coordinator.wait_for_log(r"refused status to .*spiffe://livefed/silo/a", 10)
    procs.stop(coordinator)


def test_status_names_a_missing_operator_dir(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "nofed", ["a"])
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=tmp_path / "coord", task_spec=RECORDING_SPEC,
        rounds=1, min_silos=1,
    )  # fmt: skip
    (tmp_path / "coord").mkdir()
    (tmp_path / "coord" / "coordinator.port").write_text("1\n")
    missing = cli("status", "--config", str(cfg), "--operator-dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "issue-operator-cert" in missing.stderr
    # Without an operator under the default path, it says what to pass.
    for p in (fed.root / "operators" / "operator").iterdir():
        p.unlink()
    bare = cli("status", "--config", str(cfg))
    assert bare.returncode == 1 and "--operator-dir" in bare.stderr


@dataclass
class FakeHub:
    """Just enough hub for GetStatus: the real servicer and server run around it."""

    revoked: frozenset[int]
    federation_id: str = "revfed"
    asked: int = 0  # status() calls: none for a refused caller

    def status(self) -> pb.StatusReply:
        self.asked += 1
        return pb.StatusReply(federation_id=self.federation_id, rounds_completed=3)


def test_a_revoked_operator_is_refused_over_mtls(tmp_path: Path) -> None:
    from coordinator.transport.server import start_server

    fed = pki.provision_dev(tmp_path / "fed", "revfed", ["a"], now=NOW)
    assert fed.operator is not None
    op = creds(fed.ca_cert, fed.operator.cert, fed.operator.key)
    serial = x509.load_pem_x509_certificate(fed.operator.cert.read_bytes()).serial_number
    hub = FakeHub(frozenset())
    running = start_server(
        FederationServicer(hub),  # type: ignore[arg-type]
        listen="127.0.0.1:0",
        ca_cert=fed.ca_cert,
        cert=fed.coordinator_cert,
        key=fed.coordinator_key,
    )
    try:
        address = f"127.0.0.1:{running.port}"
        assert fetch_status(address, op, timeout_s=10).rounds_completed == 3
        assert hub.asked == 1
        hub.revoked = frozenset({serial})
        with pytest.raises(StatusUnavailable, match="PERMISSION_DENIED.*revoked"):
            fetch_status(address, op, timeout_s=10)
        assert hub.asked == 1  # refused before any status was built
    finally:
        running.stop()

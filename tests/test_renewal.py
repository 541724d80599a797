"""Certificate renewal over the silo's own mTLS channel (rpc Renew), against a real coordinator.

The coordinator's hub and gRPC server run in this process (`coordinator_in_process`); the silo
side is a real gRPC channel presenting the silo's certificate, and the agent's own renewal code
(`silo_agent.pki.renewal.renew_if_due`). Covered: a same-key renewal is signed (auto policy),
installed atomically with the key untouched, accepted on the next connection, and leaves the
roster as it was; a revoked silo, a CSR naming another silo and a CSR for another key are
refused before anything is signed or queued; with auto_renew off the request is queued, shown by
`pki list`, signed by `pki approve` and picked up by the silo's next request.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.cli import main as coordinator_cli
from coordinator.pki import authority as pki
from coordinator.pki.renewal import ISSUED_DIR, PENDING_DIR
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.identity import spki_sha256
from silo_agent.config import load_silo_config
from silo_agent.pki.renewal import RenewResult, renew_if_due, renewal_csr
from tests.federation_helpers import (
    RECORDING_SPEC,
    RENEW_BEFORE_10_DAYS,
    Federation,
    auto_renew_table,
    coordinator_in_process,
    mtls_channel,
    provision,
    reissue_expiring,
    renew_as_agent,
    revoke,
    silo_channel,
    welcomed_as,
    with_table,
    write_coordinator_config,
    write_silo_config,
)

FED = "renew"
UTC = dt.UTC


@dataclass
class Setup:
    fed: Federation
    port: int
    state: Path
    silo_toml: Path  # silo a's config, [pki] renew_before_days = 10


def _coordinator(tmp: Path, fed: Federation, pki_table: str) -> Path:
    path = write_coordinator_config(
        tmp / "c.toml",
        fed,
        state_dir=tmp / "coord",
        task_spec=RECORDING_SPEC,
        rounds=1,
        min_silos=2,
    )
    return with_table(path, pki_table)


def _silo_toml(tmp: Path, fed: Federation, port: int, name: str = "a") -> Path:
    path = write_silo_config(
        tmp / f"silo-{name}.toml", fed.silos[name], port=port, task_spec=RECORDING_SPEC
    )
    return with_table(path, RENEW_BEFORE_10_DAYS)


def _renew(fed: Federation, name: str, port: int, csr_pem: bytes) -> pb.RenewReply:
    with silo_channel(fed.silos[name], port) as channel:
        reply: pb.RenewReply = pb_grpc.FederationStub(channel).Renew(
            pb.RenewRequest(csr_pem=csr_pem), timeout=10
        )
        return reply


def _refused(fed: Federation, name: str, port: int, csr_pem: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _renew(fed, name, port, csr_pem)
    return caught.value


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _agent_renews(setup: Setup, now: float) -> RenewResult | None:
    """Silo a's agent code, once, over a channel with silo a's files as they are now."""
    return renew_as_agent(setup.fed.silos["a"], setup.silo_toml, setup.port, now)


@pytest.fixture
def auto(tmp_path: Path) -> Iterator[Setup]:
    fed = provision(tmp_path / "fed", FED, ["a", "b"])
    with coordinator_in_process(
        _coordinator(tmp_path, fed, auto_renew_table(fed.ca_cert, fed.ca_key))
    ) as running:
        yield Setup(fed, running.port, tmp_path / "coord", _silo_toml(tmp_path, fed, running.port))


@pytest.fixture
def queued(tmp_path: Path) -> Iterator[Setup]:
    fed = provision(tmp_path / "fed", FED, ["a", "b"])
    with coordinator_in_process(_coordinator(tmp_path, fed, "[pki]\nauto_renew = false\n")) as c:
        yield Setup(fed, c.port, tmp_path / "coord", _silo_toml(tmp_path, fed, c.port))


def test_same_key_renewal_is_installed_and_the_roster_does_not_change(auto: Setup) -> None:
    fed, silo = auto.fed, auto.fed.silos["a"]
    old = reissue_expiring(fed, "a")
    roster_before = fed.roster.read_bytes()
    key_before, key_mode = silo.key.read_bytes(), stat.S_IMODE(os.stat(silo.key).st_mode)
    now = dt.datetime.now(UTC).timestamp()

    result = _agent_renews(auto, now)

    assert result is not None and result.installed, result
    new = x509.load_pem_x509_certificate(silo.cert.read_bytes())
    assert new.serial_number != old.serial_number
    assert spki_sha256(new) == spki_sha256(old)  # the same key: the pin still matches
    assert new.not_valid_after_utc - new.not_valid_before_utc <= dt.timedelta(days=30, minutes=6)
    assert new.not_valid_after_utc > old.not_valid_after_utc + dt.timedelta(days=20)
    assert silo.key.read_bytes() == key_before  # the key file is never touched
    assert stat.S_IMODE(os.stat(silo.key).st_mode) == key_mode == 0o600
    assert not list(silo.cert.parent.glob("*.renewing"))  # no temporary file left behind
    assert fed.roster.read_bytes() == roster_before  # no new roster version for anyone
    # The renewed certificate is accepted on the next connection.
    assert welcomed_as(fed.silos["a"], auto.port) == f"spiffe://{FED}/silo/a"
    # Not due any more: the next check asks nothing.
    assert renew_if_due(load_silo_config(auto.silo_toml), _unexpected_call, now=now) is None


def _unexpected_call(request: pb.RenewRequest) -> pb.RenewReply:
    raise AssertionError(f"no renewal should be requested: {request}")


def test_a_revoked_silo_cannot_renew(auto: Setup) -> None:
    fed = auto.fed
    reissue_expiring(fed, "a")
    csr = renewal_csr(x509.load_pem_x509_certificate(fed.silos["a"].cert.read_bytes()),
                      _key(fed.silos["a"].key))  # fmt: skip
    revoke(fed, fed.silos["a"])
    err = _refused(fed, "a", auto.port, csr)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (err.details() or "")
    assert not (auto.state / "renewals").exists()  # nothing queued or issued


def test_a_csr_naming_another_silo_is_refused(auto: Setup) -> None:
    fed = auto.fed
    b_cert = x509.load_pem_x509_certificate(fed.silos["b"].cert.read_bytes())
    csr = renewal_csr(b_cert, _key(fed.silos["a"].key))  # a's key, b's identity
    err = _refused(fed, "a", auto.port, csr)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may renew only its own certificate" in (err.details() or "")


def test_a_csr_for_another_key_is_refused(auto: Setup) -> None:
    fed = auto.fed
    a_cert = x509.load_pem_x509_certificate(fed.silos["a"].cert.read_bytes())
    csr = renewal_csr(a_cert, ec.generate_private_key(ec.SECP256R1()))  # a rotation, unproven
    err = _refused(fed, "a", auto.port, csr)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not the key the roster pins" in (err.details() or "")


def test_an_operator_certificate_cannot_renew(auto: Setup) -> None:
    fed = auto.fed
    op = pki.operator_dir(fed.root)
    with (
        mtls_channel(
            auto.port, fed.ca_cert, op / pki.OPERATOR_CERT, op / pki.OPERATOR_KEY
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.FederationStub(channel).Renew(pb.RenewRequest(csr_pem=b"x"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_queued_renewal_is_approved_by_the_operator_and_picked_up(
    queued: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fed, silo = queued.fed, queued.fed.silos["a"]
    old = reissue_expiring(fed, "a")
    renewals = queued.state / "renewals"
    now = dt.datetime.now(UTC).timestamp()

    first = _agent_renews(queued, now)
    assert first is not None and not first.installed and "approve" in first.detail
    assert (renewals / PENDING_DIR / "a.csr").exists()
    assert x509.load_pem_x509_certificate(silo.cert.read_bytes()).serial_number == old.serial_number

    assert (
        coordinator_cli(["pki", "list", "--dir", str(fed.root), "--renewals", str(renewals)]) == 0
    )
    assert f"spiffe://{FED}/silo/a" in capsys.readouterr().out
    argv = ["pki", "approve", "--dir", str(fed.root), "--renewals", str(renewals), "--silo", "a"]
    assert coordinator_cli(argv) == 0
    assert "approved the renewal" in capsys.readouterr().out
    assert not (renewals / PENDING_DIR / "a.csr").exists()
    assert (renewals / ISSUED_DIR / "a.pem").exists()
    # Approving again finds nothing waiting.
    assert coordinator_cli(argv) == 1

    second = _agent_renews(queued, now)
    assert second is not None and second.installed, second
    new = x509.load_pem_x509_certificate(silo.cert.read_bytes())
    assert new.serial_number != old.serial_number and spki_sha256(new) == spki_sha256(old)
    assert welcomed_as(fed.silos["a"], queued.port) == f"spiffe://{FED}/silo/a"


def test_a_renewal_for_a_key_that_is_not_pinned_cannot_be_approved(
    queued: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = queued.fed
    renewals = queued.state / "renewals"
    # A request planted in the queue by hand, for a key the roster does not pin.
    a_cert = x509.load_pem_x509_certificate(fed.silos["a"].cert.read_bytes())
    (renewals / PENDING_DIR).mkdir(parents=True)
    (renewals / PENDING_DIR / "a.csr").write_bytes(
        renewal_csr(a_cert, ec.generate_private_key(ec.SECP256R1()))
    )
    argv = ["pki", "approve", "--dir", str(fed.root), "--renewals", str(renewals), "--silo", "a"]
    assert coordinator_cli(argv) == 1
    assert "not the key the roster pins" in capsys.readouterr().out
    assert not (renewals / ISSUED_DIR / "a.pem").exists()

"""The offline root / online intermediate split: the root issues one issuing CA, which signs
silo certificates (renewals); it never signs a roster.

Unit checks run `check_certificate` on certificates made here by the real PKI code; the mTLS and
renewal checks run the real coordinator (hub + gRPC server) in this process, with real channels
on 127.0.0.1 presenting the silo's certificate file (leaf + intermediate) to gRPC's own TLS.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.cli import main as coordinator_cli
from coordinator.pki import authority as pki
from coordinator.pki.certificates import certificate_builder
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.errors import DecryptionFailed
from secagg.identity import (
    CertificateRejected,
    CertProblem,
    Roster,
    check_certificate,
    load_pem_chain,
    spki_sha256,
)
from secagg.roster_sig import RosterUpdateRefused, check_update, sign_roster
from secagg.trust import verify_signer
from silo_agent.config import load_silo_config
from silo_agent.pki.preflight import preflight, secagg_credentials
from silo_agent.transport.connection import LinkError
from tests.federation_helpers import (
    RECORDING_SPEC,
    RENEW_BEFORE_10_DAYS,
    Federation,
    auto_renew_table,
    coordinator_in_process,
    provision,
    reissue_expiring,
    renew_as_agent,
    silo_channel,
    welcomed_as,
    with_table,
    write_coordinator_config,
    write_silo_config,
)

FED = "inter"
UTC = dt.UTC
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PEM = serialization.Encoding.PEM


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _issuer(tmp: Path, root: pki.CA, *, now: dt.datetime = NOW, days: int = 90) -> pki.CA:
    cert_path, key_path = pki.issue_intermediate(root, tmp / "issuing", now=now, valid_days=days)
    return pki.load_issuer(cert_path, key_path, root.cert, root.federation_id, now)


def _leaf(issuer: pki.CA, fed: pki.DevFederation, name: str = "a") -> x509.Certificate:
    """Silo `name`'s enrolled key, certified by `issuer`."""
    csr = fed.silos[name].csr.read_bytes()
    pem = pki.sign_csr(issuer, csr, federation_id=issuer.federation_id, now=NOW, valid_days=30)
    return x509.load_pem_x509_certificate(pem)


def _hand_made_ca(
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    *,
    cn: str,
    path_length: int | None = 0,
    cert_sign: bool = True,
) -> x509.Certificate:
    """A CA certificate from the PKI's own builder (self-signed when `issuer` is None), in the
    shapes the PKI code never issues: a root that allows no intermediate, a CA below such a root
    or below an intermediate, a CA whose key usage forbids signing certificates."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = certificate_builder(
        name,
        name if issuer is None else issuer,
        key.public_key(),
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=30),
        ca=True,
        path_length=path_length,
        signs_certificates=cert_sign,
    )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def dev(tmp_path: Path) -> pki.DevFederation:
    return pki.provision_dev(tmp_path / "fed", FED, ["a", "b"], now=NOW)


# ---- the chain check ---------------------------------------------------------------------------


def test_a_leaf_issued_by_the_intermediate_is_accepted_only_with_it(
    tmp_path: Path, dev: pki.DevFederation
) -> None:
    root = pki.load_ca(dev.dir, FED)
    issuer = _issuer(tmp_path, root)
    leaf = _leaf(issuer, dev)
    roster = pki.load_roster(dev.roster)
    silo_id = check_certificate(
        leaf, root.cert, now=NOW, roster=roster, intermediates=[issuer.cert]
    )
    assert silo_id == f"spiffe://{FED}/silo/a"
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(leaf, root.cert, now=NOW, roster=roster)
    assert caught.value.problem is CertProblem.NOT_FROM_FEDERATION_CA
    # Another federation's intermediate with the same name does not vouch for it either.
    other = pki.create_ca(tmp_path / "other", FED, now=NOW)
    stranger = _issuer(tmp_path / "o", other)
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(leaf, root.cert, now=NOW, intermediates=[stranger.cert])
    assert caught.value.problem is CertProblem.NOT_FROM_FEDERATION_CA
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(_leaf(stranger, dev), root.cert, now=NOW, intermediates=[stranger.cert])
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE
    assert "not signed by the federation CA" in str(caught.value)


def test_a_revoked_or_expired_intermediate_issues_nothing(
    tmp_path: Path, dev: pki.DevFederation
) -> None:
    root = pki.load_ca(dev.dir, FED)
    issuer = _issuer(tmp_path, root, days=10)
    leaf = _leaf(issuer, dev)
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(
            leaf, root.cert, now=NOW, intermediates=[issuer.cert],
            revoked_serials=[issuer.cert.serial_number],
        )  # fmt: skip
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE
    assert "has been revoked" in str(caught.value)
    later = NOW + dt.timedelta(days=11)  # the leaf (30 days) outlives its intermediate (10)
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(leaf, root.cert, now=later, intermediates=[issuer.cert])
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE


def test_a_leaf_signed_by_a_certificate_that_is_not_a_ca_is_refused(
    dev: pki.DevFederation,
) -> None:
    root = pki.load_ca(dev.dir, FED)
    # Silo a's own certificate (CA:FALSE, issued by the root) and key, used as an issuer.
    a_cert = _cert(dev.silos["a"].cert)
    a_key = pki.load_private_key(dev.silos["a"].key)
    fake_issuer = pki.CA(FED, a_cert, a_key, dev.dir)
    leaf = _leaf(fake_issuer, dev, "b")
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(leaf, root.cert, now=NOW, intermediates=[a_cert])
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE
    assert "not a CA certificate" in str(caught.value)
    # A CA certificate whose key usage does not allow signing certificates: refused too.
    key = ec.generate_private_key(ec.SECP256R1())
    no_sign = _hand_made_ca(key, root.key, root.cert.subject, cn="no-sign", cert_sign=False)
    leaf = _leaf(pki.CA(FED, no_sign, key, dev.dir), dev, "b")
    with pytest.raises(CertificateRejected, match="does not allow signing certificates"):
        check_certificate(leaf, root.cert, now=NOW, intermediates=[no_sign])


def test_the_path_length_is_enforced(tmp_path: Path, dev: pki.DevFederation) -> None:
    # A root made before intermediates existed (path length 0) issues leaves directly only.
    old_key = ec.generate_private_key(ec.SECP256R1())
    old_root = _hand_made_ca(old_key, old_key, None, cn="old root", path_length=0)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _hand_made_ca(inter_key, old_key, old_root.subject, cn="under old root")
    leaf = _leaf(pki.CA(FED, inter, inter_key, dev.dir), dev)
    with pytest.raises(CertificateRejected, match="allow no intermediate") as caught:
        check_certificate(leaf, old_root, now=NOW, intermediates=[inter])
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE
    direct = _leaf(pki.CA(FED, old_root, old_key, dev.dir), dev)
    assert check_certificate(direct, old_root, now=NOW) == f"spiffe://{FED}/silo/a"
    # Two intermediates below the root (the first with path length 0): refused.
    root = pki.load_ca(dev.dir, FED)
    first = _issuer(tmp_path, root)
    second_key = ec.generate_private_key(ec.SECP256R1())
    second = _hand_made_ca(second_key, first.key, first.cert.subject, cn="second level")
    deep = _leaf(pki.CA(FED, second, second_key, dev.dir), dev)
    with pytest.raises(CertificateRejected) as caught:
        check_certificate(deep, root.cert, now=NOW, intermediates=[second, first.cert])
    assert caught.value.problem is CertProblem.BAD_INTERMEDIATE
    # The root itself allows exactly one level.
    basic = root.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 1


# ---- the roster stays the root's -----------------------------------------------------------------


def test_an_intermediate_can_never_sign_a_roster(tmp_path: Path, dev: pki.DevFederation) -> None:
    root = pki.load_ca(dev.dir, FED)
    issuer = _issuer(tmp_path, root)
    before = dev.roster.read_bytes(), pki.roster_signature_path(dev.roster).read_bytes()
    with pytest.raises(pki.PkiError, match="rosters are signed by the federation CA"):
        pki.sign_roster_file(dev.roster, issuer)
    pinned = pki.load_roster(dev.roster)
    with pytest.raises(pki.PkiError, match="intermediate"):
        pki.write_roster(dev.roster, pinned.with_silo(next(iter(pinned.entries)), b"\1" * 32),
                         issuer)  # fmt: skip
    assert (dev.roster.read_bytes(), pki.roster_signature_path(dev.roster).read_bytes()) == before
    # A roster signed with the intermediate's key by other means: the coordinator will not
    # deliver it and a silo will not adopt it.
    newer = Roster(FED, pinned.version + 1, dict(pinned.entries))
    data = pki.roster_bytes(newer)
    signature = sign_roster(issuer.key, data)
    dev.roster.write_bytes(data)
    pki.roster_signature_path(dev.roster).write_bytes(signature)
    loaded = pki.load_signed_roster(dev.roster, root.cert)
    assert loaded.signature is None and loaded.problem
    with pytest.raises(RosterUpdateRefused):
        check_update(pinned, data, signature, ca_cert=root.cert,
                     own_cert=_cert(dev.silos["a"].cert))  # fmt: skip


# ---- commands ----------------------------------------------------------------------------------


def test_issue_intermediate_from_a_request_keeps_the_key_where_it_was_made(
    tmp_path: Path, dev: pki.DevFederation, capsys: pytest.CaptureFixture[str]
) -> None:
    online = tmp_path / "coordinator-host"
    assert coordinator_cli(["pki", "intermediate-csr", "--dir", str(online), "--federation",
                            FED]) == 0  # fmt: skip
    key_path = online / pki.ISSUING_KEY
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    offline = tmp_path / "root-host-out"
    argv = ["pki", "issue-intermediate", "--dir", str(dev.dir), "--out", str(offline),
            "--csr", str(online / pki.ISSUING_CSR), "--days", "60"]  # fmt: skip
    assert coordinator_cli(argv) == 0
    assert "issuing CA" in capsys.readouterr().out
    assert not (offline / pki.ISSUING_KEY).exists()  # the key never travelled
    cert = _cert(offline / pki.ISSUING_CERT)
    assert cert.public_key() == pki.load_private_key(key_path).public_key()
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not (usage.value.digital_signature or usage.value.key_encipherment)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=59) < life <= dt.timedelta(days=60)
    cert.verify_directly_issued_by(_cert(dev.ca_cert))
    # It loads as the online issuer; an intermediate cannot issue another intermediate.
    issuer = pki.load_issuer(
        offline / pki.ISSUING_CERT, key_path, _cert(dev.ca_cert), FED, dt.datetime.now(UTC)
    )
    with pytest.raises(pki.PkiError, match="only the federation CA"):
        pki.sign_intermediate(issuer, (online / pki.ISSUING_CSR).read_bytes(), now=NOW)


def test_a_legacy_root_refuses_to_be_an_issuer_for_an_intermediate_it_cannot_have(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    old_root = _hand_made_ca(key, key, None, cn="old root", path_length=0)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _hand_made_ca(inter_key, key, old_root.subject, cn="issuing")
    pki.write_private_key(tmp_path / "i.key", inter_key)
    pki.write_public(tmp_path / "i.pem", inter.public_bytes(PEM))
    with pytest.raises(pki.PkiError, match="allow no intermediate"):
        pki.load_issuer(tmp_path / "i.pem", tmp_path / "i.key", old_root, FED, NOW)


# ---- over real mTLS, with the coordinator's issuing CA -------------------------------------------


@dataclass
class Online:
    fed: Federation
    port: int
    issuing_cert: Path
    silo_toml: Path


def _coordinator_toml(tmp: Path, fed: Federation, issuing: tuple[Path, Path]) -> Path:
    path = write_coordinator_config(
        tmp / "c.toml", fed, state_dir=tmp / "coord", task_spec=RECORDING_SPEC, rounds=1,
        min_silos=2,
    )  # fmt: skip
    return with_table(path, auto_renew_table(*issuing))


@pytest.fixture
def online(tmp_path: Path) -> Iterator[Online]:
    fed = provision(tmp_path / "fed", FED, ["a", "b"])
    root = pki.load_ca(fed.root, FED)
    issuing = pki.issue_intermediate(root, tmp_path / "issuing", now=dt.datetime.now(UTC))
    with coordinator_in_process(_coordinator_toml(tmp_path, fed, issuing)) as running:
        silo_toml = write_silo_config(
            tmp_path / "silo-a.toml", fed.silos["a"], port=running.port, task_spec=RECORDING_SPEC
        )
        yield Online(fed, running.port, issuing[0], with_table(silo_toml, RENEW_BEFORE_10_DAYS))


def _reissue(o: Online, *, chain: bool, days: float = 2.0) -> x509.Certificate:
    """Silo a's enrolled key certified by the intermediate, expiring in `days`; its file holds
    the intermediate after the leaf when `chain`."""
    root = pki.load_ca(o.fed.root, FED)
    issuer = pki.load_issuer(o.issuing_cert, o.issuing_cert.with_name(pki.ISSUING_KEY),
                             root.cert, FED, dt.datetime.now(UTC))  # fmt: skip
    return reissue_expiring(o.fed, "a", days=days, issuer=issuer, chain=chain)


def _welcomed(o: Online) -> str:
    """Open a stream with silo a's files as they are now; the silo id the Welcome names."""
    return welcomed_as(o.fed.silos["a"], o.port)


def _status_code(o: Online) -> grpc.StatusCode:
    """What the coordinator answers a Renew call over silo a's files (an empty CSR)."""
    with silo_channel(o.fed.silos["a"], o.port) as channel:
        try:
            pb_grpc.FederationStub(channel).Renew(pb.RenewRequest(csr_pem=b"x"), timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    raise AssertionError("an empty CSR was answered")


def test_grpc_tls_accepts_the_chain_and_the_coordinator_admits_it(online: Online) -> None:
    _reissue(online, chain=True)
    assert _welcomed(online) == f"spiffe://{FED}/silo/a"
    # The leaf alone: gRPC's TLS cannot build a path to the root, the handshake fails.
    _reissue(online, chain=False)
    assert _status_code(online) == grpc.StatusCode.UNAVAILABLE


def test_revoking_the_intermediate_refuses_its_leaves(online: Online) -> None:
    _reissue(online, chain=True)
    assert _status_code(online) == grpc.StatusCode.PERMISSION_DENIED  # admitted; the CSR is bad
    serial = _cert(online.issuing_cert).serial_number
    pki.revoke(online.fed.revoked, serial=serial, silo_id="?", now=dt.datetime.now(UTC),
               reason="issuing key exposed")  # fmt: skip
    with pytest.raises(LinkError, match=r"PERMISSION_DENIED: .*issuing CA .* has been revoked"):
        _welcomed(online)


def test_renewal_through_the_intermediate_installs_leaf_and_chain(online: Online) -> None:
    fed, silo = online.fed, online.fed.silos["a"]
    old = _cert(silo.cert)  # issued by the root at provisioning, expiring in 90 days
    root = pki.load_ca(fed.root, FED)
    short = pki.sign_csr(
        root, (silo.dir / "silo.csr").read_bytes(), federation_id=FED,
        now=dt.datetime.now(UTC), valid_days=2,
    )  # fmt: skip
    silo.cert.write_bytes(short)  # a root-issued certificate about to expire
    roster_before = fed.roster.read_bytes()
    key_before = silo.key.read_bytes()
    now = dt.datetime.now(UTC).timestamp()
    result = renew_as_agent(silo, online.silo_toml, online.port, now)
    assert result is not None and result.installed, result

    chain = load_pem_chain(silo.cert.read_bytes())
    assert len(chain) == 2 and chain[1] == _cert(online.issuing_cert)
    new = chain[0]
    assert new.issuer == chain[1].subject and spki_sha256(new) == spki_sha256(old)
    assert new.not_valid_after_utc <= chain[1].not_valid_after_utc
    assert silo.key.read_bytes() == key_before and fed.roster.read_bytes() == roster_before
    # The next connection presents leaf + intermediate and is admitted.
    assert _welcomed(online) == f"spiffe://{FED}/silo/a"
    # The agent's own checks accept it, and other silos accept its signed envelopes.
    config = load_silo_config(online.silo_toml)
    assert preflight(config, now=dt.datetime.now(UTC)) == f"spiffe://{FED}/silo/a"
    identity, trust = secagg_credentials(config, f"spiffe://{FED}/silo/a")
    assert len(identity.cert_chain_der) == 2
    envelope = identity.seal(b"test-kind", b"payload")
    verify_signer(envelope, f"spiffe://{FED}/silo/a", b"test-kind", trust, dt.datetime.now(UTC))
    leaf_only = type(envelope)(envelope.payload, envelope.signature, envelope.cert_chain[:1])
    with pytest.raises(DecryptionFailed):
        verify_signer(leaf_only, f"spiffe://{FED}/silo/a", b"test-kind", trust,
                      dt.datetime.now(UTC))  # fmt: skip


def test_the_desk_stops_renewing_with_a_revoked_or_expired_intermediate(
    tmp_path: Path, dev: pki.DevFederation
) -> None:
    from coordinator.pki.renewal import RenewalDesk, RenewalUnavailable
    from silo_agent.pki.renewal import renewal_csr

    root = pki.load_ca(dev.dir, FED)
    issuer = _issuer(tmp_path, root, days=10)
    desk = RenewalDesk(federation_id=FED, ca_cert=root.cert, directory=tmp_path / "renewals",
                       issuer=issuer, valid_days=30)  # fmt: skip
    caller = _cert(dev.silos["a"].cert)
    csr = renewal_csr(caller, pki.load_private_key(dev.silos["a"].key))
    silo_id = f"spiffe://{FED}/silo/a"

    def ask(at: dt.datetime, revoked: frozenset[int] = frozenset()) -> bytes:
        outcome = desk.renew(caller=caller, silo_id=silo_id, pin=spki_sha256(caller),
                             csr_pem=csr, now=at.timestamp(), revoked=revoked)  # fmt: skip
        assert outcome.issued
        return outcome.cert_pem

    chain = load_pem_chain(ask(NOW))
    assert chain[1] == issuer.cert and chain[0].issuer == issuer.cert.subject
    assert chain[0].not_valid_after_utc <= issuer.cert.not_valid_after_utc  # cut to 10 days
    with pytest.raises(RenewalUnavailable):
        ask(NOW, frozenset({issuer.cert.serial_number}))
    with pytest.raises(RenewalUnavailable):
        ask(NOW + dt.timedelta(days=11))

"""The federation CA: provisioning, CSR signing and its refusals, roster pins, revocation."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from coordinator.pki import authority as pki
from secagg.identity import CertificateRejected, CertProblem, check_certificate, spki_sha256
from silo_agent.pki.enrollment import EnrollError, csr_pin, generate_key_and_csr

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_dev_makes_a_federation_every_silo_cert_passes(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path, "demo", ["a", "b", "c"], now=NOW)
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    roster = pki.load_roster(fed.roster)
    assert roster.federation_id == "demo" and len(roster.entries) == 3
    for name, paths in fed.silos.items():
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        silo_id = check_certificate(cert, ca, now=NOW, roster=roster)
        assert silo_id == f"spiffe://demo/silo/{name}"
        assert pki.load_roster(paths.roster) == roster  # the silo's pinned copy
        assert paths.ca_cert.read_bytes() == fed.ca_cert.read_bytes()
    for key in [fed.ca_key, fed.coordinator_key, *(p.key for p in fed.silos.values())]:
        assert _mode(key) == 0o600
    assert pki.load_revoked_serials(fed.revoked) == frozenset()


def test_provision_dev_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    pki.provision_dev(tmp_path, "demo", ["a"], now=NOW)
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.provision_dev(tmp_path, "demo", ["a"], now=NOW)


def test_coordinator_cert_names_loopback(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path, "demo", ["a"], now=NOW)
    cert = x509.load_pem_x509_certificate(fed.coordinator_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def _usage(cert: x509.Certificate) -> tuple[bool, int | None, set[str]]:
    """(is a CA, its path length, the key usages it allows) as the certificate states them."""
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert basic.critical and usage.critical
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    )
    allowed = {n for n in names if getattr(usage.value, n)}
    return basic.value.ca, basic.value.path_length, allowed


def test_the_ca_only_signs_certificates_and_every_leaf_only_signs_handshakes(
    tmp_path: Path,
) -> None:
    fed = pki.provision_dev(tmp_path, "demo", ["a"], now=NOW)
    assert fed.operator is not None
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    assert _usage(ca) == (True, 1, {"key_cert_sign", "crl_sign"})  # one intermediate below it
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    for leaf_path in (fed.coordinator_cert, fed.operator.cert, fed.silos["a"].cert):
        leaf = x509.load_pem_x509_certificate(leaf_path.read_bytes())
        assert _usage(leaf) == (False, None, {"digital_signature"}), leaf_path
        assert leaf.issuer == ca.subject


def test_enroll_sign_and_pin(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path / "fed", "demo", [], now=NOW)
    ca = pki.load_ca(fed.dir, "demo")
    csr_path = generate_key_and_csr(tmp_path / "site", "demo", "bank-7")
    assert _mode(tmp_path / "site" / "silo.key") == 0o600
    cert_pem = pki.sign_csr(ca, csr_path.read_bytes(), federation_id="demo", now=NOW)
    roster = pki.add_to_roster(fed.roster, cert_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert roster.version == 1
    assert roster.entries["spiffe://demo/silo/bank-7"] == spki_sha256(cert)
    assert csr_pin(csr_path) == spki_sha256(cert).hex()


def test_enroll_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    generate_key_and_csr(tmp_path, "demo", "a")
    before = (tmp_path / "silo.key").read_bytes()
    with pytest.raises(EnrollError, match="already exists"):
        generate_key_and_csr(tmp_path, "demo", "a")
    assert (tmp_path / "silo.key").read_bytes() == before
    generate_key_and_csr(tmp_path, "demo", "a", force=True)
    assert (tmp_path / "silo.key").read_bytes() != before


def test_enroll_refuses_a_bad_name(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match="letters, digits"):
        generate_key_and_csr(tmp_path, "demo", "a/b")


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, uris: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr_kind", "message"),
    [
        ("other-federation", "must name exactly one silo id"),
        ("no-san", "must name exactly one silo id"),
        ("two-sans", "must name exactly one silo id"),
        ("rsa", "not ECDSA P-256"),
        ("garbage", "not a PEM"),
    ],
)
def test_sign_refuses_bad_csrs(tmp_path: Path, csr_kind: str, message: str) -> None:
    fed = pki.provision_dev(tmp_path, "demo", [], now=NOW)
    ca = pki.load_ca(fed.dir, "demo")
    p256 = ec.generate_private_key(ec.SECP256R1())
    csr = {
        "other-federation": lambda: _csr(p256, ["spiffe://other/silo/a"]),
        "no-san": lambda: _csr(p256, []),
        "two-sans": lambda: _csr(p256, ["spiffe://demo/silo/a", "spiffe://demo/silo/b"]),
        "rsa": lambda: _csr(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), ["spiffe://demo/silo/a"]
        ),
        "garbage": lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
    }[csr_kind]()
    with pytest.raises(pki.PkiError, match=message):
        pki.sign_csr(ca, csr, federation_id="demo", now=NOW)


def test_expired_certificate_is_refused_by_identity_check(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path / "fed", "demo", [], now=NOW)
    ca = pki.load_ca(fed.dir, "demo")
    csr = generate_key_and_csr(tmp_path / "site", "demo", "old")
    cert_pem = pki.sign_csr(
        ca,
        csr.read_bytes(),
        federation_id="demo",
        now=NOW,
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    roster = pki.add_to_roster(fed.roster, cert_pem)
    with pytest.raises(CertificateRejected) as info:
        check_certificate(x509.load_pem_x509_certificate(cert_pem), ca.cert, now=NOW, roster=roster)
    assert info.value.problem is CertProblem.EXPIRED


def test_revocation_list_round_trip(tmp_path: Path) -> None:
    fed = pki.provision_dev(tmp_path, "demo", ["a", "b"], now=NOW)
    cert = x509.load_pem_x509_certificate(fed.silos["a"].cert.read_bytes())
    pki.revoke(fed.revoked, serial=cert.serial_number, silo_id="a", now=NOW, reason="stolen")
    pki.revoke(fed.revoked, serial=cert.serial_number, silo_id="a", now=NOW, reason="again")
    assert pki.load_revoked_serials(fed.revoked) == frozenset({cert.serial_number})
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    with pytest.raises(CertificateRejected) as info:
        check_certificate(
            cert, ca, now=NOW, revoked_serials=sorted(pki.load_revoked_serials(fed.revoked))
        )
    assert info.value.problem is CertProblem.REVOKED


def test_unreadable_revocation_list_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text("{not json")
    with pytest.raises(pki.PkiError, match="revocation list"):
        pki.load_revoked_serials(path)
    assert pki.load_revoked_serials(tmp_path / "missing.json") == frozenset()

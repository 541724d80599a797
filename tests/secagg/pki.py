"""Test PKI: a federation CA, P-256 silo certificates with URI SAN spiffe://test/silo/<name>,
and the pinned roster, generated with `cryptography` once per test session (keys stay in memory).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secagg.identity import Roster, SiloId, silo_id_for, spki_sha256
from secagg.trust import SiloIdentity, Trust

FED = "test"
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
MAX_SILOS = 20


def _cert(
    subject_key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    cn: str,
    uri: str | None,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer if not ca else name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Federation:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    roster: Roster
    silos: tuple[SiloIdentity, ...]
    outsider: SiloIdentity  # CA-signed but not on the roster

    @property
    def trust(self) -> Trust:
        return Trust(self.ca_cert, self.roster)

    def issue(self, name: str, key: ec.EllipticCurvePrivateKey | None = None) -> SiloIdentity:
        """A fresh CA-signed identity (not added to the roster)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        sid = silo_id_for(FED, name)
        cert = _cert(key, self.ca_key, self.ca_cert.subject, name, sid, ca=False)
        return SiloIdentity(sid, key, (cert.public_bytes(serialization.Encoding.DER),))


@functools.cache
def federation() -> Federation:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert(ca_key, ca_key, x509.Name([]), "test-ca", None, ca=True)
    fed = Federation(ca_key, ca_cert, Roster(FED, 1, {}), (), None)  # type: ignore[arg-type]
    silos = tuple(fed.issue(f"s{i:02d}") for i in range(MAX_SILOS))
    pins: dict[SiloId, bytes] = {
        s.silo_id: spki_sha256(x509.load_der_x509_certificate(s.cert_chain_der[0])) for s in silos
    }
    return Federation(ca_key, ca_cert, Roster(FED, 1, pins), silos, fed.issue("outsider"))


def self_signed(
    name: x509.Name,
    valid_from: dt.datetime,
    valid_until: dt.datetime,
    *,
    ca: bool = False,
    padding: int = 0,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a certificate it signed for itself; `ca` adds basicConstraints
    CA:TRUE, `padding` bytes ride in an extension nobody reads."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    if padding:
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")
        builder = builder.add_extension(
            x509.UnrecognizedExtension(oid, b"\0" * padding), critical=False
        )
    return key, builder.sign(key, hashes.SHA256())


def junk_certificate(index: int, size: int) -> bytes:
    """A self-signed certificate (DER), valid at NOW, carrying `size` bytes in an extension
    nobody reads: what a relay could append to an envelope's chain."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"junk{index}")])
    _, cert = self_signed(
        name, NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=3650), padding=size
    )
    return cert.public_bytes(serialization.Encoding.DER)

"""The federation CA and the certificates it issues: coordinator, operators, silos (from CSRs).

Rule: keys are ECDSA P-256 (grpcio's TLS stack refuses Ed25519 client certificates), generated
here only for the CA, the coordinator and operators, and written 0600 from the first byte; a
silo's key never comes here, only its CSR (`sign_csr`). Every refusal is a PkiError that says
what to do. coordinator.pki.authority is the import for all of it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.pki.operator import DEFAULT_OPERATOR_NAME, operator_id_for, valid_name
from secagg.roster_sig import SIGNATURE_SUFFIX

CA_DIR = "ca"
COORDINATOR_DIR = "coordinator"
SILOS_DIR = "silos"
OPERATORS_DIR = "operators"
OPERATOR_CERT = "operator.pem"
OPERATOR_KEY = "operator.key"
OPERATOR_VALID_DAYS = 90
ROSTER_FILE = "roster.json"
ROSTER_SIGNATURE_FILE = ROSTER_FILE + SIGNATURE_SUFFIX
REVOKED_FILE = "revoked.json"


class PkiError(Exception):
    """A PKI operation was refused; str() tells the operator what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class CA:
    """The federation CA: its certificate, key and where they live."""

    federation_id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    dir: Path


@dataclass(frozen=True, slots=True)
class SiloPaths:
    dir: Path
    key: Path
    csr: Path
    cert: Path
    ca_cert: Path
    roster: Path


@dataclass(frozen=True, slots=True)
class OperatorPaths:
    """An operator's client credentials: key (0600), certificate and the CA to verify with."""

    operator_id: str
    dir: Path
    key: Path
    cert: Path
    ca_cert: Path


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, force: bool = False) -> None:
    """Write `key` as PKCS#8 PEM, mode 0600 from creation. Refuses to overwrite unless `force`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        if not force:
            raise PkiError(f"{path} already exists; refusing to overwrite a private key")
        path.unlink()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def write_public(path: Path, data: bytes) -> None:
    """Write public material (certificates, CSRs, rosters) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read private key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an ECDSA key")
    return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware")
    return now.astimezone(dt.UTC)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ca: bool,
) -> x509.CertificateBuilder:
    """What every certificate here starts with: names, key, a random serial, validity, and the
    key usage of its kind: a CA signs certificates and CRLs only (no intermediate below it), a
    leaf signs its TLS handshakes only."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def create_ca(
    directory: Path,
    federation_id: str,
    *,
    now: dt.datetime,
    valid_days: int = 3650,
    force: bool = False,
) -> CA:
    """Create the federation CA under `directory/ca/`. Refuses to replace one unless `force`."""
    ca_dir = directory / CA_DIR
    if (ca_dir / "ca.pem").exists() and not force:
        raise PkiError(f"a CA already exists in {ca_dir}; use --force to replace it")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"silofed {federation_id} CA")])
    start = _utc(now) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=valid_days)
    cert = (
        _builder(name, name, key.public_key(), not_before=start, not_after=end, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(ca_dir / "ca.key", key, force=force)
    write_public(ca_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return CA(federation_id, cert, key, directory)


def load_ca(directory: Path, federation_id: str) -> CA:
    ca_dir = directory / CA_DIR
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"no readable CA certificate at {ca_dir / 'ca.pem'}; run init-ca") from exc
    return CA(federation_id, cert, load_private_key(ca_dir / "ca.key"), directory)


def _leaf(
    ca: CA,
    subject_key: ec.EllipticCurvePublicKey,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        _builder(
            subject,
            ca.cert.subject,
            subject_key,
            not_before=not_before,
            not_after=not_after,
            ca=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def issue_coordinator_cert(
    ca: CA,
    out_dir: Path,
    *,
    now: dt.datetime,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 365,
) -> tuple[Path, Path]:
    """Key + server certificate for the coordinator (SAN: hosts and spiffe://<fed>/coordinator)."""
    key = _new_key()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    sans.append(x509.UniformResourceIdentifier(f"spiffe://{ca.federation_id}/coordinator"))
    start = _utc(now) - dt.timedelta(minutes=5)
    cert = _leaf(
        ca,
        key.public_key(),
        "silofed coordinator",
        sans,
        ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=start,
        not_after=start + dt.timedelta(days=valid_days),
    )
    key_path, cert_path = out_dir / "coordinator.key", out_dir / "coordinator.pem"
    write_private_key(key_path, key, force=True)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def operator_dir(federation_dir: Path, name: str = DEFAULT_OPERATOR_NAME) -> Path:
    """Where `issue_operator_cert` puts operator `name` by default: <dir>/operators/<name>/."""
    return federation_dir / OPERATORS_DIR / name


def issue_operator_cert(
    ca: CA,
    out_dir: Path,
    *,
    name: str = DEFAULT_OPERATOR_NAME,
    now: dt.datetime,
    valid_days: int = OPERATOR_VALID_DAYS,
    force: bool = False,
) -> OperatorPaths:
    """Key (0600) + client certificate for operator `name`, and a copy of the CA certificate.

    The identity is `spiffe://<federation>/operator/<name>` with extended key usage clientAuth:
    the coordinator answers `GetStatus` for it, and refuses it as a silo (it is never pinned in
    the roster). Refuses to replace an existing key unless `force`.
    """
    if not valid_name(name):
        raise PkiError(f"operator name {name!r} may use only letters, digits, '-', '_' and '.'")
    if valid_days < 1:
        raise PkiError(f"--days must be at least 1, got {valid_days}")
    key_path, cert_path = out_dir / OPERATOR_KEY, out_dir / OPERATOR_CERT
    if key_path.exists() and not force:
        raise PkiError(
            f"{key_path} already exists; pass --force to replace this operator's key and "
            "certificate (or choose another --name/--out)"
        )
    key = _new_key()
    operator_id = operator_id_for(ca.federation_id, name)
    start = _utc(now) - dt.timedelta(minutes=5)
    cert = _leaf(
        ca,
        key.public_key(),
        f"silofed operator {name}",
        [x509.UniformResourceIdentifier(operator_id)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=start,
        not_after=start + dt.timedelta(days=valid_days),
    )
    write_private_key(key_path, key, force=force)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    write_public(out_dir / "ca.pem", ca.cert.public_bytes(serialization.Encoding.PEM))
    return OperatorPaths(operator_id, out_dir, key_path, cert_path, out_dir / "ca.pem")


def sign_csr(
    ca: CA,
    csr_pem: bytes,
    *,
    federation_id: str,
    now: dt.datetime,
    valid_days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> bytes:
    """Check a silo's CSR and return its signed certificate (PEM). Raises PkiError."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError("the CSR is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not verify; ask the silo to enroll again")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise PkiError("the CSR's key is not ECDSA P-256; silofed accepts only P-256 keys")
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    prefix = f"spiffe://{federation_id}/silo/"
    if len(uris) != 1 or not uris[0].startswith(prefix) or len(uris[0]) == len(prefix):
        raise PkiError(
            f"the CSR must name exactly one silo id of the form {prefix}<name>; it names {uris}"
        )
    start = not_before or (_utc(now) - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=valid_days))
    cert = _leaf(
        ca,
        key,
        uris[0].removeprefix(prefix),
        [x509.UniformResourceIdentifier(uris[0])],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=start,
        not_after=end,
    )
    return cert.public_bytes(serialization.Encoding.PEM)

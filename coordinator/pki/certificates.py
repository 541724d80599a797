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
from secagg.identity import intermediate_problem
from secagg.roster_sig import SIGNATURE_SUFFIX

CA_DIR = "ca"
COORDINATOR_DIR = "coordinator"
SILOS_DIR = "silos"
OPERATORS_DIR = "operators"
OPERATOR_CERT = "operator.pem"
OPERATOR_KEY = "operator.key"
OPERATOR_VALID_DAYS = 90
# A silo certificate's default lifetime: short, because renewal over the silo's own stream
# (docs/pki.md) replaces it well before expiry without a roster change; renewal is due in the
# last third (30 days), which leaves a month to approve a queued renewal by hand.
SILO_VALID_DAYS = 90
ROSTER_FILE = "roster.json"
ROSTER_SIGNATURE_FILE = ROSTER_FILE + SIGNATURE_SUFFIX
REVOKED_FILE = "revoked.json"
# The online issuing CA (an intermediate below the root): its files and default lifetime.
ISSUING_CERT = "issuing.pem"
ISSUING_KEY = "issuing.key"
ISSUING_CSR = "issuing.csr"
INTERMEDIATE_VALID_DAYS = 90


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


def certificate_builder(
    subject: x509.Name,
    issuer: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ca: bool,
    path_length: int | None = None,
    signs_certificates: bool | None = None,
) -> x509.CertificateBuilder:
    """What every certificate here starts with: names, key, a random serial, validity, and the
    key usage of its kind: a CA signs certificates and CRLs only (`path_length` CAs may follow
    it: 1 for the root, which may issue one intermediate, 0 for that intermediate), a leaf signs
    its TLS handshakes only. `signs_certificates` other than `ca` is never issued here: tests
    build the CA whose key usage forbids signing (what `check_certificate` must refuse)."""
    signs = ca if signs_certificates is None else signs_certificates
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not signs,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=signs,
                crl_sign=signs,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def load_csr(
    csr_pem: bytes, *, whose: str, redo: str
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    """The CSR `whose` names ("the CSR") and its key, once checked: PEM, signed with that key,
    and the key ECDSA P-256 (the only kind certified here). Raises PkiError saying which it is
    not; `redo` tells what to do when the signature does not verify."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"{whose} is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise PkiError(f"the signature of {whose} does not verify; {redo}")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise PkiError(f"the key of {whose} is not ECDSA P-256; silofed accepts only P-256 keys")
    return csr, key


def csr_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs (silo ids) the CSR asks for; none without a SAN extension."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def create_ca(
    directory: Path,
    federation_id: str,
    *,
    now: dt.datetime,
    valid_days: int = 3650,
    force: bool = False,
) -> CA:
    """Create the federation CA under `directory/ca/`. Refuses to replace one unless `force`.

    Path length 1: the root may issue one online intermediate (`issue_intermediate`) besides
    silo, coordinator and operator certificates; roots made before it (path length 0) still
    issue those directly."""
    ca_dir = directory / CA_DIR
    if (ca_dir / "ca.pem").exists() and not force:
        raise PkiError(f"a CA already exists in {ca_dir}; use --force to replace it")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"silofed {federation_id} CA")])
    start = _utc(now) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=valid_days)
    cert = (
        certificate_builder(
            name, name, key.public_key(), not_before=start, not_after=end, ca=True, path_length=1
        )
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


def is_root(cert: x509.Certificate) -> bool:
    """Self-issued: the federation CA itself, never an intermediate."""
    return cert.issuer == cert.subject


def intermediate_csr(out_dir: Path, federation_id: str, *, force: bool = False) -> Path:
    """Where the issuing CA runs (the coordinator host): its key (0600, `issuing.key`) and a CSR
    for the root to sign (`issuing.csr`). Returns the CSR's path; the key never leaves here."""
    key = _new_key()
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"silofed {federation_id} issuing CA")]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    write_private_key(out_dir / ISSUING_KEY, key, force=force)
    write_public(out_dir / ISSUING_CSR, csr.public_bytes(serialization.Encoding.PEM))
    return out_dir / ISSUING_CSR


def sign_intermediate(
    root: CA, csr_pem: bytes, *, now: dt.datetime, valid_days: int = INTERMEDIATE_VALID_DAYS
) -> bytes:
    """The root signs an issuing CA's CSR: CA:TRUE with path length 0 (it issues leaves only),
    key usage certificate + CRL signing only, `valid_days` long. Raises PkiError."""
    if not is_root(root.cert):
        raise PkiError("only the federation CA (the root) may issue an intermediate")
    if valid_days < 1:
        raise PkiError(f"--days must be at least 1, got {valid_days}")
    csr, key = load_csr(csr_pem, whose="the intermediate's CSR", redo="make it again")
    start = _utc(now) - dt.timedelta(minutes=5)
    end = min(start + dt.timedelta(days=valid_days), root.cert.not_valid_after_utc)
    cert = (
        certificate_builder(
            csr.subject,
            root.cert.subject,
            key,
            not_before=start,
            not_after=end,
            ca=True,
            path_length=0,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_intermediate(
    root: CA,
    out_dir: Path,
    *,
    now: dt.datetime,
    valid_days: int = INTERMEDIATE_VALID_DAYS,
    force: bool = False,
) -> tuple[Path, Path]:
    """Both steps on one machine (dev, or a root brought to the coordinator host): the issuing
    CA's key and CSR in `out_dir`, signed by `root` into `issuing.pem`. Returns (cert, key)."""
    csr_path = intermediate_csr(out_dir, root.federation_id, force=force)
    cert_pem = sign_intermediate(root, csr_path.read_bytes(), now=now, valid_days=valid_days)
    write_public(out_dir / ISSUING_CERT, cert_pem)
    return out_dir / ISSUING_CERT, out_dir / ISSUING_KEY


def load_issuer(
    cert_path: Path,
    key_path: Path,
    root_cert: x509.Certificate,
    federation_id: str,
    now: dt.datetime,
) -> CA:
    """The CA that signs renewals online: the root itself, or an intermediate it issued that
    may issue now (secagg.identity.intermediate_problem). Raises PkiError saying why not."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"issuing certificate {cert_path} is unreadable") from exc
    key = load_private_key(key_path)
    if key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    if cert.public_key() != root_cert.public_key():
        problem = intermediate_problem(cert, root_cert, now=now)
        if problem is not None:
            raise PkiError(
                f"{cert_path} cannot sign silo certificates: {problem}; issue a new one "
                "(silofed-coordinator issue-intermediate) or point at the federation CA"
            )
    return CA(federation_id, cert, key, cert_path.parent)


def chain_pem(issuer: CA, leaf_pem: bytes) -> bytes:
    """What a silo installs as its `[tls] cert`: the leaf, then the intermediate that issued
    it (nothing more when the root issued it: every party already holds the root)."""
    if is_root(issuer.cert):
        return leaf_pem
    return leaf_pem + issuer.cert.public_bytes(serialization.Encoding.PEM)


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
        certificate_builder(
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
    valid_days: int = SILO_VALID_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> bytes:
    """Check a silo's CSR and return its signed certificate (PEM). Raises PkiError."""
    csr, key = load_csr(csr_pem, whose="the CSR", redo="ask the silo to enroll again")
    uris = csr_uris(csr)
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

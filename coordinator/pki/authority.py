"""The federation CA: create it, issue certificates, keep the roster and the revocation list.

Rule: this is the coordinator operator's side of the PKI. It never sees a silo's private key in
production: a silo enrolls on site (`silofed-silo enroll`) and hands over only a CSR. The one
exception is `provision_dev`, which plays every party on one machine for the demo and tests and
still writes each silo's key into that silo's own directory. Keys are ECDSA P-256 (grpcio's TLS
stack refuses Ed25519 client certificates) and are written 0600 from the first byte.

Rosters are signed: every roster this module writes gets a detached signature by the CA key
beside it (`roster.json.sig`, secagg.roster_sig), so the coordinator can deliver a new roster
version to silos that pin an older one and they can check it came from the CA, not from the
coordinator. `write_roster` writes the signature before the roster: a reader that sees the new
roster finds its signature already there.

Operator certificates (`issue_operator_cert`) let the coordinator operator's tools (`status`,
health probes) authenticate over mTLS: clientAuth, URI SAN `spiffe://<federation>/operator/<name>`
(see coordinator.pki.operator), never on the roster, so they can read status but never join rounds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.pki.operator import DEFAULT_OPERATOR_NAME, operator_id_for, valid_name
from secagg.identity import Roster, SiloId, build_silo_csr, spki_sha256, uri_san
from secagg.roster_sig import SIGNATURE_SUFFIX, roster_signature_valid, sign_roster

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


@dataclass(frozen=True, slots=True)
class DevFederation:
    """Every path of a dev federation made by `provision_dev`."""

    federation_id: str
    dir: Path
    ca_cert: Path
    ca_key: Path
    coordinator_cert: Path
    coordinator_key: Path
    roster: Path
    revoked: Path
    silos: dict[str, SiloPaths]
    operator: OperatorPaths | None = None


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
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
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
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
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


def load_roster(path: Path) -> Roster:
    try:
        return Roster.from_json(path.read_text())
    except OSError as exc:
        raise PkiError(f"cannot read roster {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"roster {path} is invalid: {exc}") from exc


def roster_signature_path(roster_path: Path) -> Path:
    """Where a roster's detached signature lives: `<roster>.sig`."""
    return roster_path.with_name(roster_path.name + SIGNATURE_SUFFIX)


def roster_bytes(roster: Roster) -> bytes:
    """A roster's file contents (what is signed and delivered, byte for byte)."""
    return roster.to_json().encode() + b"\n"


def write_roster(roster_path: Path, roster: Roster, ca: CA | None) -> bytes:
    """Save `roster`, signed by `ca` (or unsigned, any stale signature removed, when None).

    The signature is written first, so whoever sees the new roster finds its signature; a
    reader between the two renames sees the old roster with the new signature, which fails
    verification and is reread when the roster file changes. Returns the file's bytes.
    """
    data = roster_bytes(roster)
    sig_path = roster_signature_path(roster_path)
    if ca is not None:
        write_public(sig_path, sign_roster(ca.key, data))
    else:
        sig_path.unlink(missing_ok=True)
    write_public(roster_path, data)
    return data


def sign_roster_file(roster_path: Path, ca: CA) -> Roster:
    """(Re-)sign a roster file as it is, e.g. one edited by hand. Raises PkiError when it is
    unreadable or not for the CA's federation."""
    data = _read_roster_bytes(roster_path)
    roster = _parse_roster(roster_path, data)
    if roster.federation_id != ca.federation_id:
        raise PkiError(
            f"roster {roster_path} is for federation {roster.federation_id!r}, the CA for "
            f"{ca.federation_id!r}; sign a roster of this federation"
        )
    write_public(roster_signature_path(roster_path), sign_roster(ca.key, data))
    return roster


@dataclass(frozen=True, slots=True)
class SignedRoster:
    """A roster file as read, with its signature when one is present and valid.

    `problem` says why it cannot be delivered to silos (no signature, or one that does not
    verify with the CA certificate); None when `signature` is set."""

    roster: Roster
    data: bytes
    signature: bytes | None
    problem: str | None


def _read_roster_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read roster {path}: {exc.strerror}") from exc


def _parse_roster(path: Path, data: bytes) -> Roster:
    try:
        return Roster.from_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PkiError(f"roster {path} is invalid: {exc}") from exc


def load_signed_roster(roster_path: Path, ca_cert: x509.Certificate) -> SignedRoster:
    """Read a roster and check its detached signature with `ca_cert`. Raises PkiError when the
    roster itself is unreadable or invalid; a missing or bad signature is `problem`."""
    data = _read_roster_bytes(roster_path)
    roster = _parse_roster(roster_path, data)
    sig_path = roster_signature_path(roster_path)
    try:
        signature = sig_path.read_bytes()
    except FileNotFoundError:
        return SignedRoster(
            roster,
            data,
            None,
            f"{sig_path} is missing: silos cannot check this roster, so it is not delivered "
            "to them; sign it with `silofed-coordinator sign-roster --dir FEDERATION_DIR`",
        )
    except OSError as exc:
        return SignedRoster(roster, data, None, f"cannot read {sig_path}: {exc.strerror}")
    if not roster_signature_valid(ca_cert, data, signature):
        return SignedRoster(
            roster,
            data,
            None,
            f"{sig_path} does not verify with the federation CA for {roster_path} as it is now "
            "(edited after signing, or signed by another CA); re-sign it with "
            "`silofed-coordinator sign-roster --dir FEDERATION_DIR`",
        )
    return SignedRoster(roster, data, signature, None)


def add_to_roster(roster_path: Path, cert_pem: bytes, *, ca: CA | None = None) -> Roster:
    """Pin the certificate's key for its silo id, one roster version up, and save the roster
    (signed by `ca` when given; see `write_roster`)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    silo_id = uri_san(cert)
    if silo_id is None:
        raise PkiError("the certificate has no single URI SAN; it is not a silo certificate")
    roster = load_roster(roster_path).with_silo(SiloId(silo_id), spki_sha256(cert))
    write_roster(roster_path, roster, ca)
    return roster


def _read_revoked(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        entries = raw["revoked"]
        if not isinstance(entries, list):
            raise TypeError("'revoked' is not a list")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PkiError(f"revocation list {path} is unreadable ({exc}); fix or restore it") from exc


def revoke(revoked_path: Path, *, serial: int, silo_id: str, now: dt.datetime, reason: str) -> None:
    """Add a certificate serial to the revocation list (idempotent)."""
    entries = _read_revoked(revoked_path)
    if any(int(e["serial"], 16) == serial for e in entries):
        return
    entries.append(
        {
            "serial": f"{serial:x}",
            "silo_id": silo_id,
            "revoked_at": _utc(now).isoformat(),
            "reason": reason,
        }
    )
    write_public(revoked_path, json.dumps({"revoked": entries}, indent=2).encode() + b"\n")


def load_revoked_serials(path: Path) -> frozenset[int]:
    """The revoked serial numbers; a missing file means none."""
    try:
        return frozenset(int(e["serial"], 16) for e in _read_revoked(path))
    except (KeyError, ValueError, TypeError) as exc:
        raise PkiError(f"revocation list {path} has a malformed entry: {exc}") from exc


def _dev_silo_key_and_csr(silo_dir: Path, federation_id: str, name: str) -> bytes:
    # Dev provisioning plays the silo here: the key is generated in the silo's own directory,
    # exactly as `silofed-silo enroll` would, and only the CSR travels to the CA.
    key = _new_key()
    write_private_key(silo_dir / "silo.key", key, force=True)
    pem = build_silo_csr(key, federation_id, name)
    write_public(silo_dir / "silo.csr", pem)
    return pem


def provision_dev(
    directory: Path,
    federation_id: str,
    silo_names: Sequence[str],
    *,
    now: dt.datetime,
    force: bool = False,
) -> DevFederation:
    """CA, coordinator certificate, roster, empty revocation list and N enrolled silos."""
    directory = Path(directory)
    ca = create_ca(directory, federation_id, now=now, force=force)
    coord_cert, coord_key = issue_coordinator_cert(ca, directory / COORDINATOR_DIR, now=now)
    roster_path, revoked_path = directory / ROSTER_FILE, directory / REVOKED_FILE
    write_roster(roster_path, Roster(federation_id, 0, {}), ca)
    write_public(revoked_path, b'{"revoked": []}\n')
    silos: dict[str, SiloPaths] = {}
    for name in silo_names:
        silo_dir = directory / SILOS_DIR / name
        csr_pem = _dev_silo_key_and_csr(silo_dir, federation_id, name)
        cert_pem = sign_csr(ca, csr_pem, federation_id=federation_id, now=now)
        write_public(silo_dir / "silo.pem", cert_pem)
        add_to_roster(roster_path, cert_pem, ca=ca)
        silos[name] = SiloPaths(
            silo_dir,
            silo_dir / "silo.key",
            silo_dir / "silo.csr",
            silo_dir / "silo.pem",
            silo_dir / "ca.pem",
            silo_dir / ROSTER_FILE,
        )
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    pinned = roster_path.read_bytes()
    signature = roster_signature_path(roster_path).read_bytes()
    for paths in silos.values():
        write_public(paths.ca_cert, ca_pem)
        write_public(roster_signature_path(paths.roster), signature)
        write_public(paths.roster, pinned)
    # So `silofed-coordinator status` works against the dev federation out of the box.
    operator = issue_operator_cert(ca, operator_dir(directory), now=now, force=True)
    return DevFederation(
        federation_id,
        directory,
        directory / CA_DIR / "ca.pem",
        directory / CA_DIR / "ca.key",
        coord_cert,
        coord_key,
        roster_path,
        revoked_path,
        silos,
        operator,
    )

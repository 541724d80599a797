"""Who a silo is: certificates, the pinned roster, and the checks both roles make.

Pure: every function takes bytes or parsed objects and the current time as arguments; nothing
here reads files, clocks or sockets. The coordinator uses it to admit a TLS peer; silos use it
(through `verify_signer`) to check every signed message the coordinator relays.

A silo's identity is the URI SAN of its certificate (e.g. ``spiffe://demo/silo/hospital-a``).
The roster maps each silo id to the SHA-256 of its certificate's SubjectPublicKeyInfo; it is
agreed by the consortium and pinned by every silo, so the coordinator cannot add members.

A leaf is issued by the federation CA (the root) directly, or by one intermediate the root
issued (the coordinator's online issuing CA), presented beside the leaf (TLS chain, certificate
file, envelope chain). The intermediate must be a CA allowed to sign certificates, valid now,
not revoked, and the root's path length must allow it; never more than one level.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NewType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from secagg.primitives import SigningKey, is_p256, signed_csr_pem, spki_der

SiloId = NewType("SiloId", str)

PID = b"secagg/v1"
SILO_PATH_SEGMENT = "/silo/"


class CertProblem(enum.Enum):
    """Why a certificate was refused; `value` is the sentence an operator reads."""

    NOT_FROM_FEDERATION_CA = "not signed by the federation CA"
    WRONG_KEY_TYPE = "key is not ECDSA P-256"
    NO_URI_SAN = "has no single URI subject alternative name (the silo id)"
    NOT_YET_VALID = "is not valid yet"
    EXPIRED = "has expired"
    NOT_ON_ROSTER = "belongs to a silo that is not on the roster"
    ROSTER_KEY_MISMATCH = "key does not match the roster entry for this silo"
    REVOKED = "has been revoked"
    WRONG_SILO = "names a different silo than expected"
    BAD_INTERMEDIATE = "is issued by an intermediate CA that cannot issue it"


class CertificateRejected(Exception):
    """A certificate failed a check. `problem` says which; str() is an operator-facing sentence."""

    def __init__(self, problem: CertProblem, subject: str, detail: str = "") -> None:
        self.problem = problem
        self.subject = subject
        message = f"certificate of {subject} {problem.value}"
        super().__init__(f"{message}: {detail}" if detail else message)


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _lp(data: bytes) -> bytes:
    return _u32(len(data)) + data


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo (the roster's pin)."""
    return hashlib.sha256(spki_der(cert.public_key())).digest()


def uri_san(cert: x509.Certificate) -> str | None:
    """The certificate's single URI SAN, or None when it has none or several."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def silo_id_for(federation_id: str, name: str) -> SiloId:
    """The canonical silo id for a silo called `name` in `federation_id`."""
    return SiloId(f"spiffe://{federation_id}{SILO_PATH_SEGMENT}{name}")


def _describe(cert: x509.Certificate) -> str:
    return uri_san(cert) or cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _as_utc(moment: _dt.datetime) -> _dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("`now` must be timezone-aware")
    return moment.astimezone(_dt.UTC)


@dataclass(frozen=True, slots=True)
class Roster:
    """The pinned membership list: silo id -> SHA-256(SPKI), with a version and its federation."""

    federation_id: str
    version: int
    entries: Mapping[SiloId, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.federation_id:
            raise ValueError("roster federation_id is empty")
        if self.version < 0:
            raise ValueError("roster version must be >= 0")
        for silo_id, pin in self.entries.items():
            if len(pin) != 32:
                raise ValueError(f"roster pin for {silo_id} is not 32 bytes")

    def canonical_bytes(self) -> bytes:
        """u32(version) ‖ lp(federation_id) ‖ for each id in bytewise order: lp(id) ‖ pin."""
        body = _u32(self.version) + _lp(self.federation_id.encode())
        for silo_id in sorted(self.entries, key=lambda s: s.encode()):
            body += _lp(silo_id.encode()) + self.entries[silo_id]
        return body

    def digest(self) -> bytes:
        """roster_digest = H(PID ‖ b"/roster\\x00" ‖ canonical roster bytes)
        (docs/secagg-protocol.md §3)."""
        return hashlib.sha256(PID + b"/roster\x00" + self.canonical_bytes()).digest()

    def with_silo(self, silo_id: SiloId, pin: bytes) -> Roster:
        """A new roster, one version up, with `silo_id` pinned to `pin` (added or replaced)."""
        entries = dict(self.entries)
        entries[silo_id] = pin
        return Roster(self.federation_id, self.version + 1, entries)

    def to_json(self) -> str:
        return json.dumps(
            {
                "federation_id": self.federation_id,
                "version": self.version,
                "silos": {sid: pin.hex() for sid, pin in sorted(self.entries.items())},
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse a roster file's text. Raises ValueError naming the bad field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"roster is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError("roster must be a JSON object")
        fed, version, silos = raw.get("federation_id"), raw.get("version"), raw.get("silos")
        if not isinstance(fed, str):
            raise ValueError("roster field 'federation_id' must be a string")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("roster field 'version' must be an integer")
        if not isinstance(silos, dict):
            raise ValueError("roster field 'silos' must be an object of silo id -> hex pin")
        entries: dict[SiloId, bytes] = {}
        for sid, pin in silos.items():
            try:
                entries[SiloId(sid)] = bytes.fromhex(pin)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"roster pin for {sid!r} is not hex") from exc
        return cls(fed, version, entries)


def check_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    now: _dt.datetime,
    roster: Roster | None = None,
    expected_silo_id: str | None = None,
    revoked_serials: Sequence[int] = (),
    intermediates: Sequence[x509.Certificate] = (),
) -> SiloId:
    """Check a silo certificate and return its silo id.

    Checks, in order: issued by `ca_cert` directly or through one of `intermediates`
    (`check_issuer`); ECDSA P-256 key; exactly one URI SAN; validity covers
    `now`; not revoked; equals `expected_silo_id` when given; pinned by `roster` when given.
    Raises CertificateRejected naming the first failed check.
    """
    subject = _describe(cert)
    moment = _as_utc(now)
    check_issuer(cert, ca_cert, intermediates, now=moment, revoked_serials=revoked_serials)
    if not is_p256(cert.public_key()):
        raise CertificateRejected(CertProblem.WRONG_KEY_TYPE, subject)
    silo_id = uri_san(cert)
    if silo_id is None:
        raise CertificateRejected(CertProblem.NO_URI_SAN, subject)
    if moment < cert.not_valid_before_utc:
        raise CertificateRejected(
            CertProblem.NOT_YET_VALID,
            subject,
            f"valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )
    if moment > cert.not_valid_after_utc:
        raise CertificateRejected(
            CertProblem.EXPIRED, subject, f"expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.serial_number in set(revoked_serials):
        raise CertificateRejected(CertProblem.REVOKED, subject, f"serial {cert.serial_number:x}")
    if expected_silo_id is not None and silo_id != expected_silo_id:
        raise CertificateRejected(CertProblem.WRONG_SILO, subject, f"expected {expected_silo_id}")
    if roster is not None:
        pin = roster.entries.get(SiloId(silo_id))
        if pin is None:
            raise CertificateRejected(CertProblem.NOT_ON_ROSTER, subject)
        if pin != spki_sha256(cert):
            raise CertificateRejected(CertProblem.ROSTER_KEY_MISMATCH, subject)
    return SiloId(silo_id)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def intermediate_problem(
    intermediate: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    now: _dt.datetime,
    revoked_serials: Sequence[int] = (),
) -> str | None:
    """Why `intermediate` may not issue silo certificates under `ca_cert`, or None when it may:
    signed by the root, whose path length allows one CA below it; a CA (basicConstraints) whose
    key usage includes certificate signing; valid at `now`; its serial not revoked."""
    name = intermediate.subject.rfc4514_string() or f"serial {intermediate.serial_number:x}"
    if not _signed_by(intermediate, ca_cert):
        return f"intermediate {name} is not signed by the federation CA"
    root = _constraints(ca_cert)
    if root is None or not root.ca or root.path_length == 0:
        return (
            f"the federation CA's basic constraints (path length 0) allow no intermediate below "
            f"it, so {name} cannot issue certificates; issue the certificate from the root, or "
            "create a root with path length 1"
        )
    own = _constraints(intermediate)
    if own is None or not own.ca:
        return f"{name} is not a CA certificate (basicConstraints CA:FALSE)"
    try:
        usage = intermediate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        return f"{name}'s key usage does not allow signing certificates"
    moment = _as_utc(now)
    if not intermediate.not_valid_before_utc <= moment <= intermediate.not_valid_after_utc:
        return (
            f"intermediate {name} is valid only {intermediate.not_valid_before_utc:%Y-%m-%d} to "
            f"{intermediate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if intermediate.serial_number in set(revoked_serials):
        return f"intermediate {name} (serial {intermediate.serial_number:x}) has been revoked"
    return None


def check_issuer(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    intermediates: Sequence[x509.Certificate] = (),
    *,
    now: _dt.datetime,
    revoked_serials: Sequence[int] = (),
) -> None:
    """`cert` is issued by `ca_cert`, or by one of `intermediates` that `ca_cert` issued and
    that passes `intermediate_problem`. Raises CertificateRejected (NOT_FROM_FEDERATION_CA, or
    BAD_INTERMEDIATE naming the intermediate's failed check)."""
    subject = _describe(cert)
    if _signed_by(cert, ca_cert):
        return
    issuer = next(
        (i for i in intermediates if i.subject == cert.issuer and _signed_by(cert, i)), None
    )
    if issuer is None:
        raise CertificateRejected(CertProblem.NOT_FROM_FEDERATION_CA, subject)
    problem = intermediate_problem(issuer, ca_cert, now=now, revoked_serials=revoked_serials)
    if problem is not None:
        raise CertificateRejected(CertProblem.BAD_INTERMEDIATE, subject, problem)


def load_pem_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    """Every PEM certificate in `data`, leaf first (a certificate file may carry its issuing
    intermediate after the leaf). Raises ValueError when there is none or one is malformed."""
    return tuple(x509.load_pem_x509_certificates(data))


def load_pem_certificate(data: bytes) -> x509.Certificate:
    """Parse one PEM certificate. Raises ValueError on malformed input."""
    return x509.load_pem_x509_certificate(data)


def load_der_certificate(data: bytes) -> x509.Certificate:
    """Parse one DER certificate. Raises ValueError on malformed input."""
    return x509.load_der_x509_certificate(data)


def build_silo_csr(key: SigningKey, federation_id: str, name: str) -> bytes:
    """The PEM CSR a silo sends to the federation CA: CN = name, one URI SAN = its silo id.

    One definition for both sides: `silofed-silo enroll` on a silo's machine, and the dev
    provisioning that plays every silo on one machine.
    """
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(silo_id_for(federation_id, name))]
            ),
            critical=False,
        )
    )
    return signed_csr_pem(builder, key)

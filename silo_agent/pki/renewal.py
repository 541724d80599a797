"""Renewing this silo's certificate over its own connection, before it expires.

Rule: a renewal keeps the key and the identity, so the roster pin (silo id + SHA-256 of the
public key) stays as it is and no other silo sees a roster change. When the certificate expires
within `[pki] renew_before_days` (default: its last third of lifetime), the silo sends a CSR made
with its current key and naming its current silo id over the mutually authenticated channel it
streams on (rpc Renew); the coordinator checks the caller as it checks a connection. A returned
certificate is installed only when it is for the same id and key, issued by the pinned CA
(directly, or by the coordinator's intermediate, whose certificate follows the leaf in the reply
and stays after it in the installed file: TLS presents it, envelopes carry it) and lasts longer
than the current one; it replaces `[tls] cert` atomically (temporary file, fsync,
rename) and the key file is never touched. The agent uses it from its next connection
(silo_agent.runtime.runner reconnects after the round in progress). This module never imports
grpc: the runner hands it the call.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protos import federation_pb2 as pb
from secagg.identity import (
    CertificateRejected,
    check_issuer,
    load_pem_certificate,
    load_pem_chain,
    uri_san,
)
from secagg.primitives import signed_csr_pem
from silo_agent.config import SiloConfig

log = logging.getLogger("silofed.silo")

DAY_S = 86400.0

# The call that carries a request to the coordinator (the runner binds it to its channel).
RenewCall = Callable[[pb.RenewRequest], pb.RenewReply]


class RenewalError(Exception):
    """A renewal could not be made or installed; str() says why and what to do."""


def renew_at(cert: x509.Certificate, renew_before_days: float | None) -> float:
    """Unix time from which `cert` is due for renewal: `renew_before_days` before its expiry,
    or, when None, when two thirds of its lifetime have passed."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    if renew_before_days is None:
        return start + (end - start) * 2 / 3
    return end - renew_before_days * DAY_S


def renewal_csr(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR for the same identity (URI SAN, common name) and the same key as `cert`."""
    silo_id = uri_san(cert)
    if silo_id is None:
        raise RenewalError("this silo's certificate has no single URI SAN; re-enroll the silo")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else silo_id.rsplit("/", 1)[-1]
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(silo_id)]),
            critical=False,
        )
    )
    return signed_csr_pem(builder, key)


def check_renewed(
    new: x509.Certificate,
    current: x509.Certificate,
    ca: x509.Certificate,
    now: dt.datetime,
    intermediates: Sequence[x509.Certificate] = (),
) -> None:
    """The new certificate may replace `current`: issued by the pinned CA (directly or through
    one of `intermediates`), the same silo id and key, valid now and lasting longer. Raises
    RenewalError saying which check failed."""
    try:
        check_issuer(new, ca, intermediates, now=now)
    except CertificateRejected as exc:
        raise RenewalError(
            f"the renewed certificate is not issued by the pinned CA: {exc}"
        ) from None
    if uri_san(new) != uri_san(current):
        raise RenewalError(
            f"the renewed certificate names {uri_san(new)}, this silo is {uri_san(current)}"
        )
    if new.public_key() != current.public_key():
        raise RenewalError("the renewed certificate is for another key than this silo's")
    if not new.not_valid_before_utc <= now < new.not_valid_after_utc:
        raise RenewalError("the renewed certificate is not valid now")
    if new.not_valid_after_utc <= current.not_valid_after_utc:
        raise RenewalError("the renewed certificate does not last longer than the current one")


def write_certificate(path: Path, pem: bytes) -> None:
    """Replace `path` atomically (temporary file, fsync, rename; mode 0644: it is public)."""
    tmp = path.with_name(path.name + ".renewing")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True, slots=True)
class RenewResult:
    """What one attempt did: `installed` a new certificate, or why not (`detail`)."""

    installed: bool
    detail: str


def renew_if_due(config: SiloConfig, call: RenewCall, *, now: float) -> RenewResult | None:
    """Ask for a renewal when this silo's certificate is due, and install what comes back.

    None when it is not due (or renewal is off). Raises RenewalError when the request cannot be
    made or the reply cannot be installed; the call's own errors propagate."""
    if not config.pki.auto_renew:
        return None
    tls = config.tls
    cert = load_pem_certificate(tls.cert.read_bytes())
    if now < renew_at(cert, config.pki.renew_before_days):
        return None
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RenewalError(f"{tls.key} is not an ECDSA key; re-enroll the silo")
    log.info(
        "certificate %s expires %s UTC: asking the coordinator to renew it (same key)",
        tls.cert,
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}",
    )
    reply = call(pb.RenewRequest(csr_pem=renewal_csr(cert, key)))
    if reply.outcome == pb.RenewReply.QUEUED:
        log.info("renewal requested: %s", reply.detail)
        return RenewResult(False, reply.detail)
    if reply.outcome != pb.RenewReply.ISSUED:
        raise RenewalError(f"the coordinator answered the renewal with {reply.outcome}")
    try:
        chain = load_pem_chain(reply.cert_pem)
    except ValueError:
        raise RenewalError("the coordinator's renewed certificate is not PEM") from None
    if len(chain) > 2:
        raise RenewalError("the renewed certificate file holds more than a leaf and its issuer")
    new = chain[0]
    ca = load_pem_certificate(tls.ca_cert.read_bytes())
    check_renewed(new, cert, ca, dt.datetime.fromtimestamp(now, dt.UTC), chain[1:])
    write_certificate(tls.cert, reply.cert_pem)
    log.info(
        "installed the renewed certificate in %s: serial %x, valid until %s UTC (%s); the "
        "roster is unchanged (same key)",
        tls.cert,
        new.serial_number,
        f"{new.not_valid_after_utc:%Y-%m-%d %H:%M}",
        reply.detail,
    )
    return RenewResult(True, reply.detail)

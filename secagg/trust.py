"""VerifySigner (docs/secagg-protocol.md §3): who signed an envelope, checked against the CA and
the pinned roster.

Rule: the signature is checked over the exact received payload bytes with the leaf key of a
certificate that chains to the federation CA (directly, or through the one intermediate the
envelope's chain carries after the leaf), names the expected silo, is valid at the injected
`now` and is pinned by the roster. Every failure is `DecryptionFailed` (opaque) to the caller.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509

from secagg.errors import DecryptionFailed
from secagg.identity import (
    CertificateRejected,
    Roster,
    SignatureMemo,
    SiloId,
    check_certificate,
)
from secagg.messages import SignedEnvelope
from secagg.primitives import SigningKey, sign, verify, verifying_key


@dataclass(frozen=True, slots=True)
class Trust:
    """The out-of-band anchors: federation CA certificate and the pinned roster.

    `signatures` remembers the certificate signatures already verified (the same members'
    certificates arrive in several messages of every round); a holder that builds a Trust per
    round passes its own long-lived one."""

    ca_cert: x509.Certificate
    roster: Roster
    revoked_serials: tuple[int, ...] = field(default=())
    signatures: SignatureMemo = field(
        default_factory=SignatureMemo, compare=False, hash=False, repr=False
    )


@dataclass(frozen=True, slots=True)
class SiloIdentity:
    """A silo's long-term identity: its id (URI SAN), P-256 signing key, DER chain (leaf first)."""

    silo_id: SiloId
    signing_key: SigningKey
    cert_chain_der: tuple[bytes, ...]

    def seal(self, kind: bytes, payload: bytes) -> SignedEnvelope:
        return SignedEnvelope(payload, sign(self.signing_key, kind, payload), self.cert_chain_der)


def verify_signer(
    env: SignedEnvelope, expected_silo_id: str, kind: bytes, trust: Trust, now: dt.datetime
) -> None:
    """Raise DecryptionFailed unless `env` is validly signed by `expected_silo_id`'s pinned key."""
    if not env.cert_chain:
        raise DecryptionFailed()
    try:
        leaf = x509.load_der_x509_certificate(env.cert_chain[0])
        # A leaf from the coordinator's issuing CA carries that intermediate next; one level is
        # all a chain may have, so a longer list is never parsed.
        intermediates = [x509.load_der_x509_certificate(d) for d in env.cert_chain[1:3]]
        check_certificate(
            leaf,
            trust.ca_cert,
            now=now,
            roster=trust.roster,
            expected_silo_id=expected_silo_id,
            revoked_serials=trust.revoked_serials,
            intermediates=intermediates,
            signed_by=trust.signatures,
        )
    except (ValueError, CertificateRejected) as exc:
        raise DecryptionFailed() from exc
    key = verifying_key(leaf.public_key())
    if key is None:
        raise DecryptionFailed()
    verify(key, env.signature, kind, env.payload)

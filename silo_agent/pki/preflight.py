"""The silo's own key, certificate and pinned roster, checked before anything is dialed.

Rule: one reading of the TLS files and one certificate-against-roster check, used by the agent
before it dials (`preflight`) and by `silofed-silo check` (its roster-pin line), so the two can
never disagree. An expired, foreign or unlisted certificate, or a key that is not the
certificate's, is reported with its precise cause and the fix instead of as an opaque TLS error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secagg.identity import (
    CertificateRejected,
    Roster,
    SiloId,
    check_certificate,
    load_pem_certificate,
    load_pem_chain,
    silo_id_for,
)
from secagg.trust import SiloIdentity, Trust
from silo_agent.config import SiloConfig


class PreflightError(Exception):
    """This silo's own certificate cannot work; str() names the cause and the fix."""


@dataclass(frozen=True, slots=True)
class PinnedFiles:
    """This silo's certificate, the federation CA and the pinned roster, as [tls] names them."""

    cert: x509.Certificate
    ca: x509.Certificate
    roster: Roster
    expected_silo_id: str | None  # [silo] silo_id, else the one [silo] name gives, else None
    intermediates: tuple[x509.Certificate, ...] = ()  # after the leaf in [tls] cert

    @classmethod
    def read(cls, config: SiloConfig) -> PinnedFiles:
        chain = load_pem_chain(config.tls.cert.read_bytes())
        ca = load_pem_certificate(config.tls.ca_cert.read_bytes())
        roster = Roster.from_json(config.tls.roster.read_text())
        expected = config.silo_id
        if expected is None and config.name is not None:
            expected = silo_id_for(roster.federation_id, config.name)
        return cls(chain[0], ca, roster, expected, chain[1:])

    def check(self, now: dt.datetime) -> str:
        """Our silo id; raises CertificateRejected (expired, not from the CA or its
        intermediate, not on the roster, another silo's)."""
        return check_certificate(
            self.cert, self.ca, now=now, roster=self.roster,
            expected_silo_id=self.expected_silo_id, intermediates=self.intermediates,
        )  # fmt: skip


def preflight(config: SiloConfig, *, now: dt.datetime) -> str:
    """Check our certificate against the pinned CA and roster; return our silo id.

    Raises PreflightError with the precise cause (expired, not from the federation CA, not on
    the pinned roster, wrong silo) before anything is sent over the network.
    """
    try:
        silo_id = PinnedFiles.read(config).check(now)
    except CertificateRejected as exc:
        raise PreflightError(
            f"refusing to dial: this silo's {config.tls.cert} — {exc}. "
            "Re-enroll the silo (silofed-silo enroll) or fix [tls] in "
            f"{config.source}."
        ) from exc
    _check_key_pair(config)
    return silo_id


def _check_key_pair(config: SiloConfig) -> None:
    """The private key must belong to the certificate: with another key every TLS handshake
    fails, and the agent would otherwise retry forever without saying why."""
    tls = config.tls
    try:
        key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PreflightError(
            f"{tls.key}: not a readable unencrypted PEM private key ({exc}); fix [tls] key in "
            f"{config.source}"
        ) from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    cert_key = load_pem_certificate(tls.cert.read_bytes()).public_key().public_bytes(der, spki)
    if key.public_key().public_bytes(der, spki) != cert_key:
        raise PreflightError(
            f"{tls.key} is not the private key of {tls.cert}: the two files belong to different "
            f"enrollments; point [tls] key and cert in {config.source} at the pair that "
            "`silofed-silo enroll` wrote (or re-enroll)"
        )


def secagg_credentials(config: SiloConfig, silo_id: str) -> tuple[SiloIdentity, Trust]:
    """This silo's signing identity and its pinned CA + roster (the same files as its TLS)."""
    tls = config.tls
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # preflight checked the cert
        raise PreflightError(f"{tls.key}: not an ECDSA P-256 key; re-enroll the silo")
    # Leaf first, then the intermediate that issued it (if any): other silos check our
    # envelopes through it, as the coordinator's TLS layer did.
    chain = load_pem_chain(tls.cert.read_bytes())
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)
    identity = SiloIdentity(SiloId(silo_id), key, ders)
    ca = load_pem_certificate(tls.ca_cert.read_bytes())
    return identity, Trust(ca, Roster.from_json(tls.roster.read_text()))

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
from secagg.identity import CertificateRejected, Roster, SiloId, check_certificate
from secagg.messages import SignedEnvelope
from secagg.primitives import SigningKey, VerifyingKey, lp, sha256, sign, verify, verifying_key


@dataclass(frozen=True, slots=True)
class _Accepted:
    key: VerifyingKey
    valid_from: dt.datetime  # the latest start of the chain's certificates' validity
    valid_until: dt.datetime  # the earliest end


class CheckedChains:
    """The certificate chains a Trust accepted for a silo: what `verify_signer` need not parse
    and check again (the message's own signature it always verifies).

    Why the answer stays right: a chain's check depends on its bytes, the Trust's CA, roster and
    revoked serials (fixed for one Trust, which alone holds this), the silo id expected (part of
    the key), and the time only through the validity of certificates of the chain. An accepted
    chain is remembered only when the moment of its check lay inside every one of its
    certificates' validity, and is taken from here only at a moment inside all of them: there
    each time check of the full check passes again. A chain is remembered by a digest (with the
    silo id), never by its bytes: the envelope's signature does not cover its chain, so whoever
    relays it may append certificates the check does not use, each a new chain to remember; a
    digest keeps an entry about 150 bytes whatever the chain. Bounded: past `capacity` chains it
    starts afresh. Safe to share between threads: each step is one dict operation.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._accepted: dict[bytes, _Accepted] = {}

    def key_for(
        self, chain: tuple[bytes, ...], silo_id: str, now: dt.datetime
    ) -> VerifyingKey | None:
        """The signing key of `chain`, accepted for `silo_id` and valid at `now`; else None."""
        accepted = self._accepted.get(_chain_key(chain, silo_id))
        if accepted is None or now.tzinfo is None:  # a naive time: the full check refuses it
            return None
        if not accepted.valid_from <= now <= accepted.valid_until:
            return None
        return accepted.key

    def accept(
        self,
        chain: tuple[bytes, ...],
        silo_id: str,
        key: VerifyingKey,
        certificates: list[x509.Certificate],
        now: dt.datetime,
    ) -> None:
        """Remember that `chain` (parsed: `certificates`) passed its check for `silo_id` at
        `now`, when `now` lies inside every certificate's validity."""
        valid_from = max(c.not_valid_before_utc for c in certificates)
        valid_until = min(c.not_valid_after_utc for c in certificates)
        if not valid_from <= now <= valid_until:
            return
        if len(self._accepted) >= self._capacity:
            self._accepted.clear()
        self._accepted[_chain_key(chain, silo_id)] = _Accepted(key, valid_from, valid_until)


def _chain_key(chain: tuple[bytes, ...], silo_id: str) -> bytes:
    """SHA-256 over the chain's certificates and the silo id, each length-prefixed."""
    return sha256(b"".join(lp(part) for part in (*chain, silo_id.encode())))


@dataclass(frozen=True, slots=True)
class Trust:
    """The out-of-band anchors: federation CA certificate and the pinned roster.

    The same members' certificate chains arrive in several messages of every round, so a Trust
    remembers in `chains` the ones `verify_signer` accepted under its CA, roster and
    revocations (its own: never shared)."""

    ca_cert: x509.Certificate
    roster: Roster
    revoked_serials: tuple[int, ...] = field(default=())
    chains: CheckedChains = field(
        default_factory=CheckedChains, compare=False, hash=False, repr=False
    )


@dataclass(frozen=True, slots=True)
class SiloIdentity:
    """A silo's long-term identity: its id (URI SAN), P-256 signing key, DER chain (leaf first)."""

    silo_id: SiloId
    signing_key: SigningKey
    cert_chain_der: tuple[bytes, ...]

    def seal(self, kind: bytes, payload: bytes) -> SignedEnvelope:
        return SignedEnvelope(payload, sign(self.signing_key, kind, payload), self.cert_chain_der)


# The largest chain a signer may present: its leaf and the intermediate that issued it (one more
# is tolerated), each of a certificate's size. The envelope's signature does not
# cover its chain: without a bound, a member's Advertise, relayed to every silo in the KeyList,
# could carry megabytes nobody checks (docs/secagg-protocol.md §3, VerifySigner).
MAX_CHAIN_CERTIFICATES = 3
MAX_CERTIFICATE_BYTES = 16 * 1024


def verify_signer(
    env: SignedEnvelope, expected_silo_id: str, kind: bytes, trust: Trust, now: dt.datetime
) -> None:
    """Raise DecryptionFailed unless `env` is validly signed by `expected_silo_id`'s pinned key."""
    chain = env.cert_chain
    if not 0 < len(chain) <= MAX_CHAIN_CERTIFICATES:
        raise DecryptionFailed()
    if any(len(certificate) > MAX_CERTIFICATE_BYTES for certificate in chain):
        raise DecryptionFailed()
    key = trust.chains.key_for(chain, expected_silo_id, now)
    if key is None:
        key = _check_chain(chain, expected_silo_id, trust, now)
    verify(key, env.signature, kind, env.payload)


def _check_chain(
    chain: tuple[bytes, ...], expected_silo_id: str, trust: Trust, now: dt.datetime
) -> VerifyingKey:
    """The leaf's key, once the chain passed `check_certificate` (remembered in `trust.chains`).
    Raises DecryptionFailed."""
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        intermediates = [x509.load_der_x509_certificate(d) for d in chain[1:]]
        check_certificate(
            leaf,
            trust.ca_cert,
            now=now,
            roster=trust.roster,
            expected_silo_id=expected_silo_id,
            revoked_serials=trust.revoked_serials,
            intermediates=intermediates,
        )
    except (ValueError, CertificateRejected) as exc:
        raise DecryptionFailed() from exc
    key = verifying_key(leaf.public_key())
    if key is None:
        raise DecryptionFailed()
    trust.chains.accept(chain, expected_silo_id, key, [leaf, *intermediates], now)
    return key

"""The blame step: a proof, checkable by every silo, that one silo sent an out-of-range weight.

Rule: evidence verifies ONLY when it proves its signer sent an out-of-range weight. Element 0
of a masked input (the quantised weight q) is masked by the silo's self-mask alone, and the
silo signs that element in its MaskedHeader and commits to its self-mask seed b in its signed
ShareKeys. Given both signed messages and b (revealed at unmasking), anyone recomputes
q = y[0] − PRG(k_self(b))[0] as a signed ring element. An honest silo never signs an element 0
that decodes out of range under its own committed b, so no coordinator can build evidence
against it. Pure: no I/O; the time comes in as `now`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from secagg.errors import BadKey, DecryptionFailed, MalformedMessage, SecAggError
from secagg.identity import SiloId
from secagg.messages import (
    SIG_MASKED,
    SIG_SHAREKEYS,
    Blame,
    MaskedHeader,
    ShareKeys,
    SignedEnvelope,
    decode_as,
    encode_message,
)
from secagg.primitives import commit_b, k_self, prg
from secagg.trust import Trust, verify_signer

B_SECRET_BYTES = 32


class InvalidBlame(SecAggError):
    """Evidence that proves nothing against the silo it names; str() says which check failed."""


@dataclass(frozen=True, slots=True)
class BlameVerdict:
    """What verified evidence proves: in session `session_id`, `silo_id` sent weight `weight`
    (out of range)."""

    session_id: bytes
    silo_id: SiloId
    weight: int


def decoded_weight(
    weight_element: int, b_secret: bytes, session_id: bytes, index: int, ring_bits: int
) -> int:
    """q = y[0] − PRG(k_self(b))[0] mod 2^b, read as a two's-complement signed integer."""
    modulus = 1 << ring_bits
    mask0 = int(prg(k_self(b_secret, session_id, index), 1, ring_bits)[0])
    q = (weight_element - mask0) % modulus
    return q - modulus if q >= modulus >> 1 else q


def weight_in_range(q: int, weight_scale: int, uniform: bool) -> bool:
    """An honest silo's quantised weight: 0 ≤ q ≤ S_w, and exactly S_w under uniform weighting."""
    return q == weight_scale if uniform else 0 <= q <= weight_scale


def make_blame(
    silo_id: str, header_envelope: bytes, share_keys_envelope: bytes, b_secret: bytes
) -> bytes:
    """The encoded Blame message (the coordinator builds it from what it already holds)."""
    return encode_message(Blame(silo_id, header_envelope, share_keys_envelope, b_secret))


def _signed(raw: bytes, silo_id: str, kind: bytes, trust: Trust, now: dt.datetime) -> bytes:
    """The payload of the envelope `raw`, once it is verified as signed by `silo_id`."""
    try:
        env = decode_as(raw, SignedEnvelope)
    except MalformedMessage as exc:
        raise InvalidBlame(f"the {kind.decode()} envelope does not decode: {exc}") from exc
    try:
        verify_signer(env, silo_id, kind, trust, now)
    except DecryptionFailed as exc:
        raise InvalidBlame(f"the {kind.decode()} envelope is not signed by {silo_id}") from exc
    return env.payload


def verify_blame(evidence: bytes, trust: Trust, now: dt.datetime) -> BlameVerdict:
    """Check encoded Blame evidence; raise InvalidBlame unless it proves that its silo signed an
    element 0 whose weight, under its committed self-mask seed, is out of range."""
    try:
        blame = decode_as(evidence, Blame)
    except MalformedMessage as exc:
        raise InvalidBlame(f"evidence does not decode: {exc}") from exc
    sid = blame.silo_id
    header_payload = _signed(blame.header_envelope, sid, SIG_MASKED, trust, now)
    share_payload = _signed(blame.share_keys_envelope, sid, SIG_SHAREKEYS, trust, now)
    try:
        header = decode_as(header_payload, MaskedHeader)
        share_keys = decode_as(share_payload, ShareKeys)
    except MalformedMessage as exc:
        raise InvalidBlame(f"a signed payload does not decode: {exc}") from exc
    if (header.session_id, header.index) != (share_keys.session_id, share_keys.index):
        raise InvalidBlame("the header and the ShareKeys are from different sessions or indices")
    b = blame.b_secret
    if len(b) != B_SECRET_BYTES or commit_b(header.session_id, header.index, b) != (
        share_keys.commit_b
    ):
        raise InvalidBlame("b does not match the silo's commitment")
    if header.ring_bits not in (32, 64) or not 0 <= header.weight_element < 1 << header.ring_bits:
        raise InvalidBlame("ring width or weight element out of range")
    try:
        q = decoded_weight(
            header.weight_element, b, header.session_id, header.index, header.ring_bits
        )
    except (ValueError, BadKey) as exc:  # defensive: primitives refuse a malformed argument
        raise InvalidBlame(f"weight does not decode: {exc}") from exc
    if weight_in_range(q, header.weight_scale, header.uniform):
        raise InvalidBlame(f"the signed weight {q} is in range: nothing to blame")
    return BlameVerdict(header.session_id, SiloId(sid), q)

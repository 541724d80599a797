"""Protocol messages check their fields when built, and decoding goes through the same checks.

One test per rule of secagg.messages: fixed 32-byte fields (an AbortNotice's session id may also
be empty), integers within their wire width, ring_bits 32 or 64 with the weight element below
2^ring_bits, booleans, bytes/str/tuple types, and the codec's blob and list limits. What a list
holds or its order stays the receiver's protocol check (with its own abort reason): the last
tests pin that those values are still constructible.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from secagg.codec import MAX_FIELD_BYTES, MAX_LIST_ITEMS
from secagg.errors import AbortReason, MalformedMessage
from secagg.messages import (
    AbortNotice,
    Advertise,
    Blame,
    Consistency,
    ConsistencySet,
    KeyList,
    MaskedHeader,
    Message,
    RoundResult,
    ShareKeys,
    SharesForYou,
    SignedEnvelope,
    SurvivorList,
    UnmaskShares,
    decode_message,
    encode_message,
)

D = b"\x11" * 32  # any 32-byte digest / session id

# One valid instance of every message class, shaped like an honest producer's.
VALID: dict[type, Message] = {
    SignedEnvelope: SignedEnvelope(b"payload", b"sig", (b"leaf", b"ca")),
    Advertise: Advertise(D, 7, "spiffe://t/silo/a", b"c" * 32, b"s" * 32),
    KeyList: KeyList(D, 7, (b"e1", b"e2")),
    ShareKeys: ShareKeys(D, 1, D, ((2, b"ct2"), (3, b"ct3"))),
    SharesForYou: SharesForYou(D, (1, 2, 3), ((2, b"ct"), (3, b"ct"))),
    MaskedHeader: MaskedHeader(D, 1, 100, 32, D, 2**32 - 1, 1 << 16, True),
    SurvivorList: SurvivorList(D, (1, 2, 3), (1, 2)),
    Consistency: Consistency(D, 2, D),
    ConsistencySet: ConsistencySet(D, (b"sig1", b"sig2")),
    UnmaskShares: UnmaskShares(D, 1, ((1, b"b1"), (2, b"b2")), ((3, b"s3"),)),
    RoundResult: RoundResult(D, 7, (1, 2), 3 << 16, D, b""),
    AbortNotice: AbortNotice(D, AbortReason.TIMEOUT),
    Blame: Blame("spiffe://t/silo/a", b"header", b"sharekeys", b"b" * 32),
}

FIXED_FIELDS = [
    (Advertise, "config_digest"),
    (KeyList, "config_digest"),
    (ShareKeys, "session_id"),
    (ShareKeys, "commit_b"),
    (SharesForYou, "session_id"),
    (MaskedHeader, "session_id"),
    (MaskedHeader, "vector_sha256"),
    (SurvivorList, "session_id"),
    (Consistency, "session_id"),
    (Consistency, "digest"),
    (ConsistencySet, "session_id"),
    (UnmaskShares, "session_id"),
    (RoundResult, "session_id"),
    (RoundResult, "new_model_sha256"),
]

UINT_FIELDS = [
    (Advertise, "round_id", 64),
    (KeyList, "round_id", 64),
    (ShareKeys, "index", 32),
    (MaskedHeader, "index", 32),
    (MaskedHeader, "length", 64),
    (MaskedHeader, "weight_scale", 32),
    (Consistency, "index", 32),
    (UnmaskShares, "index", 32),
    (RoundResult, "round_id", 64),
    (RoundResult, "weight_sum", 64),
]

BLOB_FIELDS = [
    (SignedEnvelope, "payload"),
    (SignedEnvelope, "signature"),
    (Advertise, "c_pk"),
    (Advertise, "s_pk"),
    (RoundResult, "dp_report"),
    (Blame, "header_envelope"),
    (Blame, "share_keys_envelope"),
    (Blame, "b_secret"),
]

LIST_FIELDS = [
    (SignedEnvelope, "cert_chain", b"x"),
    (KeyList, "entries", b"x"),
    (ConsistencySet, "sigs", b"x"),
    (SharesForYou, "u2", 1),
    (SurvivorList, "u2", 1),
    (SurvivorList, "u3", 1),
    (RoundResult, "u3", 1),
    (ShareKeys, "cts", (1, b"x")),
    (SharesForYou, "cts", (1, b"x")),
    (UnmaskShares, "b_shares", (1, b"x")),
    (UnmaskShares, "s_shares", (1, b"x")),
]

TEXT_FIELDS = [(Advertise, "silo_id"), (Blame, "silo_id")]


def _with(cls: type, **change: Any) -> Message:
    return dataclasses.replace(VALID[cls], **change)  # type: ignore[type-var]


def _refused(cls: type, field: str, **change: Any) -> None:
    with pytest.raises(MalformedMessage, match=rf"{cls.__name__}\.{field}"):
        _with(cls, **change)


def test_every_valid_message_round_trips() -> None:
    # the control for every test below: these values are accepted and survive the wire
    assert set(VALID) == set(Message.__args__)  # type: ignore[attr-defined]
    for m in VALID.values():
        assert decode_message(encode_message(m)) == m


@pytest.mark.parametrize(("cls", "field"), FIXED_FIELDS)
def test_fixed_fields_are_32_bytes(cls: type, field: str) -> None:
    for bad in (b"", D[:31], D + b"\x00"):
        _refused(cls, field, **{field: bad})
    _refused(cls, field, **{field: bytearray(D)})  # bytes only: messages are values
    _refused(cls, field, **{field: D.hex()})


def test_abort_notice_session_id_is_empty_or_32_bytes() -> None:
    assert AbortNotice(b"", AbortReason.INTERNAL).session_id == b""  # before a session exists
    for bad in (b"\x01", D[:16], D + D):
        _refused(AbortNotice, "session_id", session_id=bad)


def test_abort_notice_reason_is_an_abort_reason() -> None:
    _refused(AbortNotice, "reason", reason=int(AbortReason.TIMEOUT))
    _refused(AbortNotice, "reason", reason="TIMEOUT")


@pytest.mark.parametrize(("cls", "field", "bits"), UINT_FIELDS)
def test_integers_fit_their_wire_width(cls: type, field: str, bits: int) -> None:
    top = (1 << bits) - 1
    assert getattr(_with(cls, **{field: top}), field) == top  # the largest value encodes
    assert decode_message(encode_message(_with(cls, **{field: top}))) == _with(cls, **{field: top})
    for bad in (-1, 1 << bits):
        _refused(cls, field, **{field: bad})
    _refused(cls, field, **{field: True})  # a bool is not a wire integer
    _refused(cls, field, **{field: 3.0})


def test_ring_bits_is_32_or_64() -> None:
    assert _with(MaskedHeader, ring_bits=64).ring_bits == 64
    for bad in (0, 16, 63, 128, 256):
        _refused(MaskedHeader, "ring_bits", ring_bits=bad)


def test_weight_element_fits_the_ring() -> None:
    _refused(MaskedHeader, "weight_element", ring_bits=32, weight_element=1 << 32)
    _refused(MaskedHeader, "weight_element", weight_element=-1)
    assert _with(MaskedHeader, ring_bits=64, weight_element=2**64 - 1).weight_element == 2**64 - 1
    _refused(MaskedHeader, "weight_element", ring_bits=64, weight_element=1 << 64)


def test_uniform_is_a_bool() -> None:
    assert _with(MaskedHeader, uniform=False).uniform is False
    for bad in (1, 0, "yes", None):
        _refused(MaskedHeader, "uniform", uniform=bad)


@pytest.mark.parametrize(("cls", "field"), BLOB_FIELDS)
def test_blobs_are_bytes_within_the_codec_limit(cls: type, field: str) -> None:
    assert getattr(_with(cls, **{field: b""}), field) == b""
    _refused(cls, field, **{field: "text"})
    _refused(cls, field, **{field: bytearray(b"x")})


def test_a_blob_over_the_codec_limit_is_refused() -> None:
    # Reader refuses such a field on decode; construction refuses it before it is ever encoded
    _refused(SignedEnvelope, "payload", payload=bytes(MAX_FIELD_BYTES + 1))


@pytest.mark.parametrize(("cls", "field", "item"), LIST_FIELDS)
def test_lists_are_tuples_within_the_codec_limit(cls: type, field: str, item: object) -> None:
    assert getattr(_with(cls, **{field: ()}), field) == ()
    _refused(cls, field, **{field: [item]})  # a list is not a (hashable, frozen) tuple
    _refused(cls, field, **{field: (item,) * (MAX_LIST_ITEMS + 1)})


@pytest.mark.parametrize(("cls", "field"), [(c, f) for c, f, _ in LIST_FIELDS])
def test_list_items_have_the_wire_type(cls: type, field: str) -> None:
    item = next(i for c, f, i in LIST_FIELDS if (c, f) == (cls, field))
    if isinstance(item, bytes):
        _refused(cls, field, **{field: ("text",)})
    elif isinstance(item, int):
        _refused(cls, field, **{field: (1 << 32,)})
        _refused(cls, field, **{field: (-1,)})
    else:
        _refused(cls, field, **{field: ((1 << 32, b"x"),)})  # index is a u32
        _refused(cls, field, **{field: ((1, "x"),)})
        _refused(cls, field, **{field: ((1, b"x", b"y"),)})
        _refused(cls, field, **{field: (b"x",)})


@pytest.mark.parametrize(("cls", "field"), TEXT_FIELDS)
def test_text_fields_are_utf8_strings(cls: type, field: str) -> None:
    _refused(cls, field, **{field: b"spiffe://t/silo/a"})
    _refused(cls, field, **{field: "\ud800"})  # a lone surrogate has no UTF-8 form


# --- decoding runs the same checks -----------------------------------------------------------


def _wire_abort(session_id: bytes, reason: int) -> bytes:
    return b"SA1" + bytes([12]) + len(session_id).to_bytes(4, "big") + session_id + bytes([reason])


def test_decoding_applies_the_construction_checks() -> None:
    assert decode_message(_wire_abort(D, 15)) == AbortNotice(D, AbortReason.TIMEOUT)  # control
    with pytest.raises(MalformedMessage, match=r"AbortNotice\.session_id"):
        decode_message(_wire_abort(D[:5], 15))
    with pytest.raises(MalformedMessage, match="unknown abort reason 250"):
        decode_message(_wire_abort(D, 250))
    raw = bytearray(encode_message(VALID[MaskedHeader]))
    ring_at = 3 + 1 + 32 + 4 + 8  # MAGIC, kind, session_id, u32 index, u64 length
    assert raw[ring_at] == 32
    raw[ring_at] = 16
    with pytest.raises(MalformedMessage, match=r"MaskedHeader\.ring_bits"):
        decode_message(bytes(raw))
    over = dataclasses.replace(VALID[MaskedHeader], ring_bits=64, weight_element=1 << 40)
    wire = bytearray(encode_message(over))
    wire[ring_at] = 32  # a ring of 32 bits with an element of 2^40
    with pytest.raises(MalformedMessage, match=r"MaskedHeader\.weight_element"):
        decode_message(bytes(wire))


# --- what stays the receiver's check -----------------------------------------------------------


def test_order_membership_and_key_length_are_left_to_the_receiver() -> None:
    # Each of these is a protocol check with its own abort reason on the receiving side
    # (SET_INCONSISTENT for an unsorted U2, and so on): refusing them here would turn it into
    # an undecodable message and change the reason the silo reports.
    assert SurvivorList(D, (3, 1, 2), (2, 2)).u2 == (3, 1, 2)
    assert SharesForYou(D, (2, 1), ((3, b"ct"), (2, b"ct"))).u2 == (2, 1)
    assert ShareKeys(D, 1, D, ((3, b"a"), (3, b"b"))).cts[0][0] == 3
    assert UnmaskShares(D, 1, ((2, b"x"), (1, b"y")), ((2, b"z"),)).index == 1
    assert Advertise(D, 1, "s", b"short", b"").c_pk == b"short"
    assert MaskedHeader(D, 0, 0, 32, D, 0, 0, False).index == 0
    assert Blame("", b"", b"", b"").b_secret == b""

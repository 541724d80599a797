"""The protocol messages M1-M10 and AbortNotice (docs/secagg-protocol.md §5) as frozen
dataclasses, each with a canonical binary form.

Rule: a message on the wire is MAGIC ‖ u8(kind) ‖ fields (codec.py); `decode_message` returns
exactly one dataclass or raises `MalformedMessage`. Signed payloads (Advertise, ShareKeys,
MaskedHeader, Consistency) travel inside a SignedEnvelope whose `payload` bytes are verified
before they are parsed. RoundOffer (M0) is carried by the driver: it passes the config bytes and
model hash. `Blame` is the coordinator's proof that a silo sent an out-of-range weight element
(secagg.blame checks it).

Every message checks its fields when it is built (`__post_init__`), so decoding and every
producer get the same checks, and a message that exists encodes: fixed fields are 32 bytes (an
AbortNotice's session id may also be empty: none exists yet), integers fit their wire width
(u8/u32/u64), blobs and lists fit the codec's limits, `ring_bits` is 32 or 64 and the weight
element fits it, flags are booleans. A violation raises `MalformedMessage` naming the class and
field. What a list holds and in which order (U2 ascending, ciphertexts addressing exactly N(u),
32-byte public keys...) is NOT checked here: those are protocol checks the receiver makes
against its own session, each with its own abort reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from secagg.codec import MAX_FIELD_BYTES, MAX_LIST_ITEMS, Reader, Writer
from secagg.errors import AbortReason, MalformedMessage

MAGIC = b"SA1"

# The signature domains (the `kind` of primitives.sign) of the signed payloads.
SIG_ADVERTISE = b"advertise"
SIG_SHAREKEYS = b"sharekeys"
SIG_MASKED = b"masked"
SIG_CONSISTENCY = b"consistency"


class Kind(enum.IntEnum):
    ENVELOPE = 1
    ADVERTISE = 2
    KEY_LIST = 3
    SHARE_KEYS = 4
    SHARES_FOR_YOU = 5
    MASKED_HEADER = 6
    SURVIVOR_LIST = 7
    CONSISTENCY = 8
    CONSISTENCY_SET = 9
    UNMASK_SHARES = 10
    ROUND_RESULT = 11
    ABORT = 12
    BLAME = 13


DIGEST_BYTES = 32  # session ids, digests, commitments: every fixed field of the wire format
RING_BITS = (32, 64)


def _fail(owner: object, name: str, what: str) -> MalformedMessage:
    return MalformedMessage(f"{type(owner).__name__}.{name} {what}")


def _uint(owner: object, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(owner, name, f"must be an int, got {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise _fail(owner, name, f"must fit u{bits} (0 ≤ v < 2^{bits}), got {value}")


def _blob(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise _fail(owner, name, f"must be bytes, got {type(value).__name__}")
    if len(value) > MAX_FIELD_BYTES:
        raise _fail(owner, name, f"is {len(value)} bytes, over the {MAX_FIELD_BYTES} limit")


def _fixed(
    owner: object, name: str, value: object, sizes: tuple[int, ...] = (DIGEST_BYTES,)
) -> None:
    _blob(owner, name, value)
    assert isinstance(value, bytes)
    if len(value) not in sizes:
        want = " or ".join(map(str, sizes))
        raise _fail(owner, name, f"must be {want} bytes, got {len(value)}")


def _text(owner: object, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(owner, name, f"must be a str, got {type(value).__name__}")
    try:
        _blob(owner, name, value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _fail(owner, name, "is not encodable as UTF-8") from exc


def _list(owner: object, name: str, items: object) -> tuple[object, ...]:
    if not isinstance(items, tuple):
        raise _fail(owner, name, f"must be a tuple, got {type(items).__name__}")
    if len(items) > MAX_LIST_ITEMS:
        raise _fail(owner, name, f"has {len(items)} items, over the {MAX_LIST_ITEMS} limit")
    return items


def _blobs(owner: object, name: str, items: object) -> None:
    for item in _list(owner, name, items):
        _blob(owner, f"{name}[]", item)


def _u32s(owner: object, name: str, items: object) -> None:
    for item in _list(owner, name, items):
        _uint(owner, f"{name}[]", item, 32)


def _pairs(owner: object, name: str, items: object) -> None:
    """A list(u32 ‖ blob): (index, bytes) pairs."""
    for item in _list(owner, name, items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise _fail(owner, f"{name}[]", "must be an (index, bytes) pair")
        _uint(owner, f"{name}[].index", item[0], 32)
        _blob(owner, f"{name}[].data", item[1])


def _indexed(w: Writer, items: tuple[tuple[int, bytes], ...]) -> None:
    w.u32(len(items))
    for idx, data in items:
        w.u32(idx).blob(data)


def _read_indexed(r: Reader) -> tuple[tuple[int, bytes], ...]:
    return tuple((r.u32(), r.blob()) for _ in range(r.count()))


def _ints(w: Writer, items: tuple[int, ...]) -> None:
    w.u32(len(items))
    for i in items:
        w.u32(i)


def _read_ints(r: Reader) -> tuple[int, ...]:
    return tuple(r.u32() for _ in range(r.count()))


def _read_bool(r: Reader) -> bool:
    v = r.u8()
    if v > 1:
        raise MalformedMessage(f"boolean field must be 0 or 1, got {v}")
    return v == 1


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    payload: bytes
    signature: bytes
    cert_chain: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _blob(self, "payload", self.payload)
        _blob(self, "signature", self.signature)
        _blobs(self, "cert_chain", self.cert_chain)


@dataclass(frozen=True, slots=True)
class Advertise:
    config_digest: bytes
    round_id: int
    silo_id: str
    c_pk: bytes
    s_pk: bytes

    def __post_init__(self) -> None:
        # c_pk/s_pk are blobs on the wire: their length is the receivers' protocol check
        _fixed(self, "config_digest", self.config_digest)
        _uint(self, "round_id", self.round_id, 64)
        _text(self, "silo_id", self.silo_id)
        _blob(self, "c_pk", self.c_pk)
        _blob(self, "s_pk", self.s_pk)


@dataclass(frozen=True, slots=True)
class KeyList:
    config_digest: bytes
    round_id: int
    entries: tuple[bytes, ...]  # encoded SignedEnvelope(Advertise), sorted by silo id

    def __post_init__(self) -> None:
        _fixed(self, "config_digest", self.config_digest)
        _uint(self, "round_id", self.round_id, 64)
        _blobs(self, "entries", self.entries)


@dataclass(frozen=True, slots=True)
class ShareKeys:
    session_id: bytes
    index: int
    commit_b: bytes
    cts: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _uint(self, "index", self.index, 32)
        _fixed(self, "commit_b", self.commit_b)
        _pairs(self, "cts", self.cts)


@dataclass(frozen=True, slots=True)
class SharesForYou:
    session_id: bytes
    u2: tuple[int, ...]
    cts: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _u32s(self, "u2", self.u2)
        _pairs(self, "cts", self.cts)


@dataclass(frozen=True, slots=True)
class MaskedHeader:
    """M5's header, signed by the silo (SIG_MASKED). `weight_element` is element 0 of the vector
    as sent (masked by the self-mask only), so the signer is bound to the weight it sent."""

    session_id: bytes
    index: int
    length: int
    ring_bits: int
    vector_sha256: bytes
    weight_element: int
    weight_scale: int
    uniform: bool

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _uint(self, "index", self.index, 32)
        _uint(self, "length", self.length, 64)
        _uint(self, "ring_bits", self.ring_bits, 8)
        if self.ring_bits not in RING_BITS:
            raise _fail(self, "ring_bits", f"must be 32 or 64, got {self.ring_bits}")
        _fixed(self, "vector_sha256", self.vector_sha256)
        # element 0 of a vector in Z_2^b: an honest silo's is below 2^b by construction
        _uint(self, "weight_element", self.weight_element, self.ring_bits)
        _uint(self, "weight_scale", self.weight_scale, 32)
        if not isinstance(self.uniform, bool):
            raise _fail(self, "uniform", f"must be a bool, got {type(self.uniform).__name__}")


@dataclass(frozen=True, slots=True)
class SurvivorList:
    session_id: bytes
    u2: tuple[int, ...]
    u3: tuple[int, ...]

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _u32s(self, "u2", self.u2)
        _u32s(self, "u3", self.u3)


@dataclass(frozen=True, slots=True)
class Consistency:
    session_id: bytes
    index: int
    digest: bytes

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _uint(self, "index", self.index, 32)
        _fixed(self, "digest", self.digest)


@dataclass(frozen=True, slots=True)
class ConsistencySet:
    session_id: bytes
    sigs: tuple[bytes, ...]  # encoded SignedEnvelope(Consistency)

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _blobs(self, "sigs", self.sigs)


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    session_id: bytes
    index: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _uint(self, "index", self.index, 32)
        _pairs(self, "b_shares", self.b_shares)
        _pairs(self, "s_shares", self.s_shares)


@dataclass(frozen=True, slots=True)
class RoundResult:
    session_id: bytes
    round_id: int
    u3: tuple[int, ...]
    weight_sum: int
    new_model_sha256: bytes
    dp_report: bytes

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id)
        _uint(self, "round_id", self.round_id, 64)
        _u32s(self, "u3", self.u3)
        _uint(self, "weight_sum", self.weight_sum, 64)
        _fixed(self, "new_model_sha256", self.new_model_sha256)
        _blob(self, "dp_report", self.dp_report)


@dataclass(frozen=True, slots=True)
class AbortNotice:
    session_id: bytes
    reason: AbortReason

    def __post_init__(self) -> None:
        _fixed(self, "session_id", self.session_id, (0, DIGEST_BYTES))  # empty: none yet
        if not isinstance(self.reason, AbortReason):
            raise _fail(self, "reason", f"must be an AbortReason, got {self.reason!r}")


@dataclass(frozen=True, slots=True)
class Blame:
    """Evidence that `silo_id` sent an out-of-range weight: its signed MaskedHeader and signed
    ShareKeys envelopes (encoded) of one session, and its self-mask seed b revealed at unmasking."""

    silo_id: str
    header_envelope: bytes
    share_keys_envelope: bytes
    b_secret: bytes

    def __post_init__(self) -> None:
        # b_secret is a blob: its length is a check of secagg.blame, which says why it fails
        _text(self, "silo_id", self.silo_id)
        _blob(self, "header_envelope", self.header_envelope)
        _blob(self, "share_keys_envelope", self.share_keys_envelope)
        _blob(self, "b_secret", self.b_secret)


Message = (
    SignedEnvelope
    | Advertise
    | KeyList
    | ShareKeys
    | SharesForYou
    | MaskedHeader
    | SurvivorList
    | Consistency
    | ConsistencySet
    | UnmaskShares
    | RoundResult
    | AbortNotice
    | Blame
)


def encode_message(m: Message) -> bytes:
    w = Writer()
    w.fixed(MAGIC, 3)
    match m:
        case SignedEnvelope():
            w.u8(Kind.ENVELOPE).blob(m.payload).blob(m.signature).u32(len(m.cert_chain))
            for c in m.cert_chain:
                w.blob(c)
        case Advertise():
            w.u8(Kind.ADVERTISE).fixed(m.config_digest, 32).u64(m.round_id).text(m.silo_id)
            w.blob(m.c_pk).blob(m.s_pk)
        case KeyList():
            w.u8(Kind.KEY_LIST).fixed(m.config_digest, 32).u64(m.round_id).u32(len(m.entries))
            for e in m.entries:
                w.blob(e)
        case ShareKeys():
            w.u8(Kind.SHARE_KEYS).fixed(m.session_id, 32).u32(m.index).fixed(m.commit_b, 32)
            _indexed(w, m.cts)
        case SharesForYou():
            w.u8(Kind.SHARES_FOR_YOU).fixed(m.session_id, 32)
            _ints(w, m.u2)
            _indexed(w, m.cts)
        case MaskedHeader():
            w.u8(Kind.MASKED_HEADER).fixed(m.session_id, 32).u32(m.index).u64(m.length)
            w.u8(m.ring_bits).fixed(m.vector_sha256, 32)
            w.u64(m.weight_element).u32(m.weight_scale).u8(1 if m.uniform else 0)
        case SurvivorList():
            w.u8(Kind.SURVIVOR_LIST).fixed(m.session_id, 32)
            _ints(w, m.u2)
            _ints(w, m.u3)
        case Consistency():
            w.u8(Kind.CONSISTENCY).fixed(m.session_id, 32).u32(m.index).fixed(m.digest, 32)
        case ConsistencySet():
            w.u8(Kind.CONSISTENCY_SET).fixed(m.session_id, 32).u32(len(m.sigs))
            for s in m.sigs:
                w.blob(s)
        case UnmaskShares():
            w.u8(Kind.UNMASK_SHARES).fixed(m.session_id, 32).u32(m.index)
            _indexed(w, m.b_shares)
            _indexed(w, m.s_shares)
        case RoundResult():
            w.u8(Kind.ROUND_RESULT).fixed(m.session_id, 32).u64(m.round_id)
            _ints(w, m.u3)
            w.u64(m.weight_sum).fixed(m.new_model_sha256, 32).blob(m.dp_report)
        case AbortNotice():
            w.u8(Kind.ABORT).blob(m.session_id).u8(m.reason)
        case Blame():
            w.u8(Kind.BLAME).text(m.silo_id).blob(m.header_envelope)
            w.blob(m.share_keys_envelope).blob(m.b_secret)
    return w.bytes()


def decode_message(data: bytes) -> Message:
    """Parse one message; raises MalformedMessage for anything not canonical."""
    r = Reader(data)
    if r.fixed(3) != MAGIC:
        raise MalformedMessage("not a secagg/v1 message")
    kind = r.u8()
    m: Message
    try:
        k = Kind(kind)
    except ValueError as exc:
        raise MalformedMessage(f"unknown message kind {kind}") from exc
    if k is Kind.ENVELOPE:
        m = SignedEnvelope(r.blob(), r.blob(), tuple(r.blob() for _ in range(r.count())))
    elif k is Kind.ADVERTISE:
        m = Advertise(r.fixed(32), r.u64(), r.text(), r.blob(), r.blob())
    elif k is Kind.KEY_LIST:
        m = KeyList(r.fixed(32), r.u64(), tuple(r.blob() for _ in range(r.count())))
    elif k is Kind.SHARE_KEYS:
        m = ShareKeys(r.fixed(32), r.u32(), r.fixed(32), _read_indexed(r))
    elif k is Kind.SHARES_FOR_YOU:
        m = SharesForYou(r.fixed(32), _read_ints(r), _read_indexed(r))
    elif k is Kind.MASKED_HEADER:
        m = MaskedHeader(
            r.fixed(32), r.u32(), r.u64(), r.u8(), r.fixed(32), r.u64(), r.u32(), _read_bool(r)
        )
    elif k is Kind.SURVIVOR_LIST:
        m = SurvivorList(r.fixed(32), _read_ints(r), _read_ints(r))
    elif k is Kind.CONSISTENCY:
        m = Consistency(r.fixed(32), r.u32(), r.fixed(32))
    elif k is Kind.CONSISTENCY_SET:
        m = ConsistencySet(r.fixed(32), tuple(r.blob() for _ in range(r.count())))
    elif k is Kind.UNMASK_SHARES:
        m = UnmaskShares(r.fixed(32), r.u32(), _read_indexed(r), _read_indexed(r))
    elif k is Kind.ROUND_RESULT:
        m = RoundResult(r.fixed(32), r.u64(), _read_ints(r), r.u64(), r.fixed(32), r.blob())
    elif k is Kind.BLAME:
        m = Blame(r.text(), r.blob(), r.blob(), r.blob())
    else:
        sid, code = r.blob(), r.u8()
        try:
            reason = AbortReason(code)
        except ValueError as exc:
            raise MalformedMessage(f"unknown abort reason {code}") from exc
        m = AbortNotice(sid, reason)
    r.end()
    return m


_M = TypeVar("_M", bound=Message)


def decode_as(data: bytes, cls: type[_M]) -> _M:
    """decode_message, insisting on one class."""
    m = decode_message(data)
    if not isinstance(m, cls):
        raise MalformedMessage(f"expected {cls.__name__}, got {type(m).__name__}")
    return m


def masked_header_of(data: bytes) -> MaskedHeader | None:
    """The MaskedHeader inside an encoded SignedEnvelope, WITHOUT verifying the signature (the
    coordinator round does that); None when `data` is not such an envelope. For recognising
    the frame that announces a masked vector, nothing more."""
    try:
        env = decode_as(data, SignedEnvelope)
        return decode_as(env.payload, MaskedHeader)
    except MalformedMessage:
        return None

"""Known-answer vectors for the primitives and digests of docs/secagg-protocol.md §3, each frozen
and cross-checked against an independent, straightforward computation so a wrong frozen value
cannot hide a wrong implementation."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg import graph, primitives, shamir, transcript

KEY = bytes(range(32))


def test_kdf_vector_and_rfc5869_hkdf() -> None:
    got = primitives.kdf(KEY, b"secagg/v1/test\x00", b"\x01" * 32)
    ref = HKDF(hashes.SHA256(), 32, b"\x01" * 32, b"secagg/v1/test\x00").derive(KEY)
    assert got == ref
    assert got.hex() == "e55f775df0c413c2d504bdc7380b57cdbf3acade277337669a1fd52e7b5cd610"


PRG_32 = (
    [3053490418, 3500099882, 1788539817, 2155294429, 2926992880, 3852450122, 832304806, 1026998856],
    [991027406, 2229649578, 2947320449, 1969180362, 1696372438, 4083165742, 2290865269, 3372998220],
)
PRG_64 = (
    [
        15032814528976949490,
        9256919087594533801,
        16546147286388202992,
        4410926500381718182,
        13655807654754630670,
        11065674241917167624,
        3413870527743673298,
        6223411483879120512,
    ],
    [
        13738265312178685914,
        2921552256697171443,
        18222317926325654665,
        9080471761117018116,
        5178932127401432040,
        13985881018269820097,
        6650850067816405043,
        5462450326357211044,
    ],
)


def test_prg_vectors_both_widths_match_one_shot_ctr() -> None:
    n = 10**6
    for bits, (first, last) in ((32, PRG_32), (64, PRG_64)):
        got = primitives.prg(KEY, n, bits)
        stream = (
            Cipher(algorithms.AES(KEY), modes.CTR(bytes(16)))
            .encryptor()
            .update(bytes(n * bits // 8))
        )
        ref = np.frombuffer(stream, dtype=f"<u{bits // 8}")
        assert np.array_equal(got, ref)
        assert [int(x) for x in got[:8]] == first
        assert [int(x) for x in got[-8:]] == last


def test_prg_subtract_cancels_add_across_chunk_boundaries() -> None:
    acc = np.arange(300_001, dtype="<u4")
    primitives.add_mask(acc, KEY, 1, chunk_bytes=4096)
    assert not np.array_equal(acc, np.arange(300_001, dtype="<u4"))
    primitives.add_mask(acc, KEY, -1, chunk_bytes=1 << 20)
    assert np.array_equal(acc, np.arange(300_001, dtype="<u4"))


def test_shamir_vector_matches_polynomial() -> None:
    shares = shamir.split_with_coefficients(KEY, [5, 7], [1, 2, 3])
    s = int.from_bytes(KEY, "big")
    for x, share in shares.items():
        assert int.from_bytes(share, "big") == (s + 5 * x + 7 * x * x) % shamir.P
    assert shares[1].hex() == ("00000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e2b")
    assert shamir.reconstruct(shares) == KEY


def test_session_id_vector() -> None:
    rows = [
        ("spiffe://test/silo/b", b"\x03" * 32, b"\x04" * 32),
        ("spiffe://test/silo/a", b"\x05" * 32, b"\x06" * 32),
    ]
    got = transcript.session_id(b"\x02" * 32, rows)
    body = b""
    for sid, c, s in sorted(rows):
        body += struct.pack(">I", len(sid)) + sid.encode() + c + s
    ref = hashlib.sha256(
        b"secagg/v1/session\x00" + b"\x02" * 32 + struct.pack(">I", 2) + body
    ).digest()
    assert got == ref
    assert got.hex() == "ba14fad25234ed02ce723fdfbdd0772459c174f427f5a742e40c106596abaa9b"


def test_consistency_digest_vector() -> None:
    got = transcript.consistency_digest(
        b"\x07" * 32, b"\x08" * 32, b"\x09" * 32, [1, 2, 3, 4], [1, 3, 4]
    )
    u = lambda *xs: b"".join(struct.pack(">I", x) for x in xs)  # noqa: E731
    ref = hashlib.sha256(
        b"secagg/v1/consistency\x00"
        + b"\x07" * 32
        + b"\x08" * 32
        + b"\x09" * 32
        + u(4, 1, 2, 3, 4)
        + u(3, 1, 3, 4)
    ).digest()
    assert got == ref
    assert got.hex() == "f6ab0f5bd42af3b57b47b63f923a294cd13b59472c7f1510bf191c51da37c130"


def test_harary_permutation_vector_and_reference_fisher_yates() -> None:
    sid = bytes(32)
    got = graph.harary_permutation(sid, 10)
    assert got == [3, 6, 5, 9, 8, 1, 10, 2, 4, 7]
    key = HKDF(hashes.SHA256(), 32, sid, b"secagg/v1/graph\x00").derive(bytes(32))
    words = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 64))
    it = iter(struct.unpack("<64Q", words))
    perm = list(range(1, 11))
    for m in range(9, 0, -1):
        w = next(it)
        while w >= 2**64 - (2**64 % (m + 1)):
            w = next(it)
        j = w % (m + 1)
        perm[m], perm[j] = perm[j], perm[m]
    assert perm == got
    nb = graph.neighbours(10, sid, 4)
    assert all(len(v) == 4 and i not in v for i, v in nb.items())
    assert all(i in nb[j] for i, v in nb.items() for j in v)


def test_round_config_v2_vector_and_reference_encoding() -> None:
    # Added with config version 2 (train_params appended after the deadlines); no earlier
    # vector pinned the config bytes.
    from secagg.config import RoundConfig, TensorSpec

    cfg = RoundConfig(
        federation_id="fed",
        roster_version=3,
        roster_digest=b"\x01" * 32,
        round_id=9,
        invited=("a", "b", "c"),
        model_version=2,
        model_sha256=b"\x02" * 32,
        layout=(TensorSpec("w", (2, 3)),),
        scale=256.0,
        clip_l2=1.5,
        threshold=3,
        n_colluders=0,
        train_params=b'{"epochs":2}',
    )
    be = struct.pack
    text = lambda s: be(">I", len(s)) + s.encode()  # noqa: E731
    layout = be(">I", 1) + text("w") + be(">I", 2) + be(">QQ", 2, 3) + text("float32")
    ref = (
        be(">B", 2)
        + text("secagg/v1")
        + text("fed")
        + be(">Q", 3)
        + b"\x01" * 32
        + be(">Q", 9)
        + be(">I", 3)
        + text("a")
        + text("b")
        + text("c")
        + be(">Q", 2)
        + b"\x02" * 32
        + layout
        + hashlib.sha256(layout).digest()
        + be(">BdIdBQII", 32, 256.0, 1 << 16, 1.5, 0, 1, 3, 0)
        + be(">BII", 0, 0, 0)  # complete graph
        + be(">B", 0)  # no DP
        + be(">I5I", 5, 60, 60, 600, 60, 60)
        + be(">I", 12)
        + b'{"epochs":2}'
    )
    assert cfg.encode() == ref
    assert cfg.digest() == hashlib.sha256(b"secagg/v1/config\x00" + ref).digest()
    assert cfg.digest().hex() == "185decc0da2352ac557c170fe30dad285c14afbe7a2974bbe28936e5dc75a20c"


def test_signed_masked_header_and_blame_encodings_match_the_reference() -> None:
    # Added with the blame step: MaskedHeader gained weight_element, weight_scale, uniform.
    from secagg.messages import Blame, MaskedHeader, encode_message

    h = MaskedHeader(b"\x01" * 32, 3, 11, 32, b"\x02" * 32, 0xFFFF_FFFF, 1 << 16, True)
    be = struct.pack
    ref = b"SA1" + be(">B", 6) + b"\x01" * 32 + be(">IQB", 3, 11, 32) + b"\x02" * 32
    ref += be(">QIB", 0xFFFF_FFFF, 1 << 16, 1)
    assert encode_message(h) == ref
    blame = Blame("s", b"hh", b"kkk", b"b" * 32)

    def blob(x: bytes) -> bytes:
        return be(">I", len(x)) + x

    ref_blame = b"SA1" + be(">B", 13) + blob(b"s") + blob(b"hh") + blob(b"kkk") + blob(b"b" * 32)
    assert encode_message(blame) == ref_blame


def test_decoded_weight_vector_and_reference_self_mask() -> None:
    from secagg.blame import decoded_weight

    session, index, b = b"\x07" * 32, 2, KEY
    for bits in (32, 64):
        k_self = HKDF(
            hashes.SHA256(), 32, session, b"secagg/v1/selfmask\x00" + struct.pack(">I", index)
        ).derive(b)
        first = (
            Cipher(algorithms.AES(k_self), modes.CTR(bytes(16)))
            .encryptor()
            .update(bytes(bits // 8))
        )
        mask0 = int.from_bytes(first, "little")
        y0 = (mask0 + (1 << 16)) % (1 << bits)  # an honest uniform weight under this mask
        assert decoded_weight(y0, b, session, index, bits) == 1 << 16
        assert decoded_weight((mask0 - 5) % (1 << bits), b, session, index, bits) == -5
    assert decoded_weight(1234, b, session, index, 32) == -680052780

"""Every use of `cryptography.hazmat` in the secagg package (docs/secagg-protocol.md §3), behind a
small API: no other module of the package imports the hazmat layer (a test keeps it so), and
certificate handling elsewhere uses only `cryptography.x509` and the key types named here.

Rule: keys and randomness come in as arguments; every decryption or signature failure raises
the one opaque `DecryptionFailed`; the mask PRG (AES-256-CTR, zero counter block, little-endian
elements) is streamed into an accumulator through reused chunk buffers and added in place, so a
10^7-element mask never exists as one `bytes` object.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secagg.errors import BadKey, DecryptionFailed

PID = b"secagg/v1"
RandomBytes = Callable[[int], bytes]
CHUNK_BYTES = 1 << 20
_ZERO_BLOCK = bytes(16)
_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_ZEROS = bytes(CHUNK_BYTES)

# The key types other modules name (annotations, isinstance) without importing the hazmat layer.
X25519Key = X25519PrivateKey
SigningKey = ec.EllipticCurvePrivateKey  # a silo's or the CA's ECDSA P-256 key
VerifyingKey = ec.EllipticCurvePublicKey


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def lp(data: bytes) -> bytes:
    return u32(len(data)) + data


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_array(arr: np.ndarray) -> bytes:
    """SHA-256 over an array's bytes without copying it."""
    return hashlib.sha256(np.ascontiguousarray(arr).data.cast("B")).digest()


def ring_dtype(ring_bits: int) -> np.dtype[np.unsignedinteger]:
    if ring_bits == 32:
        return np.dtype("<u4")
    if ring_bits == 64:
        return np.dtype("<u8")
    raise ValueError(f"ring_bits must be 32 or 64, got {ring_bits}")


# --- key agreement -------------------------------------------------------------------------


def new_x25519(random_bytes: RandomBytes) -> X25519PrivateKey:
    """A fresh key pair from 32 injected random bytes (X25519 clamps them itself)."""
    return X25519PrivateKey.from_private_bytes(random_bytes(32))


def x25519_from_raw(secret: bytes) -> X25519PrivateKey:
    """The private key whose raw 32 bytes are `secret` (a reconstructed s_u); ValueError if
    `secret` is not 32 bytes."""
    return X25519PrivateKey.from_private_bytes(secret)


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret; a malformed or low-order peer key raises BadKey."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise BadKey("X25519 exchange refused the peer key") from exc


# --- KDF -------------------------------------------------------------------------------------


def kdf(ikm: bytes, info: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869), 32 bytes; salt is the session id (docs/secagg-protocol.md §3)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def k_enc(shared: bytes, session_id: bytes, i_from: int, i_to: int) -> bytes:
    return kdf(shared, PID + b"/shareenc\x00" + u32(i_from) + u32(i_to), session_id)


def k_pair(shared: bytes, session_id: bytes, i_a: int, i_b: int) -> bytes:
    lo, hi = min(i_a, i_b), max(i_a, i_b)
    return kdf(shared, PID + b"/pairmask\x00" + u32(lo) + u32(hi), session_id)


def k_self(b_u: bytes, session_id: bytes, index: int) -> bytes:
    return kdf(b_u, PID + b"/selfmask\x00" + u32(index), session_id)


def k_graph(session_id: bytes) -> bytes:
    return kdf(b"\x00" * 32, PID + b"/graph\x00", session_id)


def commit_b(session_id: bytes, index: int, b_u: bytes) -> bytes:
    return sha256(PID + b"/commit-b\x00" + session_id + u32(index) + b_u)


# --- AEAD --------------------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes, random_bytes: RandomBytes) -> bytes:
    nonce = random_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < 12 + 16:
        raise DecryptionFailed()
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
    except InvalidTag as exc:
        raise DecryptionFailed() from exc


# --- signatures -------------------------------------------------------------------------------


def _sig_input(kind: bytes, message: bytes) -> bytes:
    return PID + b"/sig/" + kind + b"\x00" + message


def ecdsa_sign(key: SigningKey, data: bytes) -> bytes:
    """Deterministic ECDSA/SHA-256 (RFC 6979) over exactly `data`: no hidden randomness. The
    caller prefixes its own domain (`sign` below, secagg.roster_sig)."""
    return key.sign(data, _ECDSA)


def ecdsa_verify(public: VerifyingKey, signature: bytes, data: bytes) -> None:
    """Raise DecryptionFailed unless `signature` is `public`'s ECDSA/SHA-256 over `data`."""
    try:
        public.verify(signature, data, _ECDSA)
    except (InvalidSignature, ValueError) as exc:
        raise DecryptionFailed() from exc


def sign(key: SigningKey, kind: bytes, message: bytes) -> bytes:
    """Deterministic ECDSA P-256/SHA-256 (RFC 6979): no hidden randomness."""
    return ecdsa_sign(key, _sig_input(kind, message))


def verify(public: VerifyingKey, signature: bytes, kind: bytes, message: bytes) -> None:
    ecdsa_verify(public, signature, _sig_input(kind, message))


# --- certificate keys ----------------------------------------------------------------------


def verifying_key(key: CertificatePublicKeyTypes) -> VerifyingKey | None:
    """A certificate's public key as an ECDSA verifying key; None for any other key type."""
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def is_p256(key: CertificatePublicKeyTypes) -> bool:
    """True for an ECDSA key on P-256, the only key type a silo or the CA may have."""
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def spki_der(key: CertificatePublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key (what the roster pins, hashed)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed_csr_pem(builder: x509.CertificateSigningRequestBuilder, key: SigningKey) -> bytes:
    """The CSR `builder` describes, signed by `key` with SHA-256, as PEM."""
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- mask PRG --------------------------------------------------------------------------------


def aes_ctr_keystream(key: bytes) -> CipherContext:
    """AES-CTR from a zero counter block: encrypting zeros yields the keystream (the mask PRG,
    the Harary permutation's words, the DP noise sampler's words)."""
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()


def add_mask(acc: np.ndarray, key: bytes, sign_: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """acc ← acc + sign_·PRG(key, len(acc)) mod 2^b, in place, streamed in chunks.

    acc must be a contiguous '<u4' or '<u8' array; the ring width is its itemsize.
    """
    if sign_ not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    itemsize = acc.dtype.itemsize
    per_chunk = chunk_bytes // itemsize
    enc = aes_ctr_keystream(key)
    buf = bytearray(per_chunk * itemsize + 15)
    zeros = memoryview(_ZEROS if chunk_bytes <= CHUNK_BYTES else bytes(chunk_bytes))
    ks_all = np.frombuffer(buf, dtype=acc.dtype, count=per_chunk)
    op = np.add if sign_ == 1 else np.subtract
    total = acc.shape[0]
    for start in range(0, total, per_chunk):
        n = min(per_chunk, total - start)
        enc.update_into(zeros[: n * itemsize], buf)
        part = acc[start : start + n]
        op(part, ks_all[:n], out=part)


def prg(key: bytes, length: int, ring_bits: int) -> np.ndarray:
    """The mask itself (for tests and small vectors): PRG(key, length) as ring elements."""
    out = np.zeros(length, dtype=ring_dtype(ring_bits))
    add_mask(out, key, 1)
    return out

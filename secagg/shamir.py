"""Shamir secret sharing of 32-byte secrets over F_p, p = 2^256 + 297 (docs/secagg-protocol.md §3).

Rule: coefficients come from injected random bytes by rejection sampling (uniform in [0, p));
shares are 33 bytes big-endian; reconstruction takes exactly `t` shares with distinct non-zero
x and interpolates at 0. Pure integers, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

P = 2**256 + 297
SHARE_BYTES = 33
_MASK_257 = (1 << 257) - 1


def random_field_element(random_bytes: Callable[[int], bytes]) -> int:
    """Uniform in [0, p): 257 random bits, rejected when >= p (accepts about half the draws)."""
    while True:
        v = int.from_bytes(random_bytes(33), "big") & _MASK_257
        if v < P:
            return v


def split(
    secret: bytes, threshold: int, xs: Sequence[int], random_bytes: Callable[[int], bytes]
) -> dict[int, bytes]:
    """Shares f(x) for each x in xs of a random degree-(threshold-1) polynomial with f(0)=secret."""
    coeffs = [random_field_element(random_bytes) for _ in range(threshold - 1)]
    return split_with_coefficients(secret, coeffs, xs)


def split_with_coefficients(
    secret: bytes, coeffs: Sequence[int], xs: Sequence[int]
) -> dict[int, bytes]:
    if len(secret) != 32:
        raise ValueError("Shamir secret must be 32 bytes")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    poly = [int.from_bytes(secret, "big"), *coeffs]
    out: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in reversed(poly):
            acc = (acc * x + c) % P
        out[x] = acc.to_bytes(SHARE_BYTES, "big")
    return out


def share_value(share: bytes) -> int:
    """The field element of a 33-byte share; raises ValueError if it is not < p."""
    if len(share) != SHARE_BYTES:
        raise ValueError("share must be 33 bytes")
    v = int.from_bytes(share, "big")
    if v >= P:
        raise ValueError("share is not a field element")
    return v


def reconstruct(shares: Mapping[int, bytes]) -> bytes:
    """Interpolate at 0 from the given shares (x -> 33-byte share); returns the 32-byte secret.

    Raises ValueError when the result does not fit in 32 bytes (inconsistent shares).
    """
    xs = list(shares)
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    total = 0
    for xj in xs:
        num, den = 1, 1
        for xm in xs:
            if xm != xj:
                num = num * (-xm) % P
                den = den * (xj - xm) % P
        total = (total + share_value(shares[xj]) * num * pow(den, -1, P)) % P
    if total >= 2**256:
        raise ValueError("shares are inconsistent (secret out of range)")
    return total.to_bytes(32, "big")

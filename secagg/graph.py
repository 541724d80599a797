"""Neighbour graphs (docs/secagg-protocol.md §4.6): complete by default, or the Harary ring of
SecAgg+.

Rule: the Harary permutation is a pure function of `session_id` (via k_graph and AES-256-CTR),
so the coordinator cannot choose it after the keys are fixed; indices are 1-based ranks.
"""

from __future__ import annotations

import struct

from secagg.primitives import aes_ctr_keystream, k_graph


def harary_permutation(session_id: bytes, n: int) -> list[int]:
    """π of 1..n by Fisher-Yates driven by 64-bit LE words of AES-256-CTR(k_graph, zero block)."""
    enc = aes_ctr_keystream(k_graph(session_id))
    perm = list(range(1, n + 1))
    for m in range(n - 1, 0, -1):
        bound = m + 1
        reject_from = 2**64 - (2**64 % bound)
        while True:
            (w,) = struct.unpack("<Q", enc.update(bytes(8)))
            if w < reject_from:
                break
        j = w % bound
        perm[m], perm[j] = perm[j], perm[m]
    return perm


def neighbours(n: int, session_id: bytes, harary_k: int | None = None) -> dict[int, frozenset[int]]:
    """index -> N(index). Complete graph when harary_k is None or k >= n - 1."""
    everyone = frozenset(range(1, n + 1))
    if harary_k is None or harary_k >= n - 1:
        return {i: everyone - {i} for i in everyone}
    ring = harary_permutation(session_id, n)
    half = harary_k // 2
    out: dict[int, frozenset[int]] = {}
    for pos, idx in enumerate(ring):
        near = {ring[(pos + off) % n] for off in range(-half, half + 1) if off}
        out[idx] = frozenset(near)
    return out

"""The two transcript hashes every party computes identically: session_id
(docs/secagg-protocol.md §5 step 2.5) and the consistency digest D (step 4.2).

Rule: inputs are canonical (sorted silo ids, ascending indices); any change to keys, config,
model or survivor sets changes the hash.
"""

from __future__ import annotations

from collections.abc import Iterable

from secagg.primitives import PID, lp, sha256, u32


def session_id(config_digest: bytes, keys: Iterable[tuple[str, bytes, bytes]]) -> bytes:
    """H(PID ‖ "/session\\0" ‖ config_digest ‖ u32(n) ‖ Σ lp(id) ‖ c_pk ‖ s_pk), ids sorted."""
    rows = sorted(keys, key=lambda row: row[0].encode())
    body = b"".join(lp(sid.encode()) + c_pk + s_pk for sid, c_pk, s_pk in rows)
    return sha256(PID + b"/session\x00" + config_digest + u32(len(rows)) + body)


def consistency_digest(
    session: bytes, config_digest: bytes, model_sha256: bytes, u2: Iterable[int], u3: Iterable[int]
) -> bytes:
    a, b = sorted(u2), sorted(u3)
    return sha256(
        PID
        + b"/consistency\x00"
        + session
        + config_digest
        + model_sha256
        + u32(len(a))
        + b"".join(u32(i) for i in a)
        + u32(len(b))
        + b"".join(u32(i) for i in b)
    )

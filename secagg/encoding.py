"""Fixed-point encoding of a model update into the ring Z_2^b, and decoding of the sum
(docs/secagg-protocol.md §4.3-§4.4).

Rule: clip to L2 norm C (norm in float64), quantise with unbiased stochastic rounding driven by
an injected numpy Generator, carry the quantised weight as element 0, and refuse any parameter
set for which the sum of n inputs could wrap around (the no-overflow rule). Each coordinate moves
by less than one grid step 1/S, so decode(sum) is within n/S of the float sum per coordinate.
"""

from __future__ import annotations

import math

import numpy as np

from secagg.primitives import ring_dtype

SR_CHUNK = 1 << 16
DP_TAIL_SIGMAS = 9.0


def overflow_ok(
    n: int,
    scale: float,
    clip_l2: float,
    weight_scale: int,
    ring_bits: int,
    noise_multiplier: float = 0.0,
    noise_divisor: int = 1,
) -> bool:
    """The no-overflow rule (docs/secagg-protocol.md §4.4) for n summed inputs."""
    limit = 2 ** (ring_bits - 1) - 1
    sigma_sum = noise_multiplier * clip_l2
    lhs = n * (scale * clip_l2 + 1) + DP_TAIL_SIGMAS * scale * sigma_sum * math.sqrt(
        n / noise_divisor
    )
    if lhs > limit or n * weight_scale > limit:
        return False
    return not (ring_bits == 64 and scale * clip_l2 > 2.0**40)


def recommended_scale(
    n_max: int,
    clip_l2: float,
    ring_bits: int,
    noise_multiplier: float = 0.0,
    noise_divisor: int = 1,
) -> float:
    """S = floor((2^(b-1) - 1 - n_max) / (n_max·C + 9·σ_sum·√(n_max/n_h))), capped for b = 64."""
    sigma_sum = noise_multiplier * clip_l2
    denom = n_max * clip_l2 + DP_TAIL_SIGMAS * sigma_sum * math.sqrt(n_max / noise_divisor)
    s = float(math.floor((2 ** (ring_bits - 1) - 1 - n_max) / denom))
    if ring_bits == 64:
        s = min(s, float(math.floor(2.0**40 / clip_l2)))
    # The division is exact in reals but not in floats: for a clip like 0.001 the rounded S can
    # break the rule it was derived from by an ulp. Step down until the rule holds as checked.
    for _ in range(64):
        if s <= 0 or overflow_ok(n_max, s, clip_l2, 1, ring_bits, noise_multiplier, noise_divisor):
            break
        s = float(math.floor(s - max(1.0, s * 2.0**-44)))
    return s


def clip_factor(delta: np.ndarray, clip_l2: float) -> float:
    """min(1, C/‖Δ‖₂) with the norm accumulated in float64 (one reused chunk buffer)."""
    buf = np.empty(SR_CHUNK, dtype=np.float64)
    sq = 0.0
    for start in range(0, delta.shape[0], SR_CHUNK):
        part = buf[: min(SR_CHUNK, delta.shape[0] - start)]
        np.copyto(part, delta[start : start + part.shape[0]])
        # einsum, not np.dot: no BLAS thread pool (its start-up alone cost 0.25-1 s per silo)
        sq += float(np.einsum("i,i->", part, part))
    norm = math.sqrt(sq)
    return 1.0 if norm <= clip_l2 else clip_l2 / norm


def quantised_weight(
    num_examples: int,
    weighting_examples: bool,
    weight_max: int,
    weight_scale: int,
    rng: np.random.Generator,
) -> int:
    """q_w = SR(S_w·w̃) with w̃ = 1 (uniform) or min(num_examples, W_max)/W_max."""
    if not weighting_examples:
        return weight_scale
    w = min(max(num_examples, 0), weight_max) / weight_max
    y = weight_scale * w
    fl = math.floor(y)
    return int(fl + (1 if rng.random() < y - fl else 0))


def encode_into(
    out: np.ndarray,
    delta: np.ndarray,
    q_w: int,
    factor: float,
    rng: np.random.Generator,
    noise: np.ndarray | None = None,
    *,
    accumulate: bool = False,
) -> None:
    """out[0] = q_w; out[1:] = SR(factor·Δ) (+ noise) mod 2^b; with `accumulate`, add instead.

    `factor` = S·ŵ·clip; `noise` (int64, length d) is the optional discrete Gaussian noise.
    Works chunk by chunk through reused buffers: large fresh allocations cost page faults.
    """
    d = delta.shape[0]
    if out.shape[0] != d + 1:
        raise ValueError(f"output must hold d + 1 = {d + 1} elements, got {out.shape[0]}")
    signed = to_signed(out)
    w = np.array([q_w], dtype=np.int64)
    if accumulate:
        np.add(signed[:1], w, out=signed[:1], casting="unsafe")
    else:
        np.copyto(signed[:1], w, casting="unsafe")
    y = np.empty(SR_CHUNK, dtype=np.float64)
    u = np.empty(SR_CHUNK, dtype=np.float64)
    fl = np.empty(SR_CHUNK, dtype=np.float64)
    up = np.empty(SR_CHUNK, dtype=np.bool_)
    q = np.empty(SR_CHUNK, dtype=np.int64)
    qs = np.empty(SR_CHUNK, dtype=signed.dtype)
    body = signed[1:]
    for start in range(0, d, SR_CHUNK):
        n = min(SR_CHUNK, d - start)
        yv, uv, fv, upv, qv, qsv = y[:n], u[:n], fl[:n], up[:n], q[:n], qs[:n]
        np.multiply(delta[start : start + n], factor, out=yv, dtype=np.float64)
        np.floor(yv, out=fv)
        np.subtract(yv, fv, out=yv)  # fractional part in [0, 1)
        rng.random(out=uv)
        np.less(uv, yv, out=upv)  # round up with probability = fraction
        np.add(fv, upv, out=fv)
        if noise is not None:
            np.copyto(qv, fv, casting="unsafe")
            np.add(qv, noise[start : start + n], out=qv)
            np.copyto(qsv, qv, casting="unsafe")  # within int_b by the no-overflow rule
        else:
            np.copyto(qsv, fv, casting="unsafe")  # |q| <= S·C + 1 < 2^(b-1) by the rule
        dest = body[start : start + n]
        if accumulate:
            np.add(dest, qsv, out=dest)  # same dtype: wraps mod 2^b
        else:
            dest[...] = qsv


def to_signed(ring: np.ndarray) -> np.ndarray:
    """Reinterpret ring elements as two's-complement int_b (a view, no copy)."""
    return ring.view(np.int32 if ring.dtype.itemsize == 4 else np.int64)


def decode(z: np.ndarray, scale: float, weight_scale: int) -> tuple[np.ndarray, int]:
    """(ḡ, W) from the unmasked sum z: ḡ_j = (z_j/S)/(W/S_w), W = z_0 as signed int.

    Decodes IN PLACE: z's memory is reused for ḡ (float32 for b = 32, float64 for b = 64), so
    no second model-sized array is allocated; z is destroyed.
    """
    signed = to_signed(z)
    weight_sum = int(signed[0])
    if weight_sum < 1:
        raise ValueError("weight sum must be >= 1")
    fdt = np.float32 if z.dtype.itemsize == 4 else np.float64
    g = z.view(fdt)
    factor = weight_scale / (scale * weight_sum)
    buf = np.empty(SR_CHUNK, dtype=np.float64)
    for start in range(0, z.shape[0], SR_CHUNK):
        part = buf[: min(SR_CHUNK, z.shape[0] - start)]
        np.multiply(signed[start : start + part.shape[0]], factor, out=part)  # read first
        np.copyto(g[start : start + part.shape[0]], part, casting="same_kind")
    return g[1:], weight_sum


def empty_ring(length: int, ring_bits: int) -> np.ndarray:
    return np.empty(length, dtype=ring_dtype(ring_bits))

"""Fixed-point encoding of a model update into the ring Z_2^b, and decoding of the sum
(SECAGG.md §4.2-§4.3).

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
    """The no-overflow rule of SECAGG.md §4.3 for n summed inputs."""
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
    return s


def clip_factor(delta: np.ndarray, clip_l2: float) -> float:
    """min(1, C/‖Δ‖₂) with the norm accumulated in float64."""
    sq = 0.0
    for start in range(0, delta.shape[0], SR_CHUNK * 16):
        part = delta[start : start + SR_CHUNK * 16].astype(np.float64)
        sq += float(np.dot(part, part))
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
) -> None:
    """out[0] = q_w; out[1:] = SR(factor·Δ) (+ noise) mod 2^b, in chunks, without big temporaries.

    `factor` = S·ŵ·clip; `noise` (int64, length d) is the optional discrete Gaussian noise.
    """
    d = delta.shape[0]
    if out.shape[0] != d + 1:
        raise ValueError(f"output must hold d + 1 = {d + 1} elements, got {out.shape[0]}")
    udt = out.dtype
    sdt = np.int32 if udt.itemsize == 4 else np.int64
    out[0] = np.array(q_w, dtype=np.int64).astype(sdt).view(udt)
    y = np.empty(SR_CHUNK, dtype=np.float64)
    u = np.empty(SR_CHUNK, dtype=np.float64)
    fl = np.empty(SR_CHUNK, dtype=np.float64)
    body = out[1:]
    for start in range(0, d, SR_CHUNK):
        n = min(SR_CHUNK, d - start)
        yv, uv, fv = y[:n], u[:n], fl[:n]
        np.multiply(delta[start : start + n], factor, out=yv, dtype=np.float64)
        np.floor(yv, out=fv)
        np.subtract(yv, fv, out=yv)  # fractional part in [0, 1)
        rng.random(out=uv)
        np.add(fv, np.less(uv, yv), out=fv)  # round up with probability = fraction
        q = fv.astype(np.int64)
        if noise is not None:
            q += noise[start : start + n]
        body[start : start + n] = q.astype(sdt).view(udt)


def to_signed(ring: np.ndarray) -> np.ndarray:
    """Reinterpret ring elements as two's-complement int_b (a view, no copy)."""
    return ring.view(np.int32 if ring.dtype.itemsize == 4 else np.int64)


def decode(z: np.ndarray, scale: float, weight_scale: int) -> tuple[np.ndarray, int]:
    """(ḡ as float64 of length d, W) from the unmasked sum z: ḡ_j = (z_j/S)/(W/S_w)."""
    signed = to_signed(z)
    weight_sum = int(signed[0])
    if weight_sum < 1:
        raise ValueError("weight sum must be >= 1")
    g = signed[1:].astype(np.float64)
    g *= weight_scale / (scale * weight_sum)
    return g, weight_sum


def empty_ring(length: int, ring_bits: int) -> np.ndarray:
    return np.empty(length, dtype=ring_dtype(ring_bits))

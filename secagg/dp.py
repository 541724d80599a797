"""Optional distributed discrete Gaussian noise: the sampler and its accounting.

Rule: the noise is drawn by the Canonne-Kamath-Steinke rejection sampler (discrete Laplace
proposal of scale t = floor(sigma) + 1, accepted with probability
exp(-(|y| - sigma²/t)² / (2 sigma²))), vectorised, and every random bit it consumes comes from
AES-256-CTR keyed by a 32-byte seed the caller draws fresh from the OS CSPRNG (os.urandom or
`secrets`) for that one call. Without the seed the keystream is indistinguishable from random
bytes (AES-256 as a pseudorandom permutation), so a party that sees other outputs of the silo —
masked vectors, rounding decisions, earlier rounds' noise — still cannot predict this noise;
numpy's PCG64DXSM, which drew the noise before, is a fast statistical generator that was never
designed to resist prediction from its outputs. The stochastic-rounding generator is still numpy
PCG64DXSM seeded from os.urandom: rounding only has to be unbiased and independent of the
data, its randomness need not be secret, and the privacy guarantee rests on this noise alone.
The privacy report is computed with `dp_accounting` from the Kairouz-Liu-Steinke RDP bound of
the distributed discrete Gaussian, so the numbers a silo may recompute are the coordinator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from secagg.codec import Reader, Writer
from secagg.primitives import aes_ctr_keystream

SEED_BYTES = 32
# Candidates per keystream chunk: 2 words of 8 bytes each, so 1 MiB of keystream and a handful
# of float64 temporaries of the same length stay in cache while numpy works on them.
_CHUNK = 1 << 16
_ULP53 = 2.0**-53

ORDERS = tuple(
    [
        1.25,
        1.5,
        1.75,
        2.0,
        2.5,
        3.0,
        4.0,
        5.0,
        6.0,
        8.0,
        10.0,
        12.0,
        16.0,
        20.0,
        24.0,
        32.0,
        48.0,
        64.0,
        128.0,
        256.0,
    ]
)


def _check_args(sigma: float, size: int, seed: bytes) -> None:
    if not isinstance(seed, bytes):
        raise TypeError(
            f"seed must be {SEED_BYTES} bytes from os.urandom/secrets, got {type(seed).__name__}"
        )
    if len(seed) != SEED_BYTES:
        raise ValueError(
            f"seed must be exactly {SEED_BYTES} fresh bytes from os.urandom/secrets, "
            f"got {len(seed)}"
        )
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")


def sample_discrete_gaussian(sigma: float, size: int, seed: bytes) -> np.ndarray:
    """i.i.d. N_Z(0, sigma²) as int64 (CKS 2020, Algorithm 3, vectorised), keyed by `seed`.

    Candidate i consumes little-endian 64-bit keystream words 2i (proposal) and 2i + 1
    (acceptance), so the same seed gives the same noise. Each word becomes a uniform on the
    53-bit grid U = ((w >> 11) + 1)·2^-53 in (0, 1]: zero is excluded so log(U) is finite, and
    1 is kept because a 2^53-point grid strictly inside (0, 1) is not representable in float64
    near 1; U = 1 is harmless (it proposes |Y| = 0, and as U' it accepts only when p = 1).

    The proposal is drawn exactly like the difference of two geometrics, with one uniform:
    Y = ±|Y| has P(Y = y) = (1-q)/(1+q)·q^|y|, q = exp(-1/t), iff P(|Y| >= k) = 2q^k/(1+q)
    for k >= 1 and the sign is a fair bit independent of |Y| (at 0 the sign is moot). Inverse
    transform gives |Y| = max(0, floor(-t·log(U·(1+q)/2))), since -t·log(V) >= k <=> V <= q^k;
    the sign is bit 0 of the same word, disjoint from the 53 bits that made U. With a 53-bit U
    each probability is exact up to ~2^-52 (grid and log rounding), and the largest |Y| is
    about 37·t, where the target's tail mass is below exp(-600): far below anything the
    accounting or a test can see. The acceptance test U' <= p accepts with probability
    floor(p·2^53)/2^53, again within 2^-53 of p.
    """
    _check_args(sigma, size, seed)
    t = math.floor(sigma) + 1
    q = math.exp(-1.0 / t)
    log_half_1q = math.log((1.0 + q) / 2.0)
    shift = sigma**2 / t
    neg_inv_2var = -1.0 / (2.0 * sigma**2)

    out = np.empty(size, dtype=np.int64)
    # a zero counter block is safe: every seed is fresh and keys exactly one call
    enc = aes_ctr_keystream(seed)
    zeros = bytes(2 * _CHUNK * 8)
    buf = bytearray(len(zeros) + 15)  # update_into wants block_size - 1 spare bytes
    words = np.frombuffer(buf, dtype="<u8", count=2 * _CHUNK).reshape(_CHUNK, 2)
    prop_w, acc_w = words[:, 0], words[:, 1]
    bits = np.empty(_CHUNK, dtype=np.uint64)
    mag = np.empty(_CHUNK, dtype=np.float64)
    prob = np.empty(_CHUNK, dtype=np.float64)
    u_acc = np.empty(_CHUNK, dtype=np.float64)
    accept = np.empty(_CHUNK, dtype=np.bool_)
    filled = 0
    while filled < size:
        enc.update_into(zeros, buf)
        # |Y| = max(0, floor(-t·(log U + log((1+q)/2)))), U from the proposal word
        np.right_shift(prop_w, 11, out=bits)
        np.add(bits, 1, out=bits)
        np.multiply(bits, _ULP53, out=mag)
        np.log(mag, out=mag)
        np.add(mag, log_half_1q, out=mag)
        np.multiply(mag, -t, out=mag)
        np.floor(mag, out=mag)
        np.maximum(mag, 0.0, out=mag)
        # accept with probability exp(-(|Y| - sigma²/t)² / (2 sigma²))
        np.subtract(mag, shift, out=prob)
        np.square(prob, out=prob)
        np.multiply(prob, neg_inv_2var, out=prob)
        np.exp(prob, out=prob)
        np.right_shift(acc_w, 11, out=bits)
        np.add(bits, 1, out=bits)
        np.multiply(bits, _ULP53, out=u_acc)
        np.less_equal(u_acc, prob, out=accept)
        got = mag[accept].astype(np.int64)
        negative = (prop_w[accept] & np.uint64(1)).astype(np.bool_)
        np.negative(got, out=got, where=negative)
        n = min(got.shape[0], size - filled)
        out[filled : filled + n] = got[:n]
        filled += n
    return out


@dataclass(frozen=True, slots=True)
class DpReport:
    """Carried in every RoundResult of a round that adds distributed discrete Gaussian noise."""

    noise_multiplier: float
    noise_divisor: int
    honest_survivors: int
    effective_multiplier: float
    rounds: int
    epsilon: float
    delta: float

    def encode(self) -> bytes:
        w = Writer().f64(self.noise_multiplier).u32(self.noise_divisor)
        w.u32(self.honest_survivors).f64(self.effective_multiplier).u32(self.rounds)
        return w.f64(self.epsilon).f64(self.delta).bytes()

    @classmethod
    def decode(cls, data: bytes) -> DpReport:
        r = Reader(data)
        out = cls(r.f64(), r.u32(), r.u32(), r.f64(), r.u32(), r.f64(), r.f64())
        r.end()
        return out


def ddg_rdp(
    orders: tuple[float, ...], sigma_loc: float, m: int, d: int, scale: float, clip_l2: float
) -> list[float]:
    """Per-round RDP of the sum of m discrete Gaussians N_Z(0, σ_loc²) (KLS 2021, Prop. 14).

    ε(α) = α·Δ₂²/(2·m·σ_loc²) + τ·d with Δ₂ = S·C + √d (rounding-inflated) and
    τ = 10·Σ_{k=1}^{m-1} exp(-2π²σ_loc²·k/(k+1)).
    """
    tau = 10.0 * sum(math.exp(-2 * math.pi**2 * sigma_loc**2 * k / (k + 1)) for k in range(1, m))
    delta2 = scale * clip_l2 + math.sqrt(d)
    return [a * delta2**2 / (2 * m * sigma_loc**2) + tau * d for a in orders]


def ddg_epsilon(
    noise_multiplier: float,
    noise_divisor: int,
    m: int,
    d: int,
    scale: float,
    clip_l2: float,
    rounds: int,
    delta: float,
) -> float:
    """ε(δ) after `rounds` rounds (sampling rate 1), via dp_accounting's RDP conversion."""
    sigma_loc = noise_multiplier * clip_l2 * scale / math.sqrt(noise_divisor)
    per_round = ddg_rdp(ORDERS, sigma_loc, m, d, scale, clip_l2)
    # Imported here: dp_accounting costs about a second at import, and only a DP round needs it.
    from dp_accounting.rdp import rdp_privacy_accountant

    eps, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, [rounds * r for r in per_round], delta)
    return float(eps)


def ddg_report(
    noise_multiplier: float,
    noise_divisor: int,
    survivors: int,
    n_colluders: int,
    d: int,
    scale: float,
    clip_l2: float,
    rounds: int,
    delta: float,
) -> DpReport:
    m_h = max(survivors - n_colluders, 1)
    eps = ddg_epsilon(noise_multiplier, noise_divisor, m_h, d, scale, clip_l2, rounds, delta)
    return DpReport(
        noise_multiplier,
        noise_divisor,
        m_h,
        noise_multiplier * math.sqrt(m_h / noise_divisor),
        rounds,
        eps,
        delta,
    )

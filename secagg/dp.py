"""Optional distributed discrete Gaussian noise (SECAGG.md §8): the sampler and its accounting.

Rule: the sampler is the Canonne-Kamath-Steinke rejection sampler with a discrete Laplace
proposal, vectorised, driven only by the injected numpy Generator; the privacy report is
computed with `dp_accounting` from the Kairouz-Liu-Steinke RDP bound of the distributed
discrete Gaussian, so the numbers a silo may recompute are the coordinator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from secagg.codec import Reader, Writer

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


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """i.i.d. N_Z(0, sigma²) as int64 (CKS 2020, Algorithm 3, vectorised)."""
    if sigma <= 0:
        raise ValueError("sigma must be > 0")
    t = math.floor(sigma) + 1
    p = 1.0 - math.exp(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = max(1024, int((size - filled) * 1.6))
        y = (rng.geometric(p, want) - rng.geometric(p, want)).astype(np.int64)
        accept = rng.random(want) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        got = y[accept][: size - filled]
        out[filled : filled + got.shape[0]] = got
        filled += got.shape[0]
    return out


@dataclass(frozen=True, slots=True)
class DpReport:
    """Carried in every RoundResult under dp = ddg (SECAGG.md §8)."""

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

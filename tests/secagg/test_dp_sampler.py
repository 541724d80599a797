"""The discrete Gaussian sampler: keyed by AES-256-CTR only, deterministic per seed, exact pmf."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.dp import sample_discrete_gaussian


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and exact pmf of N_Z(0, sigma²) ∝ exp(-k²/2σ²), cut where mass < 1e-30."""
    half = int(12 * sigma) + 3
    k = np.arange(-half, half + 1)
    pmf = np.exp(-(k.astype(np.float64) ** 2) / (2 * sigma**2))
    return k, pmf / pmf.sum()


def _reference(sigma: float, count: int, seed: bytes) -> list[int]:
    """Scalar re-derivation straight from the AES-256-CTR keystream, one candidate per 16 bytes:
    word 2i gives |Y| by inverse transform and the sign (bit 0), word 2i + 1 the acceptance."""
    t = math.floor(sigma) + 1
    q = math.exp(-1 / t)
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    out: list[int] = []
    while len(out) < count:
        w_prop, w_acc = struct.unpack("<QQ", stream.update(bytes(16)))
        u = ((w_prop >> 11) + 1) * 2.0**-53
        mag = max(0, math.floor(-t * (math.log(u) + math.log((1 + q) / 2))))
        p = math.exp(-((mag - sigma**2 / t) ** 2) / (2 * sigma**2))
        if ((w_acc >> 11) + 1) * 2.0**-53 <= p:
            out.append(-mag if w_prop & 1 else mag)
    return out


def test_same_seed_same_noise_and_the_stream_is_the_aes_keystream() -> None:
    seed = _seed("determinism")
    a = sample_discrete_gaussian(3.0, 200_000, seed)
    assert a.dtype == np.int64 and a.shape == (200_000,)
    assert np.array_equal(a, sample_discrete_gaussian(3.0, 200_000, seed))
    # candidate i always reads keystream words 2i and 2i+1: a shorter draw is a prefix
    assert np.array_equal(a[:1000], sample_discrete_gaussian(3.0, 1000, seed))
    assert a[:500].tolist() == _reference(3.0, 500, seed)
    other = sample_discrete_gaussian(3.0, 200_000, _seed("determinism/other"))
    # two independent N_Z(0, 9) draws coincide with probability ~ 1/(2·sqrt(pi)·3) ≈ 0.094
    assert float(np.mean(a == other)) < 0.15


@pytest.mark.parametrize("sigma", [0.8, 40.0, 3000.0])
def test_mean_variance_and_tail_match_the_discrete_gaussian(sigma: float) -> None:
    n = 1_000_000
    x = sample_discrete_gaussian(sigma, n, _seed(f"moments/{sigma}"))
    k, pmf = _pmf(sigma)
    kf = k.astype(np.float64)
    var = float(np.sum(pmf * kf**2))
    mu4 = float(np.sum(pmf * kf**4))
    assert abs(var / sigma**2 - 1) < 1e-3  # N_Z(0, σ²) has variance σ²(1 - O(1e-4)) here
    # five standard errors of the sample mean and of the sample variance at this n
    assert abs(float(x.mean())) < 5 * math.sqrt(var / n)
    assert abs(float(x.astype(np.float64).var()) - var) < 5 * math.sqrt((mu4 - var**2) / n)
    tail = float(pmf[np.abs(k) > 2 * sigma].sum())
    frac = float(np.mean(np.abs(x) > 2 * sigma))
    assert abs(frac - tail) < 5 * math.sqrt(tail * (1 - tail) / n)


def _chi2_pvalue(x: np.ndarray, sigma_model: float, lo: int, hi: int) -> float:
    """Pearson chi-square of the counts of x on lo..hi (tails lumped) against N_Z(0, σ_model²)."""
    k, pmf = _pmf(sigma_model)
    inner = [pmf[k == v].sum() for v in range(lo, hi + 1)]
    expected = np.array([pmf[k < lo].sum(), *inner, pmf[k > hi].sum()]) * x.size
    observed = np.array(
        [np.sum(x < lo)] + [np.sum(x == v) for v in range(lo, hi + 1)] + [np.sum(x > hi)]
    )
    stat = float(np.sum((observed - expected) ** 2 / expected))
    # chi-square survival function by the Wilson-Hilferty cube-root normal approximation
    dof = expected.size - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("sigma", [0.8, 2.5])
def test_pmf_matches_the_exact_discrete_gaussian(sigma: float) -> None:
    x = sample_discrete_gaussian(sigma, 1_000_000, _seed(f"pmf/{sigma}"))
    # every bin, the two lumped tails included, expects at least ~30 draws
    half = int(math.floor(math.sqrt(2 * sigma**2 * math.log(1_000_000 / 30))))
    assert _chi2_pvalue(x, sigma, -half, half) > 1e-4
    # the comparison has the power to see a 2% error in the scale
    assert _chi2_pvalue(x, 1.02 * sigma, -half, half) < 1e-6


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), bytes(64)])
def test_rejects_a_seed_that_is_not_32_bytes(seed: bytes) -> None:
    with pytest.raises(ValueError, match="32"):
        sample_discrete_gaussian(1.0, 10, seed)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_rejects_a_sigma_that_is_not_positive_and_finite(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        sample_discrete_gaussian(sigma, 10, bytes(32))


def test_takes_no_numpy_generator_and_leaves_numpy_random_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="os.urandom"):
        sample_discrete_gaussian(1.0, 10, rng)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sample_discrete_gaussian(1.0, 10, bytearray(32))  # type: ignore[arg-type]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sampler used numpy's random module")

    np.random.seed(1234)
    before = np.random.get_state(legacy=False)
    for name in ("default_rng", "Generator", "PCG64", "PCG64DXSM", "MT19937", "RandomState"):
        monkeypatch.setattr(np.random, name, refuse)
    for name in ("random", "random_sample", "geometric", "laplace", "seed", "get_state"):
        monkeypatch.setattr(np.random, name, refuse)
    x = sample_discrete_gaussian(50.0, 100_000, _seed("no-numpy-random"))
    monkeypatch.undo()
    after = np.random.get_state(legacy=False)
    assert x.shape == (100_000,)
    assert np.array_equal(before["state"]["key"], after["state"]["key"])
    assert {k: v for k, v in before.items() if k != "state"} == {
        k: v for k, v in after.items() if k != "state"
    }
    assert before["state"]["pos"] == after["state"]["pos"]

"""Distributed discrete Gaussian (sampler, accounting, a DP round) and the canonical codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import get_epsilon_gaussian  # type: ignore[attr-defined]

from secagg.config import DdgNoise, RoundConfig
from secagg.coordinator import Phase
from secagg.dp import DpReport, ddg_epsilon, sample_discrete_gaussian
from secagg.errors import MalformedMessage
from secagg.messages import ShareKeys, decode_message, encode_message
from tests.secagg.harness import Round, make_config
from tests.secagg.pki import federation


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_discrete_gaussian_moments(sigma: float) -> None:
    x = sample_discrete_gaussian(sigma, 200_000, np.random.default_rng(5))
    assert x.dtype == np.int64
    assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)
    assert abs(x.var() / sigma**2 - 1) < 0.03
    # tail mass against the exact discrete Gaussian pmf ∝ exp(-k²/2σ²)
    k = np.arange(-int(20 * sigma) - 5, int(20 * sigma) + 6)
    pmf = np.exp(-(k**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    tail = float(pmf[np.abs(k) > 2 * sigma].sum())
    assert abs(float(np.mean(np.abs(x) > 2 * sigma)) - tail) < 0.005


def test_ddg_epsilon_close_to_continuous_gaussian_for_large_scale() -> None:
    z, rounds, delta = 1.0, 10, 1e-5
    eps = ddg_epsilon(z, 4, 4, 1000, 2.0**20, 1.0, rounds, delta)
    ref = get_epsilon_gaussian(z / math.sqrt(rounds), delta)
    assert ref * 0.9 < eps < ref * 1.3
    assert ddg_epsilon(2 * z, 4, 4, 1000, 2.0**20, 1.0, rounds, delta) < eps


def test_round_with_ddg_noise_reports_privacy_and_stays_near_mean() -> None:
    fed = federation()
    n = 5
    cfg = make_config(fed, n, 2000, scale=2.0**12, clip_l2=10.0, dp=DdgNoise(0.5, 2))
    rng = np.random.default_rng(0)
    inputs = {s: (rng.standard_normal(cfg.d) * 0.05).astype(np.float32) for s in cfg.invited}
    rnd = Round(fed, cfg, inputs).run()
    assert rnd.phase is Phase.DONE and rnd.result is not None
    report = rnd.result.dp_report
    assert report is not None and report.honest_survivors == n - cfg.n_colluders
    assert DpReport.decode(report.encode()) == report
    mean = np.mean([inputs[s] for s in cfg.invited], axis=0)
    err = rnd.result.aggregate - mean
    # noise std of the mean: z·C·sqrt(n/n_h)/n
    expected_std = 0.5 * 10.0 * math.sqrt(n / 2) / n
    assert 0.8 < float(err.std()) / expected_std < 1.2


def test_config_roundtrip_and_rejections() -> None:
    cfg = make_config(federation(), 4, 10, dp=DdgNoise(1.0, 2), scale=2.0**8, clip_l2=1.0)
    data = cfg.encode()
    assert RoundConfig.decode(data) == cfg
    assert cfg.digest() != make_config(federation(), 4, 11).digest()
    for bad in (data[:-1], data + b"\x00", b"\x02" + data[1:]):
        with pytest.raises(MalformedMessage):
            RoundConfig.decode(bad)


def test_message_codec_rejects_malformed_bytes() -> None:
    m = ShareKeys(b"s" * 32, 3, b"c" * 32, ((1, b"ct1"), (2, b"ct2")))
    data = encode_message(m)
    assert decode_message(data) == m
    for bad in (data[:-1], data + b"x", b"XX1" + data[3:], data[:3] + b"\x63" + data[4:]):
        with pytest.raises(MalformedMessage):
            decode_message(bad)

"""Distributed discrete Gaussian (accounting, a DP round) and the canonical codecs.

The sampler itself is tested in test_dp_sampler.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from dp_accounting import get_epsilon_gaussian  # type: ignore[attr-defined]

from secagg.config import DdgNoise, RoundConfig
from secagg.coordinator import Phase
from secagg.dp import DpReport, ddg_epsilon
from secagg.errors import ConfigError, MalformedMessage
from secagg.messages import ShareKeys, decode_message, encode_message
from tests.secagg.harness import Round, make_config
from tests.secagg.pki import federation


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
    cfg = make_config(
        federation(), 4, 10, dp=DdgNoise(1.0, 2), scale=2.0**8, clip_l2=1.0, train_params=b'{"a":1}'
    )
    data = cfg.encode()
    assert RoundConfig.decode(data) == cfg
    assert cfg.digest() != make_config(federation(), 4, 11).digest()
    # version 1 (no train_params) and an unknown version 3 are refused
    for bad in (data[:-1], data + b"\x00", b"\x01" + data[1:], b"\x03" + data[1:]):
        with pytest.raises(MalformedMessage):
            RoundConfig.decode(bad)


def test_config_train_params_are_bound_by_the_digest_and_size_limited() -> None:
    fed = federation()
    plain = make_config(fed, 4, 10)
    assert plain.train_params == b"{}"
    tuned = make_config(fed, 4, 10, train_params=b'{"epochs":2}')
    assert tuned.digest() != plain.digest()
    assert RoundConfig.decode(tuned.encode()).train_params == b'{"epochs":2}'
    with pytest.raises(ConfigError, match="train_params is 65537 bytes"):
        make_config(fed, 4, 10, train_params=b"x" * (64 * 1024 + 1))
    make_config(fed, 4, 10, train_params=b"x" * (64 * 1024))  # the limit itself is structural-ok
    # an oversized blob inside otherwise valid bytes does not decode
    big = dataclasses.replace(plain, train_params=b"")
    raw = big.encode()[:-4] + (64 * 1024 + 1).to_bytes(4, "big") + b"x" * (64 * 1024 + 1)
    with pytest.raises(MalformedMessage, match="train_params"):
        RoundConfig.decode(raw)


def test_message_codec_rejects_malformed_bytes() -> None:
    m = ShareKeys(b"s" * 32, 3, b"c" * 32, ((1, b"ct1"), (2, b"ct2")))
    data = encode_message(m)
    assert decode_message(data) == m
    for bad in (data[:-1], data + b"x", b"XX1" + data[3:], data[:3] + b"\x63" + data[4:]):
        with pytest.raises(MalformedMessage):
            decode_message(bad)

"""Secure-aggregation micro-benchmark (issue 3, acceptance 4): n = 10, d = 10^7 by default.

Prints one `key: value` line per figure (medians over --runs runs; the silo figures over every
silo of every run):
  silo_encode_mask_s                one silo's submit_update (clip, SR, self + 9 pairwise masks,
                                    vector hash) with no precomputation
  silo_encode_mask_precomputed_s    the same when precompute_masks() ran during training
  coordinator_unmask_s              reconstruct + remove 10 self masks + decode, no dropout
  coordinator_unmask_one_dropout_s  the same with one silo dropped after ShareKeys
  mask_gbps                         one mask expansion into an accumulator, GB of keystream/s
  dp_noise_s                        one silo's d-element discrete Gaussian noise draw (AES-256-CTR
                                    keyed sampler) at the sigma of a round with noise multiplier 1,
                                    the largest noise divisor the silo accepts (threshold minus
                                    colluders) and the scale recommended for that noise
Targets: silo <= 0.25 s, coordinator <= 0.15 s with no dropout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secagg import primitives  # noqa: E402
from secagg.config import DdgNoise  # noqa: E402
from secagg.coordinator import Phase  # noqa: E402
from secagg.dp import sample_discrete_gaussian  # noqa: E402
from secagg.encoding import recommended_scale  # noqa: E402
from secagg.silo import MaskedUpload, SiloSession  # noqa: E402
from tests.secagg.harness import Round, make_config  # noqa: E402
from tests.secagg.pki import federation  # noqa: E402


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _wrap(session: SiloSession, timings: list[float], precompute: bool) -> None:
    original = session.submit_update

    def timed(delta: np.ndarray, num_examples: int) -> MaskedUpload:
        if precompute:
            session.precompute_masks()
        t0 = time.perf_counter()
        out = original(delta, num_examples)
        timings.append(time.perf_counter() - t0)
        return out

    session.submit_update = timed  # type: ignore[method-assign]


def bench_round(n: int, d: int, drop: bool, precompute: bool) -> tuple[list[float], float]:
    """(every silo's submit_update seconds, coordinator unmask seconds)."""
    fed = federation()
    cfg = make_config(fed, n, d, scale=recommended_scale(n, 1e4, 32), clip_l2=1e4)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(d).astype(np.float32)
    inputs = {sid: base for sid in cfg.invited}
    drop_at = {cfg.invited[-1]: "masked"} if drop else {}
    r = Round(fed, cfg, inputs, drop_at=drop_at, keep_ring_sum=False)
    timings: list[float] = []
    for session in r.sessions.values():
        _wrap(session, timings, precompute)
    rnd = r.run(stop_at=Phase.UNMASK)
    pending = list(r.pending)
    replies: list[tuple[str, bytes]] = []
    for dest, data in pending:
        replies.extend((dest, x) for x in r.sessions[dest].handle(data, now=_now()))
    t0 = time.perf_counter()
    for dest, data in replies:
        rnd.handle(dest, data, now=_now())
    unmask = time.perf_counter() - t0
    assert rnd.phase is Phase.DONE and rnd.result is not None
    return timings, unmask


def _now() -> dt.datetime:
    from tests.secagg.pki import NOW

    return NOW


def bench_mask(d: int) -> float:
    acc = np.zeros(d + 1, dtype="<u4")
    acc += 1  # touch the pages first
    key = os.urandom(32)
    t0 = time.perf_counter()
    primitives.add_mask(acc, key, 1)
    return acc.nbytes / (time.perf_counter() - t0) / 1e9


def dp_sigma(n: int, d: int) -> float:
    """The per-silo sigma (in ring units) SiloSession._mask would use in a realistic DP round."""
    probe = make_config(federation(), n, d)
    z, divisor, clip = 1.0, probe.threshold - probe.n_colluders, 1e4
    scale = recommended_scale(n, clip, 32, z, divisor)
    cfg = make_config(federation(), n, d, scale=scale, clip_l2=clip, dp=DdgNoise(z, divisor))
    assert cfg.dp is not None
    return cfg.dp.noise_multiplier * cfg.clip_l2 * cfg.scale / math.sqrt(cfg.dp.noise_divisor)


def bench_dp_noise(sigma: float, d: int) -> float:
    seed = os.urandom(32)
    t0 = time.perf_counter()
    sample_discrete_gaussian(sigma, d, seed)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--d", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    silo, silo_pre, unmask, unmask_drop = [], [], [], []
    for _ in range(args.runs):
        s, u = bench_round(args.n, args.d, drop=False, precompute=False)
        silo.extend(s)
        unmask.append(u)
        s, _u = bench_round(args.n, args.d, drop=False, precompute=True)
        silo_pre.extend(s)
        _s, u = bench_round(args.n, args.d, drop=True, precompute=False)
        unmask_drop.append(u)
    gbps = [bench_mask(args.d) for _ in range(args.runs)]
    sigma = dp_sigma(args.n, args.d)
    dp_noise = [bench_dp_noise(sigma, args.d) for _ in range(args.runs)]
    figures = {
        "n": str(args.n),
        "d": str(args.d),
        "silo_encode_mask_s": f"{_median(silo):.4f}",
        "silo_encode_mask_precomputed_s": f"{_median(silo_pre):.4f}",
        "coordinator_unmask_s": f"{_median(unmask):.4f}",
        "coordinator_unmask_one_dropout_s": f"{_median(unmask_drop):.4f}",
        "mask_gbps": f"{_median(gbps):.2f}",
        "dp_noise_s": f"{_median(dp_noise):.4f}",
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

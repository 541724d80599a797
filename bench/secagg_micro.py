"""Secure-aggregation micro-benchmark (issue 3, acceptance 4): n = 10, d = 10^7 by default.

Prints one `key: value` line per figure (medians over --runs runs; the silo figures over every
silo of every run):
  silo_encode_mask_s                one silo's submit_update (clip, SR, self + 9 pairwise masks,
                                    vector hash) with no precomputation
  silo_encode_mask_precomputed_s    the same when precompute_masks() ran during training
  coordinator_unmask_s              reconstruct + remove 10 self masks + decode, no dropout
  coordinator_unmask_one_dropout_s  the same with one silo dropped after ShareKeys
  mask_gbps                         one mask expansion into an accumulator, GB of keystream/s
Targets (SECAGG.md §10.5): silo <= 0.25 s, coordinator <= 0.15 s with no dropout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secagg import primitives  # noqa: E402
from secagg.coordinator import Phase  # noqa: E402
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
    replies = []
    for dest, data in pending:
        replies.extend((dest, x) for x in r.sessions[dest].handle(data, now=_now()))
    t0 = time.perf_counter()
    for dest, data in replies:
        rnd.handle(dest, data, now=_now())
    unmask = time.perf_counter() - t0
    assert rnd.phase is Phase.DONE and rnd.result is not None
    return timings, unmask


def _now():  # type: ignore[no-untyped-def]
    from tests.secagg.pki import NOW

    return NOW


def bench_mask(d: int) -> float:
    acc = np.zeros(d + 1, dtype="<u4")
    acc += 1  # touch the pages first
    key = os.urandom(32)
    t0 = time.perf_counter()
    primitives.add_mask(acc, key, 1)
    return acc.nbytes / (time.perf_counter() - t0) / 1e9


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
    print(f"n: {args.n}")
    print(f"d: {args.d}")
    print(f"silo_encode_mask_s: {_median(silo):.4f}")
    print(f"silo_encode_mask_precomputed_s: {_median(silo_pre):.4f}")
    print(f"coordinator_unmask_s: {_median(unmask):.4f}")
    print(f"coordinator_unmask_one_dropout_s: {_median(unmask_drop):.4f}")
    print(f"mask_gbps: {_median(gbps):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

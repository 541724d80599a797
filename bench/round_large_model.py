"""Acceptance 5: one round of a 50-million-parameter model with 3 silos, over real mTLS.

Starts a real coordinator and 3 silo agents as processes on 127.0.0.1 (bench/_federation.py: the
same helpers the tests use), with the no-op task (examples/noop/task.py: a model of `--params`
float32 parameters whose "training" adds a constant), runs `--rounds` rounds of the insecure
plaintext baseline and prints:

    round_s: <seconds from the round's start to its end, from the round log>
    coordinator_peak_mib: <VmHWM of the coordinator process, from /proc/<pid>/status>

The model (200 MB at 50M parameters) travels as ≤1 MiB chunks, so gRPC's message limits
(4 MiB, set explicitly) are never raised. Run: `.venv/bin/python bench/round_large_model.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._federation import PLAINTEXT, FederationFailed, run_federation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="silofed-bench-") as tmp:
        try:
            result = run_federation(
                Path(tmp),
                silos=args.silos,
                params=args.params,
                rounds=args.rounds,
                aggregation=PLAINTEXT,
            )
        except FederationFailed as exc:
            print(f"error: {exc}\n{exc.logs}", file=sys.stderr)
            return 1
    for r in result.rounds:
        finished = len(r.participants.get("finished", ()))
        print(f"round {r.round_id}: {r.status.value}, {finished} silos")
        if r.duration_s is not None:
            print(f"round_s: {r.duration_s:.2f}")
    print(f"params: {args.params}")
    print(f"coordinator_peak_mib: {result.coordinator_peak_mib:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

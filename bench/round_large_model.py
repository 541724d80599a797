"""Issue 14, acceptance 3: a secure round of a 10^8-parameter model with 3 silos, over real mTLS.

Starts a real coordinator and `--silos` silo agents as processes on 127.0.0.1 (bench/_federation.py:
the same helpers the tests use), with the no-op task (examples/noop/task.py: a model of `--params`
float32 parameters whose "training" adds a constant), runs `--rounds` secure rounds (or, with
`--aggregation plaintext`, the insecure plaintext baseline) and prints, one figure per line:

    round <id>: <completed or aborted>, <silos that finished it>
    secure_round_s: <median seconds from a round's start to its end, from the round log>
    coordinator_peak_mib: <VmHWM of the coordinator process, from /proc/<pid>/status>
    model_float32_mib: <the model's size as float32: 4 * params bytes, in MiB>
    peak_over_model: <coordinator_peak_mib / model_float32_mib (the target is <= 3)>
    phase_<name>_s: <median seconds of each phase of the round, in the order they ran>
    coordinator_cpu_s, silos_cpu_s: <CPU seconds per round of the coordinator, of all silos>

(`plaintext_round_s` with `--aggregation plaintext`.) The coordinator's peak includes everything
the process holds (Python, torch and gRPC take about 300 MiB before any model). In the masked
phase it holds the accumulator and the `[secagg] max_concurrent_uploads` vectors being received
(the global model is a mapping of its checkpoint file, not read then): one, by default, for a
vector of 256 MiB or more, which keeps it under 3 models (`--max-concurrent-uploads 2`: 3.6).
Where the peak was reached (a round phase) goes to stderr. The model
(400 MB at 10^8 parameters) travels as <=1 MiB chunks, so gRPC's message limits (4 MiB, set
explicitly) are never raised. Needs a few GB of memory (each silo holds the model a few times).
Run: `.venv/bin/python bench/round_large_model.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._federation import PLAINTEXT, SECURE, FederationFailed, run_federation  # noqa: E402

# Far above the no-op update's norm (1e-3 * (1 + silo_index) * sqrt(D): 30 at D = 10^8, silo 2),
# so no update is clipped.
CLIP_L2 = 1e3
MIB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000, help="model size D")
    parser.add_argument("--silos", type=int, default=3, help="silo processes (at least 3)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (median over them)")
    parser.add_argument(
        "--aggregation", choices=("secure", "plaintext"), default="secure", help="round kind"
    )
    parser.add_argument(
        "--max-concurrent-uploads",
        type=int,
        help="[secagg] max_concurrent_uploads (default: the coordinator's own default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before giving up on the run"
    )
    args = parser.parse_args()
    secure = args.aggregation == "secure"
    if secure and args.silos < 3:
        parser.error("--silos must be at least 3 (secure aggregation's threshold floor)")
    secagg: dict[str, object] | None = None
    if secure:
        secagg = {"clip_l2": CLIP_L2}
        if args.max_concurrent_uploads is not None:
            secagg["max_concurrent_uploads"] = args.max_concurrent_uploads

    with tempfile.TemporaryDirectory(prefix="silofed-bench-") as tmp:
        try:
            result = run_federation(
                Path(tmp),
                silos=args.silos,
                params=args.params,
                rounds=args.rounds,
                aggregation=SECURE if secure else PLAINTEXT,
                secagg=secagg,
                timeout_s=args.timeout,
            )
        except FederationFailed as exc:
            print(f"error: {exc}\n{exc.logs}", file=sys.stderr)
            return 1
    for r in result.rounds:
        finished = len(r.participants.get("finished", ()))
        print(f"round {r.round_id}: {r.status.value}, {finished} silos")
    rss, where = result.peak_rss_at()
    print(f"highest VmRSS sample {rss:.0f} MiB in {where}", file=sys.stderr)
    model_mib = 4 * args.params / MIB
    coordinator_cpu, silos_cpu = result.cpu_per_round_s()
    print(f"params: {args.params}")
    print(f"silos: {args.silos}")
    print(f"{'secure' if secure else 'plaintext'}_round_s: {result.median_round_s:.2f}")
    print(f"coordinator_peak_mib: {result.coordinator_peak_mib:.0f}")
    print(f"model_float32_mib: {model_mib:.0f}")
    print(f"peak_over_model: {result.coordinator_peak_mib / model_mib:.2f}")
    for name, seconds in result.median_phase_s().items():
        print(f"phase_{name}_s: {seconds:.2f}")
    print(f"coordinator_cpu_s: {coordinator_cpu:.2f}")
    print(f"silos_cpu_s: {silos_cpu:.2f}")
    return 0 if len(result.completed) == len(result.rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Round time and coordinator memory: secure aggregation against the insecure plaintext baseline.

For each aggregation (plaintext-insecure first, then secagg) starts a coordinator and `--silos`
silo agents as processes over mTLS on 127.0.0.1, runs `--warmup` + `--rounds` rounds of the no-op
task (examples/noop/task.py: `--params` float32 parameters, "training" adds a constant) and
prints, one figure per line:

    secure_round_s: <median of (ended_at - started_at) from the round log, over the `--rounds`
                     completed rounds after the `--warmup` ones (default 1)>
    plaintext_round_s: <the same for the plaintext-insecure baseline>
    ratio: <secure_round_s / plaintext_round_s>
    coordinator_peak_mib: <VmHWM of the coordinator process in the secure run>
    plaintext_coordinator_peak_mib: <the same in the plaintext run>

`--only secure|plaintext` runs one of the two (and prints no ratio). Also printed for the secure
run (and with `plaintext_` first for the baseline): `phase_<phase>_s` the median seconds of each
phase (the round log's timings), `after_phases_s` the rest of the round (the coordinator's
finish: unmasking, decoding, checkpoint), `coordinator_cpu_s` and `per_silo_cpu_s` the CPU
seconds per measured round of the coordinator and of one silo (mean over the silos). Per-round
times and where the coordinator's memory peaked go to stderr.

`--farm` hosts the silos in `--farm-processes` farm processes (bench/farm: each silo still its
own agent, certificate, mTLS connection, secure-aggregation state and ledger, on threads), so a
2-core machine can run 100 silos; per-silo CPU seconds are then each silo's own threads'
(`farm_shared_cpu_s`: what no silo thread accounts for, per silo). `--graph harary`
(and `--graph-degree K`) sets the coordinator's `[secagg] graph` (`graph_degree`) and opts the
silos in to sparse graphs. `--kill-fraction F` (with `--only secure`) ends that fraction of the
silos mid-round in the first measured round, all at the same protocol point (`--kill-at`,
default after sending their shares), by SIGKILL (their processes, or the one farm hosting only
them) or, with `--kill-how cut`, by their farm closing their streams; the rounds after it run
with the survivors. It prints `kill_round_s`, `kill_round_silos` (silos whose input is in that
round's aggregate) and `killed_silos`.

All processes share this machine's cores: on a small machine the silos' own CPU work (masking,
serialisation, and thread pools of BLAS/OpenMP spinning against each other, one pool per core in
every process) is part of the round time. `--threads 1` gives each process one thread, closer to
silos running on their own machines. Run: `.venv/bin/python bench/round.py --silos 10 --params
1000000`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._federation import (  # noqa: E402
    CUT,
    PLAINTEXT,
    SECURE,
    SIGKILL,
    FederationFailed,
    Kill,
    RunResult,
    run_federation,
)

# Large enough that the no-op update (norm 1e-3 * (1 + silo_index) * sqrt(D)) is never clipped.
CLIP_L2 = 1e3
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Where a killed silo may stop (the agent's `[debug] pause_after_phase` points).
KILL_POINTS = ("offer", "advertise", "share_keys", "masked", "consistency")


def _secagg_table(args: argparse.Namespace) -> dict[str, object]:
    table: dict[str, object] = {"clip_l2": CLIP_L2}
    if args.graph is not None:
        table["graph"] = args.graph
    if args.graph_degree is not None:
        table["graph_degree"] = args.graph_degree
    if args.n_colluders is not None:
        table["n_colluders"] = args.n_colluders
    return table


def _kill(args: argparse.Namespace) -> Kill | None:
    count = round(args.kill_fraction * args.silos)
    return Kill(count, args.kill_at, args.kill_how) if count > 0 else None


def _run(kind: str, workdir: Path, args: argparse.Namespace) -> RunResult:
    result = run_federation(
        workdir / kind,
        silos=args.silos,
        params=args.params,
        rounds=args.rounds,
        warmup=args.warmup,
        aggregation=SECURE if kind == "secure" else PLAINTEXT,
        secagg=_secagg_table(args) if kind == "secure" else None,
        timeout_s=args.timeout,
        farm_processes=args.farm_processes if args.farm else None,
        kill=_kill(args) if kind == "secure" else None,
    )
    warm = " ".join(f"{s:.3f}" for s in result.warmup_s)
    times = " ".join(f"{s:.3f}" for s in result.round_s)
    aborted = len(result.rounds) - len(result.completed)
    phases = " ".join(f"{name} {s:.3f}" for name, s in result.median_phase_s().items())
    rss, where = result.peak_rss_at()
    coordinator_cpu, silos_cpu = result.cpu_per_round_s()
    print(
        f"{kind}: warm-up round seconds [{warm}], measured [{times}], aborted rounds: {aborted}\n"
        f"{kind}: median phase seconds: {phases}\n"
        f"{kind}: CPU seconds per measured round: coordinator {coordinator_cpu:.2f}, "
        f"silo processes together {silos_cpu:.2f}\n"
        f"{kind}: coordinator VmHWM {result.coordinator_peak_mib:.0f} MiB; highest VmRSS sample "
        f"{rss:.0f} MiB in {where}",
        file=sys.stderr,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=3, help="silo processes (default 3)")
    parser.add_argument("--params", type=int, default=1_000_000, help="model size D")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (median over them)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds run first and left out of the median (default 1: the first round of fresh "
        "processes pays one-time costs)",
    )
    parser.add_argument("--only", choices=("secure", "plaintext"), help="run one aggregation")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per run before giving up"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS for every process "
        "(default: the libraries' own defaults, one thread per core in each process)",
    )
    parser.add_argument(
        "--farm", action="store_true", help="host the silos in farm processes (bench/farm)"
    )
    parser.add_argument(
        "--farm-processes", type=int, default=4, help="farm processes with --farm (default 4)"
    )
    parser.add_argument(
        "--graph",
        choices=("complete", "harary"),
        help="the coordinator's [secagg] graph (default: its own default)",
    )
    parser.add_argument("--graph-degree", type=int, help="the coordinator's [secagg] graph_degree")
    parser.add_argument(
        "--n-colluders",
        type=int,
        help="the collusion bound: the coordinator's [secagg] n_colluders and every silo's "
        "n_colluders_min (default: a third of the roster, which sets the Harary degree)",
    )
    parser.add_argument(
        "--kill-fraction",
        type=float,
        default=0.0,
        help="fraction of the silos ended mid-round in the first measured round (--only secure)",
    )
    parser.add_argument(
        "--kill-at",
        choices=KILL_POINTS,
        default="share_keys",
        help="the protocol point after which they end (default share_keys: shares sent)",
    )
    parser.add_argument(
        "--kill-how",
        choices=(SIGKILL, CUT),
        default=SIGKILL,
        help="sigkill their processes (default; with --farm, one farm hosting only them) or cut "
        "their streams (--farm only)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the work directory (configs, logs, round logs) and print its path",
    )
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["plaintext", "secure"]
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        for var in THREAD_VARS:  # inherited by the coordinator and every silo
            os.environ[var] = str(args.threads)
    if "secure" in kinds and args.silos < 3:
        parser.error("--silos must be at least 3 (secure aggregation's threshold floor)")
    if args.silos < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--silos and --rounds must be at least 1, --warmup at least 0")
    if args.farm_processes < 1:
        parser.error("--farm-processes must be at least 1")
    if not 0 <= args.kill_fraction < 1:
        parser.error("--kill-fraction must be in [0, 1)")
    if args.kill_fraction and args.only != "secure":
        parser.error("--kill-fraction needs --only secure")
    if args.kill_how == CUT and args.kill_fraction and not args.farm:
        parser.error("--kill-how cut needs --farm")
    workdir = Path(tempfile.mkdtemp(prefix="silofed-bench-round-"))
    keep = args.keep_logs
    results: dict[str, RunResult] = {}
    try:
        for kind in kinds:
            results[kind] = _run(kind, workdir, args)
    except FederationFailed as exc:
        keep = True
        print(f"error: {exc}\n{exc.logs}", file=sys.stderr)
    finally:
        if keep:
            print(f"work directory (logs, round logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(results) != len(kinds):
        return 1

    print(f"silos: {args.silos}")
    print(f"params: {args.params}")
    print(f"rounds: {args.rounds}")
    print(f"warmup_rounds: {args.warmup}")
    if args.threads is not None:
        print(f"threads_per_process: {args.threads}")
    if args.farm:
        print(f"farm_processes: {args.farm_processes}")
    if args.graph is not None:
        print(f"graph: {args.graph}")
    if args.graph_degree is not None:
        print(f"graph_degree: {args.graph_degree}")
    if args.n_colluders is not None:
        print(f"n_colluders: {args.n_colluders}")
    secure, plaintext = results.get("secure"), results.get("plaintext")
    if secure is not None:
        print(f"secure_round_s: {secure.median_round_s:.3f}")
    if plaintext is not None:
        print(f"plaintext_round_s: {plaintext.median_round_s:.3f}")
    if secure is not None and plaintext is not None:
        print(f"ratio: {secure.median_round_s / plaintext.median_round_s:.2f}")
    if secure is not None:
        print(f"coordinator_peak_mib: {secure.coordinator_peak_mib:.0f}")
    if plaintext is not None:
        print(f"plaintext_coordinator_peak_mib: {plaintext.coordinator_peak_mib:.0f}")
    for kind, result in results.items():
        _print_details(kind, result, farm=args.farm)
    return 0


def _print_details(kind: str, result: RunResult, *, farm: bool) -> None:
    prefix = "" if kind == "secure" else f"{kind}_"
    phases = result.median_phase_s()
    for name, seconds in phases.items():
        print(f"{prefix}phase_{name}_s: {seconds:.3f}")
    rest = [
        r.duration_s - sum(p.duration_s for p in r.phases)
        for r in result.measured
        if r.duration_s is not None
    ]
    if rest:
        print(f"{prefix}after_phases_s: {statistics.median(rest):.3f}")
    print(f"{prefix}coordinator_cpu_s: {result.cpu_per_round_s()[0]:.3f}")
    print(f"{prefix}per_silo_cpu_s: {result.per_silo_cpu_s():.3f}")
    if farm:
        print(f"{prefix}farm_shared_cpu_s: {result.farm_shared_cpu_s():.3f}")
    killed = result.kill_round_detail()
    if result.killed:
        print(f"killed_silos: {len(result.killed)}")
        completed = killed is not None and killed.status.value == "completed"
        print(f"kill_round_completed: {'yes' if completed else 'no'}")
        if killed is not None and killed.duration_s is not None:
            print(f"kill_round_s: {killed.duration_s:.3f}")
            print(f"kill_round_silos: {len(killed.participants.get('finished', ()))}")


if __name__ == "__main__":
    raise SystemExit(main())

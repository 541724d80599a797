"""Rounds to a target accuracy: FedAvg, FedProx and FedAdam on the digits example, non-IID.

A federation of `--silos` silos (default 10) over the digits example split by Dirichlet label
skew (`[task.options] split = "dirichlet"`, `--alpha`, default 0.1: most silos hold a few
digits, sizes differ widely), simulated in this process: each round every silo trains the
global model with the digits task's own `train` (examples.digits.task, the code a silo runs,
shuffling with its own seed every round as the agent does), the coordinator's plaintext FedAvg
(coordinator.rounds.fedavg.PlaintextFedAvg, weighting `--weighting`) sums the silos' updates,
and the coordinator's server optimizer (coordinator.rounds.server_optimizer, the code that runs
after every round) turns that into the next global model, which is scored on the digits
example's held-out test set. No network, no processes: the figures are about optimisation.
Secure aggregation would change the aggregate only by its quantisation bound (fixed-point
encoding of each clipped update; far below one step of training here), so rounds-to-target
over secure aggregation are the same to that precision.

Methods, each from the same initial model and the same per-silo seeds:
  fedavg   server optimizer fedavg, [train] without proximal_mu
  fedprox  server optimizer fedavg, [train] proximal_mu = --mu (silo side, Li et al. 2020)
  fedadam  server optimizer fedadam (--server-lr, --beta1, --beta2, --tau; Reddi et al. 2021)

Prints one `key: value` line per figure (per-round accuracies go to stderr):
  target_accuracy   --target, the held-out accuracy a method must reach
  round_budget      --rounds
  <method>_rounds   the first round whose model reaches the target; --rounds + 1 if none does
  <method>_accuracy held-out accuracy of that round's model (of the last round's if none does)
  <method>_best_accuracy  the best held-out accuracy over the rounds run
  <method>_s        wall seconds of the method's simulation
A method stops at the round it reaches the target (`--full` runs every method to the budget).

Defaults: the demo's silo training (one local epoch of SGD, lr 0.05, momentum 0.9, batches of
16) without lr decay, 60 rounds, target 0.97 (FedAvg reaches it in about 20 rounds, and every
method tops out near 0.99, so 0.97 measures speed, not the ceiling); FedAdam with eta = 0.03
(with [server_optimizer]'s default 0.01 it is no faster than FedAvg here) and the other
hyperparameters at their config defaults. One seed: a figure can move by a few rounds with
--seed. Run: `.venv/bin/python -m bench.convergence` (under half a minute on two cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.config import ServerOptimizerSettings  # noqa: E402
from coordinator.rounds.fedavg import PlaintextFedAvg  # noqa: E402
from coordinator.rounds.server_optimizer import build_server_optimizer  # noqa: E402
from examples.common import SiloData, evaluate_split  # noqa: E402
from examples.digits.data import heldout_test  # noqa: E402
from examples.digits.task import TASK  # noqa: E402

METHODS = ("fedavg", "fedprox", "fedadam")
State = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One method's run: the round it reached the target (None: never) and its accuracies."""

    reached: int | None
    accuracies: tuple[float, ...]
    seconds: float


def train_params(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The coordinator's [train] table for `method` (the same for every silo)."""
    params: dict[str, Any] = {
        "epochs": args.epochs,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "batch_size": args.batch_size,
        "momentum": args.momentum,
    }
    if method == "fedprox":
        params["proximal_mu"] = args.mu
    return params


def server_settings(args: argparse.Namespace, method: str) -> ServerOptimizerSettings:
    if method == "fedadam":
        return ServerOptimizerSettings.of(
            "fedadam", lr=args.server_lr, beta1=args.beta1, beta2=args.beta2, tau=args.tau
        )
    return ServerOptimizerSettings.of("fedavg")


def heldout_accuracy(state: Mapping[str, torch.Tensor]) -> float:
    model = TASK.build_model()
    model.load_state_dict(dict(state))
    return evaluate_split(model, heldout_test())["accuracy"]


def silo_seed(base: int, round_id: int, index: int) -> int:
    """A silo's training seed for one round: fresh per round and silo, repeatable per --seed."""
    return base * 1_000_003 + 7919 * round_id + index


def run(method: str, datas: Sequence[SiloData], args: argparse.Namespace) -> Outcome:
    """Simulate `method` for up to `args.rounds` rounds; stop at the target unless --full."""
    started = time.perf_counter()
    params = train_params(args, method)
    optimizer = build_server_optimizer(server_settings(args, method))
    global_state: State = TASK.build_model().state_dict()
    opt_state = optimizer.initial_state(global_state)
    aggregate = PlaintextFedAvg()
    reached: int | None = None
    accuracies: list[float] = []
    for round_id in range(1, args.rounds + 1):
        aggregate.begin(global_state)
        for index, data in enumerate(datas):
            model = TASK.build_model()
            model.load_state_dict(global_state)
            seed = silo_seed(args.seed, round_id, index)
            result = TASK.train(model, data, {**params, "round": round_id, "seed": seed})
            update = {k: v - global_state[k] for k, v in model.state_dict().items()}
            weight = result.num_examples if args.weighting == "examples" else 1
            aggregate.contribute(f"silo-{index}", weight, update)
        fedavg_state = aggregate.finish().new_state
        global_state, opt_state = optimizer.step(global_state, fedavg_state, opt_state)
        accuracy = heldout_accuracy(global_state)
        accuracies.append(accuracy)
        print(f"{method} round {round_id}: held-out accuracy {accuracy:.4f}", file=sys.stderr)
        if reached is None and accuracy >= args.target:
            reached = round_id
            if not args.full:
                break
    return Outcome(reached, tuple(accuracies), time.perf_counter() - started)


def report(method: str, outcome: Outcome, budget: int) -> list[str]:
    rounds = outcome.reached if outcome.reached is not None else budget + 1
    final = outcome.accuracies[-1] if outcome.reached is None else outcome.accuracies[rounds - 1]
    return [
        f"{method}_rounds: {rounds}",
        f"{method}_accuracy: {final:.4f}",
        f"{method}_best_accuracy: {max(outcome.accuracies):.4f}",
        f"{method}_s: {outcome.seconds:.1f}",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--silos", type=int, default=10, help="number of silos (default 10)")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha (default 0.1)")
    parser.add_argument("--rounds", type=int, default=60, help="round budget (default 60)")
    parser.add_argument(
        "--target", type=float, default=0.97, help="held-out accuracy to reach (default 0.97)"
    )
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx mu (default 0.01)")
    parser.add_argument(
        "--server-lr", type=float, default=0.03, help="FedAdam eta (0.03; the config's is 0.01)"
    )
    parser.add_argument("--beta1", type=float, default=0.9, help="FedAdam beta1 (0.9)")
    parser.add_argument("--beta2", type=float, default=0.99, help="FedAdam beta2 (0.99)")
    parser.add_argument("--tau", type=float, default=1e-3, help="FedAdam tau (1e-3)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (1)")
    parser.add_argument("--lr", type=float, default=0.05, help="silo SGD step size (0.05)")
    parser.add_argument("--lr-decay", type=float, default=1.0, help="per-round lr decay (1.0)")
    parser.add_argument("--batch-size", type=int, default=16, help="silo batch size (16)")
    parser.add_argument("--momentum", type=float, default=0.9, help="silo SGD momentum (0.9)")
    parser.add_argument(
        "--weighting",
        choices=("examples", "uniform"),
        default="examples",
        help="FedAvg weight of a silo: its training examples (default) or 1",
    )
    parser.add_argument("--seed", type=int, default=0, help="base of the silos' seeds (0)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    parser.add_argument("--full", action="store_true", help="run every method to the budget")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods takes names from {', '.join(METHODS)}; got {args.methods!r}")
    if args.rounds < 1 or args.silos < 1:
        parser.error("--rounds and --silos must be >= 1")
    if not 0 < args.target <= 1:
        parser.error(f"--target is an accuracy in (0, 1], got {args.target}")
    args.methods = methods
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"num_silos": args.silos, "split": "dirichlet", "alpha": args.alpha}
    try:
        datas = [TASK.load_data({**options, "silo_index": i}) for i in range(args.silos)]
    except ValueError as exc:  # DataOptionsError: the split cannot be made
        print(f"convergence: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(str(len(d.train)) for d in datas)
    print(f"silos' training examples: {sizes}", file=sys.stderr)
    lines = [f"target_accuracy: {args.target}", f"round_budget: {args.rounds}"]
    for method in args.methods:
        lines += report(method, run(method, datas, args), args.rounds)
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

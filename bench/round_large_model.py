"""Acceptance 5: one round of a 50-million-parameter model with 3 silos, over real mTLS.

Starts a real coordinator and 3 silo agents as processes on 127.0.0.1 (the same helpers the
tests use), with a task whose model is `--params` float32 parameters and whose "training" is a
cheap deterministic perturbation, runs `--rounds` rounds and prints:

    round_s: <seconds from the round's start to its end, from the round log>
    coordinator_peak_mib: <VmHWM of the coordinator process, from /proc/<pid>/status>

The model (200 MB at 50M parameters) travels as ≤1 MiB chunks, so gRPC's message limits
(4 MiB, set explicitly) are never raised. Run: `.venv/bin/python bench/round_large_model.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARAMS_ENV = "SILOFED_BENCH_PARAMS"


class LargeTask:
    """A model of N float32 parameters (one flat tensor plus a small one); training adds a
    seeded constant so the update is cheap and exactly reproducible."""

    name = "large"

    def __init__(self) -> None:
        self.params = int(os.environ.get(PARAMS_ENV, "50000000"))

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.register_parameter("big", torch.nn.Parameter(torch.zeros(self.params - 8)))
        model.register_parameter("small", torch.nn.Parameter(torch.ones(8)))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silo_agent.task import TrainResult

        step = 0.001 * (1 + int(data["silo_index"])) * (1 + int(params.get("round", 0)))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        return TrainResult(100 + int(data["silo_index"]), {"loss": step})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        del model
        return {"score": float(data["silo_index"])}


TASK = LargeTask()
SPEC = "bench.round_large_model:TASK"


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ[PARAMS_ENV] = str(args.params)
    os.environ["PYTHONPATH"] = str(REPO)  # so `bench.round_large_model` imports in children

    from coordinator.roundlog import RoundLog
    from tests.federation_helpers import (
        processes,
        provision,
        wait_for_port,
        write_coordinator_config,
        write_silo_config,
    )

    names = [f"s{i}" for i in range(args.silos)]
    with tempfile.TemporaryDirectory(prefix="silofed-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fed = provision(tmp / "fed", "bench", names)
        state = tmp / "coord"
        cfg = write_coordinator_config(
            tmp / "c.toml",
            fed,
            state_dir=state,
            task_spec=SPEC,
            rounds=args.rounds,
            min_silos=args.silos,
            offer_s=300.0,
            train_s=600.0,
            start_timeout_s=300.0,
        )
        peak = 0.0
        with processes(tmp / "logs") as procs:
            coordinator = procs.coordinator(cfg)
            port = wait_for_port(state, coordinator, timeout_s=300)
            for i, name in enumerate(names):
                toml = write_silo_config(
                    tmp / f"{name}.toml",
                    fed.silos[name],
                    port=port,
                    task_spec=SPEC,
                    options={"silo_index": i},
                )
                procs.silo(name, toml)
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set() and coordinator.popen.poll() is None:
                    try:
                        peak = max(peak, _peak_mib(coordinator.pid))
                    except OSError:
                        return
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            code = coordinator.wait(1800)
            stop.set()
            sampler.join(2)
            if code != 0:
                print(procs.logs(), file=sys.stderr)
                return 1
        log = RoundLog.open_readonly(state / "rounds.sqlite")
        try:
            for summary in log.rounds():
                print(f"round {summary.round_id}: {summary.status.value}, {summary.finished} silos")
                print(f"round_s: {summary.duration_s:.2f}")
        finally:
            log.close()
        print(f"params: {args.params}")
        print(f"coordinator_peak_mib: {peak:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

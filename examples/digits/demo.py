"""`make demo`: a whole federation on this machine — coordinator + 3 silos over mTLS.

Rule: the demo drives the real console entry points as separate processes, exactly as operators
would (`python -m coordinator serve`, `python -m silo_agent run`), with configs it writes from
scratch under `demo-state/` (wiped each run). Every process it starts is stopped by PID in
`finally`; every wait is bounded. Its LAST line is
`federated accuracy: A (centralized: C, best single silo: S)`, all on the held-out test set: A is
the accuracy of the federation's final model (the checkpoint of the last completed round, the
model the final evaluation scored), C and S come from `baselines.py` under the same budget.

The task is the digits CNN (examples.digits) on a pathological split: each silo holds 4 of the
10 digits, so alone it can recognise at most 4 in 10 test images, while together the silos
cover every digit and reach what pooled training reaches.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FEDERATION_ID = "demo"
# The names the rest of the README's walkthrough uses (demo-state/hospital-a.toml, ...).
SILOS = ("hospital-a", "hospital-b", "hospital-c")
CLASSES_PER_SILO = 4
ROUNDS = 40
AGGREGATION = "secagg"  # the coordinator only ever decodes the sum of the silos' updates
# Updates are clipped to this L2 norm before masking: far above what one local epoch moves this
# model, so clipping never bites; weights are example counts up to weight_max.
SECAGG: Mapping[str, Any] = {"clip_l2": 100.0, "weight_max": 1000}
TASK_SPEC = "examples.digits.task:TASK"
# One local epoch per round keeps the silos from drifting apart on their 4 digits; the step size
# decays by round (0.05 -> 0.007 by round 40) so the last rounds settle instead of oscillating.
TRAIN: Mapping[str, Any] = {
    "epochs": 1,
    "lr": 0.05,
    "lr_decay": 0.95,
    "batch_size": 16,
    "momentum": 0.9,
}
RUN_TIMEOUT_S = 240.0
PROGRESS = re.compile(r"round \d+ \(\d+/\d+|round \d+ (completed|aborted)|dropped|finished|ERROR")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text for tables of scalars (all our configs need)."""
    out: list[str] = []
    for name, values in tables.items():
        out.append(f"[{name}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        out.append("")
    return "\n".join(out)


def coordinator_config(fed: Any, state: Path) -> dict[str, Mapping[str, Any]]:
    return {
        "federation": {"id": FEDERATION_ID, "state_dir": state / "coordinator-state"},
        "server": {"listen": "127.0.0.1:0"},
        "tls": {
            "ca_cert": fed.ca_cert,
            "cert": fed.coordinator_cert,
            "key": fed.coordinator_key,
            "roster": fed.roster,
            "revoked": fed.revoked,
        },
        "task": {"spec": TASK_SPEC},
        "rounds": {
            "count": ROUNDS,
            "min_silos": 3,
            "start_silos": len(SILOS),
            "aggregation": AGGREGATION,
            "start_timeout_s": 60,
        },
        "deadlines": {"offer_s": 30, "train_s": 60},
        "train": dict(TRAIN),
        "secagg": dict(SECAGG),
    }


def silo_config(name: str, index: int, paths: Any, port: int) -> dict[str, Mapping[str, Any]]:
    return {
        "silo": {"name": name, "state_dir": paths.dir / "state"},
        "coordinator": {"address": f"127.0.0.1:{port}", "server_name": "localhost"},
        "tls": {
            "ca_cert": paths.ca_cert,
            "cert": paths.cert,
            "key": paths.key,
            "roster": paths.roster,
        },
        "task": {"spec": TASK_SPEC},
        "task.options": {
            "silo_index": index,
            "num_silos": len(SILOS),
            "classes_per_silo": CLASSES_PER_SILO,
        },
        "reconnect": {"initial_s": 0.5, "max_s": 5},
    }


def _start(args: Sequence[str], log_path: Path, root: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    with log_path.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, *args], cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_port(port_file: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError("the coordinator exited before listening; see its log")
        time.sleep(0.05)
    raise RuntimeError(f"the coordinator did not listen within {timeout_s:.0f} s")


def _follow(log_path: Path, offset: int) -> int:
    """Print new progress lines of the coordinator log; return the new offset."""
    with log_path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        if "silofed.coordinator" in line and PROGRESS.search(line):
            print("  coordinator:", line.split(": ", 1)[-1], flush=True)
    return offset + len(complete)


def run_federation(root: Path, state: Path) -> Path:
    """Provision, run coordinator + silos to completion; return the coordinator state dir."""
    from coordinator.pki.authority import provision_dev

    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    fed = provision_dev(
        state / "federation", FEDERATION_ID, list(SILOS), now=dt.datetime.now(dt.UTC)
    )
    print(
        f"provisioned federation {FEDERATION_ID!r} with {len(SILOS)} silos in {state}", flush=True
    )
    coord_toml = state / "coordinator.toml"
    coord_toml.write_text(to_toml(coordinator_config(fed, state)))
    coord_state = state / "coordinator-state"
    logs = state / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coordinator = _start(
            ["-m", "coordinator", "serve", "--config", str(coord_toml)],
            logs / "coordinator.log",
            root,
        )
        procs.append(coordinator)
        port = _wait_for_port(coord_state / "coordinator.port", coordinator, 60.0)
        print(f"coordinator listening on 127.0.0.1:{port} (pid {coordinator.pid})", flush=True)
        for index, name in enumerate(SILOS):
            toml = state / f"{name}.toml"
            toml.write_text(to_toml(silo_config(name, index, fed.silos[name], port)))
            proc = _start(
                ["-m", "silo_agent", "run", "--config", str(toml)], logs / f"{name}.log", root
            )
            procs.append(proc)
            print(f"silo {name} started (pid {proc.pid})", flush=True)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        offset = 0
        while coordinator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            offset = _follow(logs / "coordinator.log", offset)
        _follow(logs / "coordinator.log", offset)
        if coordinator.poll() is None:
            raise RuntimeError(f"the federation did not finish within {RUN_TIMEOUT_S:.0f} s")
        if coordinator.returncode != 0:
            raise RuntimeError(f"the coordinator exited with {coordinator.returncode}; see {logs}")
        for proc in procs[1:]:  # silos exit by themselves once told the federation finished
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    return coord_state


def what_the_coordinator_saw(log: Any) -> str:
    """One plain sentence, from the round log, of what the coordinator learned per round."""
    rounds = [log.round_detail(r.round_id) for r in log.rounds() if r.status.value == "completed"]
    if not rounds:
        return "the coordinator completed no round"
    last = rounds[-1]
    k = len(last.participants.get("U3", ()))
    masked = max((s.bytes_in for s in last.silos), default=0)
    return (
        f"what the coordinator saw ({last.aggregation}): in each of {len(rounds)} rounds only the "
        f"SUM of k = {k} silos' updates, each counted equally (uniform weighting: the one "
        "weight it decodes per silo is the same constant for all), who took part in each "
        "phase, and each silo's evaluation of the model it received. It did NOT see any "
        "silo's update or data: each update reached it masked (about "
        f"{masked // 1024} KiB per silo per round, indistinguishable from random without the "
        "other silos' masks)."
    )


def final_evaluation_line(log: Any, round_id: int, model_sha256: str) -> str:
    """What the round log's final evaluation says of the final model, or that it has none."""
    final = log.final_evaluation(round_id)
    if final is None:
        return f"final evaluation: none recorded for round {round_id}'s model"
    if final.model_sha256 != model_sha256:
        raise RuntimeError(
            f"the final evaluation scored model {final.model_sha256[:12]}, not round "
            f"{round_id}'s checkpoint {model_sha256[:12]}"
        )
    each = ", ".join(
        f"{str(silo).rsplit('/', 1)[-1]} {metrics.get('eval_accuracy', float('nan')):.3f}"
        for silo, metrics in sorted(final.silo_metrics.items())
    )
    mean = final.global_metrics.get("eval_accuracy", float("nan"))
    return (
        f"final evaluation of round {round_id}'s model on the silos' own validation splits "
        f"(round log): {each or 'no silo answered'}; mean {mean:.3f}"
    )


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    state = root / "demo-state"
    started = time.monotonic()
    try:
        coord_state = run_federation(root, state)
    except RuntimeError as exc:
        print(f"demo failed: {exc} (logs in {state / 'logs'})", file=sys.stderr)
        return 1
    from coordinator.storage.checkpoints import CheckpointStore
    from coordinator.storage.roundlog import RoundLog
    from examples.digits import baselines

    log = RoundLog.open_readonly(coord_state / "rounds.sqlite")
    try:
        latest = log.latest_checkpoint()
        completed = [r.round_id for r in log.rounds() if r.status.value == "completed"]
        saw = what_the_coordinator_saw(log)
        final = (
            final_evaluation_line(log, latest.round_id, latest.sha256)
            if latest is not None and completed
            else ""
        )
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        log.close()
    # The final model is the last completed round's checkpoint; anything else means the
    # federation stopped short and A would score an older model.
    if latest is None or len(completed) < ROUNDS or latest.round_id != completed[-1]:
        print(f"demo failed: only {len(completed)} of {ROUNDS} rounds completed", file=sys.stderr)
        return 1
    state_dict = CheckpointStore(coord_state / "checkpoints").load(latest.path, latest.sha256)
    federated = baselines.heldout_accuracy(state_dict)
    print(saw, flush=True)
    print(final, flush=True)
    print(
        f"{len(completed)} rounds completed in {time.monotonic() - started:.0f} s; final model "
        f"(round {latest.round_id}) on the held-out test set: {federated:.3f}; computing "
        "baselines (same budget) ...",
        flush=True,
    )
    reference = baselines.compute(ROUNDS, TRAIN, len(SILOS), CLASSES_PER_SILO)
    for line in baselines.silos_lines(reference, SILOS):
        print(line, flush=True)
    print(baselines.summary_line(federated, reference), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

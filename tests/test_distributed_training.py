"""Training on several workers inside a silo (`[train] workers`, torchrun, gloo on CPU).

Unit: silofed.distributed is the identity in one process; the silo's [train] table is strict;
a task must declare `distributed = True` to get workers; what the workers' files and failures
look like. End to end (real torchrun, real worker processes):
1. two workers give the update one process gives with the same global batches, within a
   tolerance derived below, and a wrong sharding, un-averaged or summed gradients exceed it;
2. a worker that raises, is SIGKILLed or outlives the limit fails the training (WorkerFailed),
   a cancelled round stops every worker, and in a real federation (coordinator and silo
   processes, mTLS on loopback) the silo whose worker was killed drops out of that round only
   and takes part in the next.

The task variants below are loaded by the worker processes by spec
(``tests.test_distributed_training:<NAME>``), so they live at module level.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import silofed.distributed as sd
from examples.linear.task import TASK, LinearData, LinearTask
from silo_agent.config import SiloConfig, SiloTraining, load_silo_config
from silo_agent.runtime.distributed import (
    DistributedTraining,
    WorkerFailed,
    describe_failure,
    private_write,
)
from silo_agent.runtime.distributed_worker import combined
from silo_agent.runtime.local_model import TRAINING_DIR, LocalTraining
from silofed.task import TaskLoadError, TrainingCancelled, load_task
from silofed.task import TrainResult as Result
from tests.federation_helpers import (
    REPO,
    FederationRun,
    NewFederation,
    Proc,
    child_env,
    write_silo_config,
)
from tests.test_config import SILO, _files

SPEC = "examples.linear.task:TASK"
HERE = "tests.test_distributed_training"
# 93 training rows: batches of 16, 16, 16, 16, 16 and 13, which two workers split 7 + 6.
OPTIONS = {"silo_index": 0, "num_examples": 124}
PARAMS: dict[str, Any] = {
    "epochs": 3,
    "lr": 0.05,
    "batch_size": 16,
    "momentum": 0.9,
    "seed": 2024,
    "round": 1,
}
STOP_WAIT_S = 20.0  # how long a stopped worker may take to be gone (bounded poll, not timed)


# ---- task variants the workers load --------------------------------------------------------


def _summed(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Gradients summed over the workers instead of averaged (N times too large)."""
    return sd.batch_mean(losses, batch_size) * sd.world_size()


def _per_worker_mean(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Each worker's own mean: the uneven last batch's examples get unequal weights."""
    del batch_size
    return losses.mean()


def _rank_ignored(batch: Any) -> Any:
    """Every worker takes the first worker's part: half of each batch is never seen."""
    return batch[0 :: sd.world_size()]


def _no_ddp(model: nn.Module) -> nn.Module:
    """No DDP: each worker steps on its own part's gradient, never averaged."""
    return model


class NoAllreduce(LinearTask):
    wrap = staticmethod(_no_ddp)


class Summed(LinearTask):
    batch_mean = staticmethod(_summed)


class RankIgnored(LinearTask):
    shard = staticmethod(_rank_ignored)


class PerWorkerMean(LinearTask):
    batch_mean = staticmethod(_per_worker_mean)


NO_ALLREDUCE, SUMMED, RANK_IGNORED = NoAllreduce(), Summed(), RankIgnored()
PER_WORKER_MEAN = PerWorkerMean()


@dataclass(frozen=True)
class FaultyData:
    linear: LinearData
    options: Mapping[str, Any]


class Faulty(LinearTask):
    """The linear task, with a fault of the silo's choosing in one round on one rank.

    Options besides the linear task's: ``fail_round`` (default 1), ``fail_rank`` (1),
    ``fail_how``: "raise", "kill" (SIGKILL itself) or "hang" (report progress, write its pid
    to ``<pid_dir>/<rank>``, sleep, bounded to 120 s); "hang" applies to every rank."""

    name = "linear-faulty"

    def load_data(self, options: Mapping[str, Any]) -> Any:
        base = {k: options[k] for k in ("silo_index", "num_examples") if k in options}
        return FaultyData(super().load_data(base), dict(options))

    def train(self, model: nn.Module, data: Any, params: Mapping[str, Any]) -> Result:
        how, opts = data.options.get("fail_how"), data.options
        faulty_round = int(params.get("round", 0)) == int(opts.get("fail_round", 1))
        if how == "hang" and faulty_round:
            pid_dir = Path(opts["pid_dir"])
            (pid_dir / str(sd.rank())).write_text(str(os.getpid()))
            progress = params.get("progress")
            for step in range(2400):  # 120 s at most; the test stops it long before
                if callable(progress):
                    progress(step + 1, 2400)
                time.sleep(0.05)
        if faulty_round and sd.rank() == int(opts.get("fail_rank", 1)):
            if how == "raise":
                raise RuntimeError(f"injected failure on rank {sd.rank()}")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return super().train(model, data.linear, params)

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]:
        return super().evaluate(model, data.linear)


FAULTY = Faulty()
FAULTY_SPEC = f"{HERE}:FAULTY"


# ---- helpers ---------------------------------------------------------------------------------


def on_workers(
    tmp_path: Path, spec: str, options: Mapping[str, Any], *, timeout_s: float = 120.0
) -> DistributedTraining:
    return DistributedTraining(spec, dict(options), 2, tmp_path / TRAINING_DIR, timeout_s)


def max_difference(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def tolerance(task: LinearTask, data: LinearData, params: Mapping[str, Any]) -> float:
    """How far two workers' weights may be from one process's, from float32 rounding alone.

    Each step's gradient sums B per-example gradients in float32; one process and two workers
    add the same terms in another order (two sums of B/2, then gloo's sum of the two; the
    scalings by 2 and 1/2 are exact), so each component differs by at most B·u·G, with u = 2^-24
    and G the mean absolute per-example gradient component. Through the momentum buffer that
    moves the weights by at most lr·B·u·G/(1 − β) per step, and SGD on this least-squares
    loss does not amplify an earlier difference (the Hessian 2·XᵀX/n has λmax ≈ 3.4 for 93
    standard-normal rows, so lr·λmax ≈ 0.17, well inside heavy-ball momentum's stable range),
    so K steps stay within K·lr·B·u·G/(1 − β). G is taken at the initial model, where the
    residuals are largest, times 4 for momentum's overshoot.
    """
    model = task.build_model()
    residual = (model(data.x).squeeze(1) - data.y).detach()
    per_example = (
        2
        * residual.abs().unsqueeze(1)
        * torch.cat([data.x.abs(), torch.ones(len(data.y), 1)], dim=1)
    )
    g = 4 * float(per_example.mean())
    b, lr, beta = int(params["batch_size"]), float(params["lr"]), float(params["momentum"])
    steps = int(params["epochs"]) * -(-len(data.y) // b)
    return steps * lr * b * 2.0**-24 * g / (1 - beta)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) is gone for our purpose.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ", 1)[1][0] != "Z"


def gone_within(pids: list[int], bound_s: float) -> list[int]:
    """The pids still alive after waiting up to `bound_s` for all of them to end."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def silo_config(tmp_path: Path, extra: str) -> SiloConfig:
    _files(tmp_path)
    path = tmp_path / "silo.toml"
    text = SILO.replace('spec = "examples.hospital.task:TASK"', f'spec = "{SPEC}"')
    path.write_text(text + extra)
    return load_silo_config(path)


# ---- unit: one process -----------------------------------------------------------------------


def test_the_helpers_are_the_identity_in_one_process() -> None:
    model = nn.Linear(3, 1)
    batch = torch.arange(10)
    losses = torch.rand(7)
    assert not sd.active() and sd.rank() == 0 and sd.world_size() == 1
    assert sd.wrap(model) is model
    assert sd.shard(batch) is batch
    assert torch.equal(sd.batch_mean(losses, 7), losses.sum() / 7)
    with pytest.raises(ValueError, match="batch_size"):
        sd.batch_mean(losses, 0)


def test_the_example_declares_distributed_training_and_load_task_checks_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_task(SPEC).distributed is True  # type: ignore[attr-defined]
    monkeypatch.setattr(LinearTask, "distributed", "yes")
    with pytest.raises(TaskLoadError, match="`distributed` must be True or False"):
        load_task(SPEC)


def test_the_silo_train_table_is_strict(tmp_path: Path) -> None:
    assert silo_config(tmp_path, "").train == SiloTraining(workers=1, timeout_s=3600.0)
    cfg = silo_config(tmp_path, "[train]\nworkers = 4\ntimeout_s = 90\n")
    assert cfg.train == SiloTraining(workers=4, timeout_s=90.0)
    for bad, said in (
        ("workers = 0", "[train] workers must be > 0"),
        ("workers = 1.5", "[train] workers must be int"),
        ("timeout_s = -1", "[train] timeout_s must be > 0"),
        ("worker = 2", "did you mean 'workers'?"),
        ("epochs = 2", "[train] epochs is not a known key of [train]"),
    ):
        with pytest.raises(ValueError) as info:
            silo_config(tmp_path, f"[train]\n{bad}\n")
        assert said in str(info.value), (bad, str(info.value))


def test_workers_are_refused_at_start_for_a_task_without_the_flag(tmp_path: Path) -> None:
    cfg = silo_config(tmp_path, "[train]\nworkers = 2\n")
    hospital = load_task("examples.hospital.task:TASK")
    with pytest.raises(TaskLoadError, match=r"does not declare `distributed = True`.*workers = 2"):
        LocalTraining.of(cfg, hospital, None)
    # One worker: any task trains in the agent's process, as before.
    one = silo_config(tmp_path, "")
    assert LocalTraining.of(one, hospital, None).workers is None


def test_workers_need_options_that_travel_as_json(tmp_path: Path) -> None:
    cfg = silo_config(tmp_path, "[train]\nworkers = 2\n")
    dated = SiloConfig(**{**_fields(cfg), "task_options": {"since": dt.date(2024, 1, 1)}})
    with pytest.raises(TaskLoadError, match="cannot be handed to the training workers"):
        LocalTraining.of(dated, TASK, None)


def _fields(cfg: SiloConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in SiloConfig.__dataclass_fields__}


def test_what_an_earlier_agent_left_is_cleared_at_start(tmp_path: Path) -> None:
    cfg = silo_config(tmp_path, "[train]\nworkers = 2\n")
    left = cfg.state_dir / TRAINING_DIR / "train-old"
    left.mkdir(parents=True)
    (left / "trained.safetensors").write_bytes(b"an update")
    training = LocalTraining.of(cfg, TASK, None)
    assert training.workers is not None and training.workers.workers == 2
    assert not (cfg.state_dir / TRAINING_DIR).exists()


def test_in_one_process_local_training_is_the_task_train() -> None:
    data = TASK.load_data(OPTIONS)
    direct, through = TASK.build_model(), TASK.build_model()
    expected = TASK.train(direct, data, PARAMS)
    assert LocalTraining(TASK, data).train(through, PARAMS) == expected
    assert max_difference(direct, through) == 0.0


def test_files_are_private_and_failures_name_the_worker(tmp_path: Path) -> None:
    private_write(tmp_path / "f", b"x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never writes through an existing file or link
        private_write(tmp_path / "f", b"y")
    summary = (
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-01-01_00:00:00\n"
        "  host      : localhost\n  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : -9 (pid: 123)  (SIGKILL)\n  error_file: <N/A>\n"
    )
    assert describe_failure(tmp_path, 1, summary) == "worker rank 1 exited with code -9 (SIGKILL)"
    assert "torchrun exited with code 1" in describe_failure(tmp_path, 1, "nothing useful")
    (tmp_path / "error-rank-1").write_text("RuntimeError: boom")
    assert describe_failure(tmp_path, 1, summary) == "worker rank 1 failed: RuntimeError: boom"


def test_the_ranks_results_combine_into_the_silos() -> None:
    got = combined([(96, {"loss": 1.0, "acc": 0.5}), (96, {"loss": 3.0}), (96, {"loss": 2.0})])
    assert got == {"num_examples": 96, "metrics": {"loss": 2.0, "acc": 0.5}}


# ---- end to end: real torchrun ---------------------------------------------------------------


@pytest.mark.e2e
def test_two_workers_give_the_single_process_update(tmp_path: Path) -> None:
    data = TASK.load_data(OPTIONS)
    alone, pair = TASK.build_model(), TASK.build_model()
    expected = TASK.train(alone, data, PARAMS)
    seen: list[tuple[int, int]] = []
    modes: dict[str, int] = {}

    def look() -> bool:  # polled while the workers run: their files are private
        for path in (tmp_path / TRAINING_DIR).rglob("*"):
            modes[path.name] = stat.S_IMODE(path.stat().st_mode)
        return False

    started = time.monotonic()
    result = on_workers(tmp_path, SPEC, OPTIONS).train(
        pair, {**PARAMS, "progress": lambda d, t: seen.append((d, t))}, cancelled=look
    )
    print(f"two_worker_training_s: {time.monotonic() - started:.2f}")
    diff, tol = max_difference(alone, pair), tolerance(TASK, data, PARAMS)
    print(f"max_abs_difference: {diff:.3e}\ntolerance: {tol:.3e}")
    assert diff <= tol, (diff, tol)
    assert max_difference(alone, TASK.build_model()) > 1000 * tol  # it did train
    assert result.num_examples == expected.num_examples == 93
    # The workers' own means (over 47 and 46 examples) averaged, not the mean over 93.
    assert result.metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], rel=0.05)
    assert seen and seen[-1] == (18, 18)  # rank 0's progress reached the agent
    assert modes.get("job.json") == modes.get("model.safetensors") == 0o600, modes
    assert all(m == 0o700 for n, m in modes.items() if n.startswith("train-")), modes
    assert list((tmp_path / TRAINING_DIR).iterdir()) == []  # removed after training


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["NO_ALLREDUCE", "SUMMED", "RANK_IGNORED", "PER_WORKER_MEAN"])
def test_a_wrong_sharding_or_gradient_average_exceeds_the_tolerance(
    tmp_path: Path, variant: str
) -> None:
    data = TASK.load_data(OPTIONS)
    alone, pair = TASK.build_model(), TASK.build_model()
    TASK.train(alone, data, PARAMS)
    on_workers(tmp_path, f"{HERE}:{variant}", OPTIONS).train(pair, PARAMS)
    diff, tol = max_difference(alone, pair), tolerance(TASK, data, PARAMS)
    print(f"{variant.lower()}_max_abs_difference: {diff:.3e} (tolerance {tol:.3e})")
    assert diff > 10 * tol, (variant, diff, tol)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("raise", "worker rank 1 failed: RuntimeError: injected failure on rank 1"),
        ("kill", "worker rank 1 exited with code -9 (SIGKILL)"),
    ],
)
def test_a_failed_worker_fails_the_training(tmp_path: Path, how: str, said: str) -> None:
    options = {**OPTIONS, "fail_how": how}
    model = TASK.build_model()
    before = model.state_dict()
    with pytest.raises(WorkerFailed) as info:
        on_workers(tmp_path, FAULTY_SPEC, options).train(model, PARAMS)
    assert str(info.value) == said
    assert max_difference(model, TASK.build_model()) == 0.0  # untouched
    assert before.keys() == model.state_dict().keys()
    assert list((tmp_path / TRAINING_DIR).iterdir()) == []


def _hang(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    return {**OPTIONS, "fail_how": "hang", "pid_dir": str(pid_dir)}, pid_dir


def _pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in pid_dir.iterdir()]


@pytest.mark.e2e
def test_a_cancelled_round_stops_every_worker(tmp_path: Path) -> None:
    options, pid_dir = _hang(tmp_path)
    progress: list[tuple[int, int]] = []
    workers: list[int] = []

    def over() -> bool:  # the round ends once both workers train (and rank 0 reported)
        if len(_pids(pid_dir)) == 2 and progress:
            workers[:] = _pids(pid_dir)
            return True
        return False

    with pytest.raises(TrainingCancelled):
        on_workers(tmp_path, FAULTY_SPEC, options).train(
            TASK.build_model(), {**PARAMS, "progress": lambda d, t: progress.append((d, t))},
            cancelled=over,
        )  # fmt: skip
    assert len(workers) == 2
    assert gone_within(workers, STOP_WAIT_S) == []
    assert list((tmp_path / TRAINING_DIR).iterdir()) == []


@pytest.mark.e2e
def test_training_past_its_limit_is_stopped_and_fails(tmp_path: Path) -> None:
    options, pid_dir = _hang(tmp_path)
    with pytest.raises(WorkerFailed, match="did not finish within 2 s"):
        on_workers(tmp_path, FAULTY_SPEC, options, timeout_s=60).train(
            TASK.build_model(), PARAMS, deadline_s=2.0
        )
    assert gone_within(_pids(pid_dir), STOP_WAIT_S) == []


@pytest.mark.e2e
def test_a_killed_worker_drops_the_silo_from_that_round_only(federation: NewFederation) -> None:
    """Silo a trains on two workers and its rank 1 is SIGKILLed in round 1; silo b trains in its
    own process. Round 1 completes with b alone (a reports TRAINING_FAILED), round 2 with both:
    a's agent survived its workers' failure."""
    run = federation("ddp", ("a", "b"))
    cfg = run.coordinator_config(
        task_spec=FAULTY_SPEC, rounds=2, min_silos=1, start_silos=2, train={"epochs": 1}
    )
    coordinator = run.start_coordinator(cfg)
    faulty = {"silo_index": 0, "num_examples": 64, "fail_how": "kill", "fail_rank": 1}
    silos = {
        "a": _silo_on_workers(run, "a", FAULTY_SPEC, faulty, 2),
        "b": _silo_on_workers(run, "b", FAULTY_SPEC, {"silo_index": 1, "num_examples": 64}, 1),
    }
    assert coordinator.wait(150) == 0, run.logs()
    for proc in silos.values():
        assert proc.wait(30) == 0, run.logs()
    assert "worker rank 1 exited with code -9 (SIGKILL)" in silos["a"].log(), run.logs()
    from coordinator.storage.roundlog import RoundLog

    log = RoundLog.open_readonly(run.state / "rounds.sqlite")
    try:
        r1, r2 = log.round_detail(1), log.round_detail(2)
    finally:
        log.close()
    a, b = "spiffe://ddp/silo/a", "spiffe://ddp/silo/b"
    assert r1.status.value == r2.status.value == "completed", run.logs()
    assert sorted(r1.participants["finished"]) == [b], run.logs()
    assert [(d.silo_id, d.phase) for d in r1.dropouts] == [(a, "train")], run.logs()
    assert sorted(r2.participants["finished"]) == [a, b], run.logs()
    assert "trained on 2 workers (torchrun)" in silos["a"].log(), run.logs()
    state = run.fed.silos["a"].dir / "state" / TRAINING_DIR
    assert not state.exists() or list(state.iterdir()) == []


def _silo_on_workers(
    run: FederationRun,
    name: str,
    spec: str,
    options: Mapping[str, Any],
    workers: int,
    **config: Any,
) -> Proc:
    """Silo `name` of `run` on its own config, with `[train] workers` appended when > 1."""
    toml = write_silo_config(
        run.root / f"silo-{name}.toml",
        run.fed.silos[name],
        port=run.port,
        task_spec=spec,
        options=options,
        **config,
    )
    if workers > 1:
        toml.write_text(toml.read_text() + f"\n[train]\nworkers = {workers}\ntimeout_s = 60\n")
    return run.procs.silo(name, toml)


@pytest.mark.e2e
def test_a_secure_round_completes_with_a_silo_on_two_workers(federation: NewFederation) -> None:
    """The secure path's call site: silo a trains on two workers (bounded by the signed
    deadlines), b and c in their own processes; the masked round completes with all three."""
    run = federation("ddpsec", ("a", "b", "c"))
    cfg = run.coordinator_config(
        task_spec=SPEC, rounds=1, min_silos=3, aggregation="secagg", secagg={"clip_l2": 100.0}
    )
    coordinator = run.start_coordinator(cfg)
    silos = [
        _silo_on_workers(
            run,
            name,
            SPEC,
            {"silo_index": i, "num_examples": 64},
            2 if name == "a" else 1,
            allow_plaintext_insecure=False,
        )
        for i, name in enumerate(("a", "b", "c"))
    ]
    assert coordinator.wait(150) == 0, run.logs()
    for proc in silos:
        assert proc.wait(30) == 0, run.logs()
    assert "trained on 2 workers (torchrun)" in silos[0].log(), run.logs()
    assert "trained on 48 examples" in silos[0].log(), run.logs()
    from coordinator.storage.roundlog import RoundLog

    log = RoundLog.open_readonly(run.state / "rounds.sqlite")
    try:
        detail = log.round_detail(1)
    finally:
        log.close()
    assert detail.status.value == "completed", run.logs()
    assert len(detail.participants["finished"]) == 3, run.logs()


AGENT = """
import sys
from pathlib import Path
from tests.test_distributed_training import FAULTY_SPEC, PARAMS, TASK, on_workers
options = {"silo_index": 0, "num_examples": 124, "fail_how": "hang", "pid_dir": sys.argv[2]}
on_workers(Path(sys.argv[1]), FAULTY_SPEC, options).train(TASK.build_model(), PARAMS)
"""


@pytest.mark.e2e
def test_workers_end_when_the_agent_is_killed(tmp_path: Path) -> None:
    """An agent SIGKILLed while its workers train leaves no worker behind: each worker's
    watchdog sees the agent gone and ends it (torchrun then ends too)."""
    _, pid_dir = _hang(tmp_path)
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(tmp_path), str(pid_dir)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_pids(pid_dir)) < 2 and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.1)
        workers = _pids(pid_dir)
        assert len(workers) == 2, agent.poll()
        torchrun = {_parent(pid) for pid in workers}
    finally:
        agent.kill()  # SIGKILL: no finally, no handler runs in the agent
        agent.wait(10)
    assert agent.pid not in torchrun
    assert gone_within([*workers, *torchrun], STOP_WAIT_S) == []


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().split(") ", 1)[1].split()[1])

"""Local training on several workers: the task's `train` under torchrun, one gloo rank each.

Rule: `DistributedTraining.train` is a drop-in for ``task.train(model, data, params)`` (the
silo's LocalTraining picks it when ``[train] workers`` is above 1): it returns the same
TrainResult and leaves the trained weights in `model`, so what follows training is the same
whichever ran it. It starts ``python -m torch.distributed.run --standalone --nproc-per-node N
-m silo_agent.runtime.distributed_worker <job dir>`` with the agent's own interpreter, in its
own session, and waits for it, bounded in time. Each worker loads the task and the silo's data
itself (silo_agent.runtime.distributed_worker); rank 0 hands back the update.

What travels through files: a private directory (0700) made under ``<state_dir>/training/``
for one training and removed after it, whatever happens. The agent writes ``job.json`` (the
task spec and options, the round's training parameters without the progress callable, its
own pid) and ``model.safetensors`` (the global model), both 0600; rank 0 writes ``progress``,
``trained.safetensors`` and ``result.json``; a worker whose training raised writes
``error-rank-<r>``; torchrun's and the workers' output go to ``torchrun.log`` (its tail is
logged when training fails) and torchrun's own files to ``logs/``.

A failure is a `WorkerFailed` (the round then treats it as any exception of `train`): a worker
that raised, one that was killed (torchrun then stops the others), or a training that outlived
its limit (the silo's ``[train] timeout_s``, or the round's deadline when shorter). Stopping
(limit, cancellation, an exception here) sends SIGTERM to torchrun's process group, whose
handler stops its workers (each in a session of its own), then SIGKILL after `STOP_GRACE_S`; a
worker whose torchrun or agent is gone ends itself (the worker's watchdog).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from silofed.task import TrainingCancelled, TrainResult
from silofed.tensors import state_from_bytes, state_to_bytes

log = logging.getLogger("silofed.silo")

JOB_FILE = "job.json"
MODEL_FILE = "model.safetensors"
TRAINED_FILE = "trained.safetensors"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress"
LOG_FILE = "torchrun.log"
ERROR_PREFIX = "error-rank-"
WORKER_MODULE = "silo_agent.runtime.distributed_worker"
POLL_S = 0.2  # how often the agent looks at the workers (progress, cancellation, the limit)
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
LOG_TAIL_CHARS = 3000  # of torchrun's output, logged when training fails
OUTPUT_READ_BYTES = 1 << 16  # of torchrun's output, read for its summary (at the end)


class WorkerFailed(Exception):
    """Training on the workers failed; str() says which worker and how."""


def private_write(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) readable by this user only (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)


def torchrun_command(python: str, workers: int, job_dir: Path) -> list[str]:
    """The command line starting `workers` gloo workers on this machine for `job_dir`."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on this machine, on a free port
        "--nproc-per-node",
        str(workers),
        "--max-restarts",
        "0",  # a failed worker fails the training: the round, not torchrun, decides what next
        "--log-dir",
        str(job_dir / "logs"),
        "-m",
        WORKER_MODULE,
        str(job_dir),
    ]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End torchrun (by its process group: its pid, it leads a session of its own) and wait."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun's handler stops its workers
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


def read_progress(job_dir: Path) -> tuple[int, int] | None:
    """Rank 0's last ``progress(done, total)``, or None before the first (or if unreadable)."""
    try:
        done, total = (job_dir / PROGRESS_FILE).read_text().split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


def _tail(path: Path, size: int) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode(errors="replace")


# torchrun's summary of a failed run names the first failure: its rank and exit code.
_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?\s*$",
    re.S | re.M,
)


def describe_failure(job_dir: Path, code: int, output: str) -> str:
    """Which worker failed and how: its own error if it raised, else torchrun's root cause."""
    errors = sorted(job_dir.glob(f"{ERROR_PREFIX}*"))
    if errors:
        rank = errors[0].name.removeprefix(ERROR_PREFIX)
        return f"worker rank {rank} failed: {errors[0].read_text(errors='replace')}"
    cause = _ROOT_CAUSE.search(output)
    if cause is not None:
        rank, exit_code, name = cause.groups()
        how = f" ({name})" if name else ""
        return f"worker rank {rank} exited with code {exit_code}{how}"
    return f"torchrun exited with code {code} before the workers reported a result"


@dataclass(frozen=True, slots=True)
class DistributedTraining:
    """`train` on `workers` local gloo workers under torchrun; files under `root`."""

    task_spec: str
    task_options: Mapping[str, Any]
    workers: int
    root: Path  # <state_dir>/training: one private directory per training inside
    timeout_s: float
    python: str = field(default=sys.executable)

    def train(
        self,
        model: torch.nn.Module,
        params: Mapping[str, Any],
        *,
        cancelled: Callable[[], bool] = lambda: False,
        deadline_s: float | None = None,
    ) -> TrainResult:
        """Train `model` in place on the workers. Raises WorkerFailed, or TrainingCancelled once
        `cancelled()` (or ``params["progress"]``) says the round is over; either way the
        workers are stopped before this returns."""
        limit = self.timeout_s if deadline_s is None else min(self.timeout_s, deadline_s)
        started = time.monotonic()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        job_dir = Path(tempfile.mkdtemp(prefix="train-", dir=self.root))  # 0700
        try:
            self._write_job(job_dir, model, params)
            code, output = self._run(job_dir, limit, cancelled, params.get("progress"))
            if code != 0:
                log.warning("training on %d workers failed; torchrun's output ends:\n%s",
                            self.workers, output[-LOG_TAIL_CHARS:])  # fmt: skip
                raise WorkerFailed(describe_failure(job_dir, code, output))
            trained = state_from_bytes((job_dir / TRAINED_FILE).read_bytes())
            reported = json.loads((job_dir / RESULT_FILE).read_text())
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
        model.load_state_dict(trained)
        log.info("trained on %d workers (torchrun) in %.2f s", self.workers,
                 time.monotonic() - started)  # fmt: skip
        metrics = {str(k): float(v) for k, v in reported["metrics"].items()}
        return TrainResult(int(reported["num_examples"]), metrics)

    def _write_job(self, job_dir: Path, model: torch.nn.Module, params: Mapping[str, Any]) -> None:
        job = {
            "task_spec": self.task_spec,
            "task_options": dict(self.task_options),
            "params": {k: v for k, v in params.items() if k != "progress"},
            "agent_pid": os.getpid(),
        }
        private_write(job_dir / JOB_FILE, json.dumps(job).encode())
        private_write(job_dir / MODEL_FILE, state_to_bytes(model.state_dict()))

    def _run(
        self,
        job_dir: Path,
        limit_s: float,
        cancelled: Callable[[], bool],
        progress: object,
    ) -> tuple[int, str]:
        """torchrun's exit code and output; stopped on cancellation or at `limit_s`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
        # The workers talk to each other unauthenticated: on this machine only, over loopback
        # (gloo would otherwise pick the interface of the host name, reachable from outside).
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log_path = job_dir / LOG_FILE
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as log_file:
            proc = subprocess.Popen(
                torchrun_command(self.python, self.workers, job_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            code = self._wait(proc, job_dir, limit_s, cancelled, progress)
        finally:
            stop(proc)
        return code, _tail(log_path, OUTPUT_READ_BYTES)

    def _wait(
        self,
        proc: subprocess.Popen[bytes],
        job_dir: Path,
        limit_s: float,
        cancelled: Callable[[], bool],
        progress: object,
    ) -> int:
        started = time.monotonic()
        shown: tuple[int, int] | None = None
        while True:  # bounded: by `limit_s` at the latest
            with suppress(subprocess.TimeoutExpired):
                return proc.wait(POLL_S)
            if cancelled():
                raise TrainingCancelled("the round is over")
            now = read_progress(job_dir)
            if now is not None and now != shown and callable(progress):
                shown = now
                progress(*now)  # draws the bar; raises TrainingCancelled once the round is over
            if time.monotonic() - started > limit_s:
                raise WorkerFailed(
                    f"training on {self.workers} workers did not finish within {limit_s:.0f} s "
                    "([train] timeout_s or the round's deadline); the workers were stopped"
                )

"""One worker of a silo's local training on several workers (torchrun runs one per rank).

Rule: run only by silo_agent.runtime.distributed, as ``python -m
silo_agent.runtime.distributed_worker <job dir>`` under torchrun, which sets RANK, WORLD_SIZE
and the rendezvous in the environment. Every rank joins the gloo process group, loads the task
and the silo's data (`load_data` with the silo's ``[task.options]``: each rank holds the whole
data set and takes its part of every batch with silofed.distributed.shard), loads the global
model and calls the task's `train` with the round's parameters (the same `seed` on every rank,
so every rank draws the same batch order). Then the ranks' results meet at rank 0: the silo's
`num_examples` is rank 0's (the task counts the whole data set, as one process would), each
metric the mean over the ranks that report it; rank 0 writes the trained weights and that
result, 0600. A rank whose `train` raises writes ``error-rank-<r>`` (its exception, one line)
and exits 1; torchrun then stops the others.

``params["progress"]`` is rank 0's `progress(done, total)` written to the job's ``progress``
file, which the agent reads (it raises nothing here: the agent stops the workers when the round
is over); the other ranks get a no-op. A watchdog thread ends the worker at once if torchrun or
the agent is gone, so no worker outlives the training it was started for.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from silo_agent.runtime.distributed import (
    ERROR_PREFIX,
    JOB_FILE,
    MODEL_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    TRAINED_FILE,
    private_write,
)
from silofed.task import TrainResult, load_task
from silofed.tensors import state_from_bytes, state_to_bytes

WATCH_S = 0.5  # how often the watchdog looks for torchrun and the agent
PROGRESS_EVERY_S = 0.1  # rank 0 rewrites the progress file at most this often (and at the end)
ORPHANED_EXIT = 70


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: not ours any more
        return False
    return True


def watch(agent_pid: int) -> None:
    """End this process when its torchrun (its parent) or the silo agent is gone."""
    torchrun = os.getppid()

    def run() -> None:
        while True:  # ends with the process
            time.sleep(WATCH_S)
            if os.getppid() != torchrun or not _alive(agent_pid):
                os._exit(ORPHANED_EXIT)

    threading.Thread(target=run, name="watchdog", daemon=True).start()


class ProgressFile:
    """Rank 0's ``progress(done, total)``: written to a file the agent reads, replaced whole."""

    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / PROGRESS_FILE
        self.tmp = job_dir / f".{PROGRESS_FILE}.tmp"
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and done < total:
            return
        self.last = now
        try:
            text = f"{int(done)} {int(total)}\n".encode()
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
            os.replace(self.tmp, self.path)
        except (OSError, TypeError, ValueError):  # a display only: never break training
            return


def _ignore(done: int, total: int) -> None:
    del done, total


def combined(results: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """The silo's result from every rank's (num_examples, metrics): rank 0's count, each
    metric of rank 0 averaged over the ranks that report it."""
    count, first = results[0]
    metrics = {}
    for key in first:
        values = [m[key] for _, m in results if key in m]
        metrics[key] = sum(values) / len(values)
    return {"num_examples": count, "metrics": metrics}


def train(job_dir: Path, job: Mapping[str, Any], rank: int) -> None:
    task = load_task(job["task_spec"])
    data = task.load_data(job["task_options"])
    model = task.build_model()
    model.load_state_dict(state_from_bytes((job_dir / MODEL_FILE).read_bytes()))
    hook = ProgressFile(job_dir) if rank == 0 else _ignore
    result = task.train(model, data, {**job["params"], "progress": hook})
    if not isinstance(result, TrainResult):
        raise TypeError(f"train returned {type(result).__name__}, not a TrainResult")
    mine = (result.num_examples, {k: float(v) for k, v in result.metrics.items()})
    gathered: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        private_write(job_dir / TRAINED_FILE, state_to_bytes(model.state_dict()))
        private_write(job_dir / RESULT_FILE, json.dumps(combined(gathered)).encode())


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0])
    job = json.loads((job_dir / JOB_FILE).read_text())
    watch(int(job["agent_pid"]))
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    try:
        train(job_dir, job, rank)
        dist.barrier()  # rank 0's files are written before any rank reports success
    except BaseException as exc:
        line = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        private_write(job_dir / f"{ERROR_PREFIX}{rank}", line.encode())
        raise
    finally:
        dist.destroy_process_group()
    return 0


def run(argv: list[str]) -> None:
    """`main`, then an exit that skips the interpreter's teardown: torch's C++ threads (gloo,
    the rendezvous store) can abort a worker there ("terminate called without an active
    exception", SIGABRT) after its training succeeded, which torchrun would report as a failed
    worker. Everything the worker writes is closed before `main` returns."""
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()  # to torchrun's output, which the agent logs on failure
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run(sys.argv[1:])

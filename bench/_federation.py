"""What the round benchmarks share: run a real federation of the no-op task and measure it.

`run_federation` provisions a dev PKI in a work directory, starts a coordinator and N silo agents
as processes on 127.0.0.1 over mTLS (tests/federation_helpers.py: the same helpers the tests
use), lets the coordinator run `rounds` completed rounds of `examples.noop.task:TASK` with D
parameters, and returns the round log's per-round timings and the coordinator's peak resident
memory. Every process it starts is stopped (by PID) before it returns, also on failure.

Peak memory is VmHWM ("high water mark" of the resident set) from /proc/<pid>/status of the
coordinator process, sampled every 0.1 s while it runs: the kernel keeps the maximum, so sampling
only risks missing a peak reached in the last 0.1 s before exit — after the last round's work.
The same thread samples VmRSS (to place the peak in a round phase) and the CPU time of the
coordinator and of every silo (/proc/<pid>/stat), to tell where a round's seconds went.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coordinator.storage.roundlog import RoundDetail, RoundLog  # noqa: E402
from examples.noop.task import PARAMS_ENV  # noqa: E402
from tests.federation_helpers import (  # noqa: E402
    Proc,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

NOOP_SPEC = "examples.noop.task:TASK"
SECURE = "secagg"
PLAINTEXT = "plaintext-insecure"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class FederationFailed(RuntimeError):
    """The coordinator did not finish its rounds (exit code or timeout); carries the logs."""

    def __init__(self, message: str, logs: str) -> None:
        super().__init__(message)
        self.logs = logs


@dataclass(frozen=True)
class RunResult:
    aggregation: str
    rounds: tuple[RoundDetail, ...]  # every round in the log, aborted ones included
    coordinator_peak_mib: float
    rss_trace: tuple[tuple[float, float], ...]  # (wall-clock time, coordinator VmRSS MiB)
    cpu_trace: tuple[tuple[float, float, float], ...]  # (time, coordinator CPU s, silos CPU s)
    log_dir: Path
    warmup: int = 0  # completed rounds left out of `round_s`

    @property
    def completed(self) -> list[RoundDetail]:
        return [r for r in self.rounds if r.status.value == "completed"]

    @property
    def measured(self) -> list[RoundDetail]:
        """The completed rounds after the warm-up ones."""
        return self.completed[self.warmup :]

    @property
    def warmup_s(self) -> list[float]:
        return [r.duration_s for r in self.completed[: self.warmup] if r.duration_s is not None]

    @property
    def round_s(self) -> list[float]:
        """Seconds from start to end (the round log's started_at/ended_at) of each measured
        round."""
        return [r.duration_s for r in self.measured if r.duration_s is not None]

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s) if self.round_s else float("nan")

    def median_phase_s(self) -> dict[str, float]:
        """Median duration of each phase (the round log's per-phase timings) over the measured
        rounds, in the order the phases ran."""
        times: dict[str, list[float]] = {}
        for r in self.measured:
            for p in r.phases:
                times.setdefault(p.phase, []).append(p.duration_s)
        return {name: statistics.median(ts) for name, ts in times.items()}

    def cpu_per_round_s(self) -> tuple[float, float]:
        """CPU seconds per measured round (coordinator, all silos together), from the samples
        bracketing the measured rounds (first start to last end)."""
        rounds = self.measured
        if not rounds or not self.cpu_trace or rounds[-1].ended_at is None:
            return float("nan"), float("nan")
        start, end = rounds[0].started_at, rounds[-1].ended_at
        before = [c for c in self.cpu_trace if c[0] <= start] or [self.cpu_trace[0]]
        after = [c for c in self.cpu_trace if c[0] >= end] or [self.cpu_trace[-1]]
        a, b = before[-1], after[0]
        return (b[1] - a[1]) / len(rounds), (b[2] - a[2]) / len(rounds)

    def peak_rss_at(self) -> tuple[float, str]:
        """The highest sampled VmRSS and where it was: "round R phase P", "round R (after its
        phases)", "before the first round" or "after the last round"."""
        if not self.rss_trace:
            return float("nan"), "no samples"
        when, rss = max(self.rss_trace, key=lambda sample: sample[1])
        for r in self.rounds:
            for p in r.phases:
                if p.started_at <= when <= p.ended_at:
                    return rss, f"round {r.round_id} phase {p.phase}"
            if r.started_at <= when <= (r.ended_at or when):
                return rss, f"round {r.round_id} (outside its phases)"
        if self.rounds and when < self.rounds[0].started_at:
            return rss, "before the first round"
        return rss, "after the last round"


def _status_kib(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return None  # a zombie reports no memory lines


def vm_hwm_mib(pid: int) -> float:
    """VmHWM (peak resident set) of `pid` in MiB; NaN if the kernel does not report it."""
    kib = _status_kib(pid, "VmHWM:")
    return float("nan") if kib is None else kib / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` has used (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Sampler:
    """Samples the coordinator's memory and the CPU time of every process on a thread.

    `peak` is the highest VmHWM read (the kernel's own maximum, so no peak between samples is
    missed); `rss` holds (time.time(), VmRSS MiB) samples, to place the peak in a round phase;
    `cpu` holds (time.time(), coordinator CPU s, all silos' CPU s) samples (a silo that exited
    counts with its last reading).
    """

    def __init__(self, coordinator: Proc, interval_s: float = 0.1) -> None:
        self.coordinator, self.interval_s = coordinator, interval_s
        self.silos: list[Proc] = []
        self.peak = 0.0
        self.rss: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float, float]] = []
        self._silo_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pid = self.coordinator.pid
        while not self._stop.is_set() and self.coordinator.popen.poll() is None:
            try:
                hwm, rss = _status_kib(pid, "VmHWM:"), _status_kib(pid, "VmRSS:")
                coordinator_cpu = cpu_s(pid)
            except (OSError, ValueError, IndexError):
                return
            now = time.time()
            if hwm is not None:
                self.peak = max(self.peak, hwm / 1024)
            if rss is not None:
                self.rss.append((now, rss / 1024))
            for silo in list(self.silos):
                with contextlib.suppress(OSError, ValueError, IndexError):  # exited: keep the last
                    self._silo_cpu[silo.pid] = cpu_s(silo.pid)
            self.cpu.append((now, coordinator_cpu, sum(self._silo_cpu.values())))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def run_federation(
    workdir: Path,
    *,
    silos: int,
    params: int,
    rounds: int,
    warmup: int = 0,
    aggregation: str,
    secagg: Mapping[str, Any] | None = None,
    phase_deadline_s: float = 600.0,
    timeout_s: float = 1800.0,
) -> RunResult:
    """Run `warmup` + `rounds` completed rounds with `silos` silo processes; the first `warmup`
    completed ones (fresh processes warming up) are not in `RunResult.round_s`. Raises
    FederationFailed.

    `workdir` (created, left in place) receives the PKI, configs, state, `logs/` and
    `coordinator_rss.tsv` (the VmRSS samples). Deadlines are all `phase_deadline_s`: generous,
    since a benchmark measures rounds, not dropouts.
    """
    os.environ[PARAMS_ENV] = str(params)  # inherited by every child: all build the same model
    names = [f"s{i:02d}" for i in range(silos)]
    workdir.mkdir(parents=True, exist_ok=True)
    fed = provision(workdir / "fed", "bench", names)
    state = workdir / "coord"
    cfg = write_coordinator_config(
        workdir / "coordinator.toml",
        fed,
        state_dir=state,
        task_spec=NOOP_SPEC,
        rounds=warmup + rounds,
        min_silos=silos,
        offer_s=phase_deadline_s,
        train_s=phase_deadline_s,
        start_timeout_s=phase_deadline_s,
        aggregation=aggregation,
        secagg=secagg,
        deadlines={
            "share_keys_s": phase_deadline_s,
            "consistency_s": phase_deadline_s,
            "unmask_s": phase_deadline_s,
        },
    )
    log_dir = workdir / "logs"
    with processes(log_dir) as procs:
        coordinator = procs.coordinator(cfg)
        with Sampler(coordinator) as sampler:
            port = wait_for_port(state, coordinator, timeout_s=phase_deadline_s)
            for i, name in enumerate(names):
                toml = write_silo_config(
                    workdir / f"{name}.toml",
                    fed.silos[name],
                    port=port,
                    task_spec=NOOP_SPEC,
                    options={"silo_index": i},
                    allow_plaintext_insecure=aggregation == PLAINTEXT,
                )
                sampler.silos.append(procs.silo(name, toml))
            try:
                code = coordinator.wait(timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise FederationFailed(
                    f"{aggregation}: the coordinator did not finish {warmup + rounds} rounds "
                    f"in {timeout_s:.0f} s",
                    procs.logs(),
                ) from exc
        if code != 0:
            raise FederationFailed(
                f"{aggregation}: the coordinator exited with code {code}", procs.logs()
            )
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        details = tuple(log.round_detail(r.round_id) for r in log.rounds())
    finally:
        log.close()
    (workdir / "coordinator_rss.tsv").write_text(
        "time\tvm_rss_mib\n" + "".join(f"{t:.3f}\t{m:.1f}\n" for t, m in sampler.rss)
    )
    return RunResult(
        aggregation,
        details,
        sampler.peak,
        tuple(sampler.rss),
        tuple(sampler.cpu),
        log_dir,
        warmup,
    )

"""What the round benchmarks share: run a real federation of the no-op task and measure it.

`run_federation` provisions a dev PKI in a work directory, starts a coordinator and N silo agents
as processes on 127.0.0.1 over mTLS (tests/federation_helpers.py: the same helpers the tests
use), lets the coordinator run `rounds` completed rounds of `examples.noop.task:TASK` with D
parameters, and returns the round log's per-round timings and the coordinator's peak resident
memory. Every process it starts is stopped (by PID) before it returns, also on failure.

Peak memory is VmHWM ("high water mark" of the resident set) from /proc/<pid>/status of the
coordinator process, sampled every 0.1 s while it runs: the kernel keeps the maximum, so sampling
only risks missing a peak reached in the last 0.1 s before exit — after the last round's work.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coordinator.roundlog import RoundDetail, RoundLog  # noqa: E402
from examples.noop.task import PARAMS_ENV  # noqa: E402
from tests.federation_helpers import (  # noqa: E402
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

NOOP_SPEC = "examples.noop.task:TASK"
SECURE = "secagg"
PLAINTEXT = "plaintext-insecure"


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


class PeakSampler:
    """Samples VmHWM and VmRSS of `pid` on a thread until stopped or the process exits.

    `peak` is the highest VmHWM read (the kernel's own maximum, so no peak between samples is
    missed); `trace` holds (time.time(), VmRSS MiB) samples, to place the peak in a round phase.
    """

    def __init__(self, pid: int, alive: Callable[[], bool], interval_s: float = 0.1) -> None:
        self.pid, self.alive, self.interval_s = pid, alive, interval_s
        self.peak = 0.0
        self.trace: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.alive():
            try:
                hwm, rss = _status_kib(self.pid, "VmHWM:"), _status_kib(self.pid, "VmRSS:")
            except OSError:
                return
            if hwm is not None:
                self.peak = max(self.peak, hwm / 1024)
            if rss is not None:
                self.trace.append((time.time(), rss / 1024))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
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
        with PeakSampler(coordinator.pid, lambda: coordinator.popen.poll() is None) as sampler:
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
                procs.silo(name, toml)
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
        "time\tvm_rss_mib\n" + "".join(f"{t:.3f}\t{m:.1f}\n" for t, m in sampler.trace)
    )
    return RunResult(aggregation, details, sampler.peak, tuple(sampler.trace), log_dir, warmup)

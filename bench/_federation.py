"""What the round benchmarks share: run a real federation of the no-op task and measure it.

`run_federation` provisions a dev PKI in a work directory, starts a coordinator and N silo agents
as processes on 127.0.0.1 over mTLS (tests/federation_helpers.py: the same helpers the tests
use), lets the coordinator run `rounds` completed rounds of `examples.noop.task:TASK` with D
parameters, and returns the round log's per-round timings and the coordinator's peak resident
memory. Every process it starts is stopped (by PID) before it returns, also on failure.

With `farm_processes` the silos are hosted in that many farm processes (bench/farm: each silo
still its own agent with its own certificate, connection, secure-aggregation state and ledger),
so a 2-core machine can run n = 100; each farm logs its silos' own CPU seconds
(bench/farm/cpu_log.py). With `kill`, some silos are ended mid-round in the first measured round
(`Kill`): SIGKILLed, or their streams cut by their farm.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.farm.cpu_log import CpuSample, read_cpu_log, span_cpu  # noqa: E402
from coordinator.storage.roundlog import RoundDetail, RoundLog  # noqa: E402
from examples.noop.task import PARAMS_ENV  # noqa: E402
from tests.federation_helpers import (  # noqa: E402
    Proc,
    Processes,
    SiloFiles,
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
SIGKILL, CUT = "sigkill", "cut"
POLL_S = 0.05


@dataclass(frozen=True)
class Kill:
    """`count` silos (the last ones) end mid-round in the first measured round. Each freezes at
    the protocol point `after` (the real agent's `[debug] pause_after_phase`: it sends that
    point's message, then does nothing more), so all of them drop at the same step; once all of
    them are there they are SIGKILLed (`how` = "sigkill": their processes, or with farms the one
    farm process that hosts only them) or their streams are cut (`how` = "cut", farms only: each
    one's farm closes its stream and channel)."""

    count: int
    after: str = "share_keys"
    how: str = SIGKILL


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
    silos: int = 0
    farm_cpu: tuple[tuple[CpuSample, ...], ...] = ()  # each farm's CPU log (farms only)
    kill_round: int | None = None  # the round in which `killed` were ended
    killed: tuple[str, ...] = ()

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

    def per_silo_cpu_s(self) -> float:
        """Mean CPU seconds of one silo per measured round. Farms: each silo's own threads
        (bench/farm), over the silos that ran to the end (`killed` left out). Processes: all
        silo processes' CPU seconds divided by the number of silos."""
        rounds = self.measured
        if not rounds or rounds[-1].ended_at is None:
            return float("nan")
        if not self.farm_cpu:
            return self.cpu_per_round_s()[1] / self.silos if self.silos else float("nan")
        span = span_cpu(self.farm_cpu, rounds[0].started_at, rounds[-1].ended_at)
        own = [s for name, s in span.silos.items() if name not in self.killed]
        return statistics.fmean(own) / len(rounds) if own else float("nan")

    def farm_shared_cpu_s(self) -> float:
        """Farms only: CPU seconds per measured round that no silo's threads account for (gRPC
        core's own threads, the farms' samplers), divided by the number of silos."""
        rounds = self.measured
        if not self.farm_cpu or not rounds or rounds[-1].ended_at is None or not self.silos:
            return float("nan")
        span = span_cpu(self.farm_cpu, rounds[0].started_at, rounds[-1].ended_at)
        return span.shared_s / len(rounds) / self.silos

    def kill_round_detail(self) -> RoundDetail | None:
        return next((r for r in self.rounds if r.round_id == self.kill_round), None)

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
    farm_processes: int | None = None,
    kill: Kill | None = None,
) -> RunResult:
    """Run `warmup` + `rounds` completed rounds with `silos` silos, each its own process or
    (`farm_processes`) hosted in that many farm processes; the first `warmup` completed ones
    (fresh processes warming up) are not in `RunResult.round_s`. `kill` ends some silos mid-round
    in round `warmup` + 1; later rounds run with the survivors. Raises FederationFailed.

    `workdir` (created, left in place) receives the PKI, configs, state, `logs/`, the farms' CPU
    logs and `coordinator_rss.tsv` (the VmRSS samples). Deadlines are all `phase_deadline_s`:
    generous, since a benchmark measures rounds, not dropouts (a killed silo's stream ends, so
    the coordinator does not wait for it).
    """
    os.environ[PARAMS_ENV] = str(params)  # inherited by every child: all build the same model
    names = [f"s{i:02d}" for i in range(silos)]
    victims = names[silos - kill.count :] if kill is not None and kill.count > 0 else []
    if victims and kill is not None and kill.how == CUT and farm_processes is None:
        raise ValueError("cutting a silo's stream needs farms (farm_processes)")
    kill_round = warmup + 1 if victims else None
    workdir.mkdir(parents=True, exist_ok=True)
    fed = provision(workdir / "fed", "bench", names)
    state = workdir / "coord"
    cfg = write_coordinator_config(
        workdir / "coordinator.toml",
        fed,
        state_dir=state,
        task_spec=NOOP_SPEC,
        rounds=warmup + rounds,
        min_silos=silos - len(victims),  # the rounds after a kill run with the survivors
        start_silos=silos,
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
    sparse = (secagg or {}).get("graph", "complete") != "complete"
    # A collusion bound the coordinator assumes must be one the silos accept as their floor.
    colluders = (secagg or {}).get("n_colluders")
    log_dir = workdir / "logs"
    control = workdir / "control"  # farms: cut-<name> files
    cpu_logs: list[Path] = []
    with processes(log_dir) as procs:
        coordinator = procs.coordinator(cfg)
        with Sampler(coordinator) as sampler:
            port = wait_for_port(state, coordinator, timeout_s=phase_deadline_s)
            tomls = {
                name: _silo_config(
                    workdir / f"{name}.toml",
                    fed.silos[name],
                    index=i,
                    port=port,
                    aggregation=aggregation,
                    sparse=sparse,
                    colluders=colluders,
                    pause=(kill.after, kill_round) if kill and name in victims else None,
                )
                for i, name in enumerate(names)
            }
            victim_procs: list[Proc] = []
            if farm_processes is None:
                for name in names:
                    proc = procs.silo(name, tomls[name])
                    sampler.silos.append(proc)
                    if name in victims:
                        victim_procs.append(proc)
            else:
                control.mkdir(exist_ok=True)
                own_farm = victims if kill is not None and kill.how == SIGKILL else []
                for label, members in farm_groups(names, own_farm, farm_processes):
                    cpu_log = workdir / f"{label}.cpu.jsonl"
                    cpu_logs.append(cpu_log)
                    args = ["--cpu-log", str(cpu_log), "--control-dir", str(control)]
                    args += ["--max-s", str(timeout_s), *(str(tomls[n]) for n in members)]
                    proc = procs.start(label, ["-m", "bench.farm", *args])
                    sampler.silos.append(proc)
                    if members == own_farm:
                        victim_procs.append(proc)
            deadline = time.monotonic() + timeout_s
            if kill is not None and victims:
                markers = [fed.silos[n].dir / "state" / f"paused-{kill.after}" for n in victims]
                _end_when_paused(markers, coordinator, deadline, procs)
                if kill.how == SIGKILL:
                    for proc in victim_procs:
                        proc.popen.kill()
                else:
                    for name in victims:
                        (control / f"cut-{name}").touch()
            try:
                code = coordinator.wait(max(1.0, deadline - time.monotonic()))
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
        for proc in sampler.silos:  # the farms write their last CPU sample as they exit
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
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
        silos=silos,
        farm_cpu=tuple(tuple(read_cpu_log(p)) for p in cpu_logs if p.exists()),
        kill_round=kill_round,
        killed=tuple(victims),
    )


def farm_groups(
    names: Sequence[str], own_farm: Sequence[str], farms: int
) -> list[tuple[str, list[str]]]:
    """(label, silo names) of each farm process: the silos not in `own_farm` dealt round-robin
    to `farms` farms, then one more farm holding `own_farm` alone (if any), which can then be
    SIGKILLed without touching the others."""
    others = [n for n in names if n not in own_farm]
    groups = [(f"farm-{i}", others[i::farms]) for i in range(farms)]
    if own_farm:
        groups.append(("farm-victims", list(own_farm)))
    return [(label, members) for label, members in groups if members]


def _silo_config(
    path: Path,
    silo: SiloFiles,
    *,
    index: int,
    port: int,
    aggregation: str,
    sparse: bool,
    pause: tuple[str, int | None] | None,
    colluders: int | None = None,
) -> Path:
    """The silo's config (`write_silo_config`); `sparse` opts in to Harary-graph rounds,
    `colluders` sets its collusion floor `n_colluders_min` (default: a third of the roster),
    `pause` is (`[debug] pause_after_phase`, `pause_in_round`)."""
    write_silo_config(
        path,
        silo,
        port=port,
        task_spec=NOOP_SPEC,
        options={"silo_index": index},
        allow_plaintext_insecure=aggregation == PLAINTEXT,
        pause_after_phase=pause[0] if pause else None,
        pause_in_round=pause[1] if pause else None,
    )
    keys = "allow_sparse_graph = true\n" if sparse else ""
    if colluders is not None:
        keys += f"n_colluders_min = {colluders}\n"
    if keys:  # write_silo_config has no argument for them: keys into its [secagg] table
        text = path.read_text()
        assert text.count("[secagg]\n") == 1, text
        path.write_text(text.replace("[secagg]\n", "[secagg]\n" + keys))
    return path


def _end_when_paused(
    markers: Sequence[Path], coordinator: Proc, deadline: float, procs: Processes
) -> None:
    """Wait (bounded by `deadline` and the coordinator's life) until every marker exists."""
    while not all(m.exists() for m in markers):
        if coordinator.popen.poll() is not None or time.monotonic() > deadline:
            missing = [str(m) for m in markers if not m.exists()]
            raise FederationFailed(
                f"the silos to end never reached their pause point: {missing}", procs.logs()
            )
        time.sleep(POLL_S)

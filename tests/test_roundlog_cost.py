"""`status` and a metrics scrape cost the same with 2,000 rounds in the log as with 10.

The coordinator answers `status` twice a second (the live progress line) and Prometheus scrapes
at will; both used to read and JSON-decode every round. The cost is measured as SQLite
virtual-machine steps (a progress handler on every connection the code opens), which, unlike
time, does not depend on the machine's load; the times are printed as a benchmark.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.observability.metrics import FederationCollector
from coordinator.storage.roundlog import RoundDetail, RoundLog, RoundStatus
from protos import federation_pb2 as pb

INVITED = ["spiffe://cost/silo/a", "spiffe://cost/silo/b", "spiffe://cost/silo/c"]
STEP = 10  # the progress handler runs every STEP virtual-machine instructions


def write_round(log: RoundLog, round_id: int, *, finish: str | None = "completed") -> None:
    """One round as the coordinator writes it: phases, a dropout, per-silo traffic, its end."""
    t0 = 100.0 * round_id
    log.start_round(
        round_id, started_at=t0, aggregation="secagg", config_digest="cfg",
        model_in_sha256=f"in-{round_id}", invited=INVITED,
    )  # fmt: skip
    log.record_phase(round_id, "advertise_keys", started_at=t0, ended_at=t0 + 0.4)
    log.record_phase(round_id, "masked_input", started_at=t0 + 0.4, ended_at=t0 + 2.0 + round_id)
    log.record_dropout(round_id, INVITED[round_id % 3], phase="masked_input", reason="deadline")
    for i, silo in enumerate(INVITED):
        log.record_silo_stats(
            round_id, silo, bytes_in=1000 + i, bytes_out=2000 + round_id, metrics={"loss": 0.5}
        )
    if finish == "completed":
        log.finish_round(
            round_id, status="completed", ended_at=t0 + 3.0 + round_id,
            model_out_sha256=f"out-{round_id}",
        )  # fmt: skip
    elif finish == "aborted":
        log.finish_round(round_id, status="aborted", ended_at=t0 + 1.0, abort_reason="too few")


def build_log(path: Path, rounds: int) -> None:
    with RoundLog(path) as log:
        for r in range(1, rounds + 1):
            write_round(log, r, finish="aborted" if r % 7 == 0 else "completed")


class VmSteps:
    """Counts the SQLite virtual-machine steps of every connection opened while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ticks = 0
        real = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn = real(*args, **kwargs)
            conn.set_progress_handler(self._tick, STEP)
            return conn

        monkeypatch.setattr(sqlite3, "connect", connect)

    def _tick(self) -> int:
        self.ticks += 1
        return 0  # go on

    def of(self, action: Callable[[], object]) -> int:
        before = self.ticks
        action()
        return self.ticks - before


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Path]]:
    made: dict[int, Path] = {}
    for n in (10, 2_000):
        made[n] = tmp_path_factory.mktemp(f"log{n}") / "rounds.sqlite"
        started = time.perf_counter()
        build_log(made[n], n)
        print(f"\nwrote {n} rounds in {time.perf_counter() - started:.2f} s")
    yield made


def idle() -> pb.StatusReply:
    return pb.StatusReply(federation_id="cost")


def samples(collector: FederationCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def test_count_completed_does_not_read_the_rounds_again(
    logs: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = VmSteps(monkeypatch)
    cost: dict[int, int] = {}
    for n, path in logs.items():
        with RoundLog(path) as log:  # a writer, as the hub holds it
            assert log.count_completed() == n - n // 7
            cost[n] = steps.of(log.count_completed)
            started = time.perf_counter()
            for _ in range(100):
                log.count_completed()
            per_call = (time.perf_counter() - started) / 100
            print(
                f"\ncount_completed, {n} rounds: {per_call * 1e6:.0f} us, {cost[n]} x{STEP} steps"
            )
    with RoundLog.open_readonly(logs[2_000]) as fresh:
        first = steps.of(fresh.count_completed)
    assert cost[2_000] <= max(2 * cost[10], 5)
    assert first > 10 * cost[2_000]  # the measure sees a count over 2,000 rows


def test_count_completed_follows_every_writer(tmp_path: Path) -> None:
    path = tmp_path / "rounds.sqlite"
    with RoundLog(path) as writer, RoundLog.open_readonly(path) as reader:
        assert writer.count_completed() == reader.count_completed() == 0
        write_round(writer, 1)
        assert writer.count_completed() == reader.count_completed() == 1
        write_round(writer, 2, finish="aborted")
        write_round(writer, 3, finish=None)
        assert writer.count_completed() == reader.count_completed() == 1
        with RoundLog(path) as other:  # another connection's commit is seen by both
            other.finish_round(3, status="completed", ended_at=400.0, model_out_sha256="o")
        assert writer.count_completed() == reader.count_completed() == 2


def test_a_scrape_does_not_read_the_finished_rounds_again(
    logs: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = VmSteps(monkeypatch)
    cost: dict[int, int] = {}
    for n, path in logs.items():
        collector = FederationCollector(path, idle)
        first = time.perf_counter()
        got = samples(collector)
        first = time.perf_counter() - first
        assert got[("silofed_rounds_completed", ())] == n - n // 7
        cost[n] = steps.of(lambda: samples(collector))  # noqa: B023 - called right here
        started = time.perf_counter()
        for _ in range(20):
            samples(collector)
        per_scrape = (time.perf_counter() - started) / 20
        print(
            f"\nscrape with {n} rounds: first {first * 1e3:.1f} ms, then {per_scrape * 1e3:.2f} ms"
            f" and {cost[n]} x{STEP} steps"
        )
    assert cost[2_000] <= 2 * cost[10]
    assert steps.of(lambda: samples(FederationCollector(logs[2_000], idle))) > 50 * cost[2_000]


def expected(details: list[RoundDetail]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exported figures computed from scratch from every round's detail."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def add(key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    for d in details:
        if d.status is not RoundStatus.RUNNING and d.duration_s is not None:
            label = (("status", d.status.value),)
            add(("silofed_round_duration_seconds_count", label), 1)
            add(("silofed_round_duration_seconds_sum", label), d.duration_s)
            add(("silofed_round_duration_seconds_bucket", (("le", "5.0"), *label)),
                float(d.duration_s <= 5.0))  # fmt: skip
        for p in d.phases:
            label = (("phase", p.phase),)
            add(("silofed_phase_duration_seconds_count", label), 1)
            add(("silofed_phase_duration_seconds_sum", label), p.duration_s)
        for drop in d.dropouts:
            add(("silofed_dropouts_total", (("phase", drop.phase),)), 1)
        add(("silofed_bytes_total", (("direction", "in"),)), sum(s.bytes_in for s in d.silos))
        add(("silofed_bytes_total", (("direction", "out"),)), sum(s.bytes_out for s in d.silos))
        add(("silofed_rounds_completed", ()), float(d.status is RoundStatus.COMPLETED))
    return out


def test_a_scrape_sums_every_round_finished_or_running(tmp_path: Path) -> None:
    path = tmp_path / "rounds.sqlite"
    collector = FederationCollector(path, idle)
    with RoundLog(path) as log:
        for r in range(1, 4):
            write_round(log, r, finish="aborted" if r == 2 else "completed")
        write_round(log, 4, finish=None)  # running: read again at each scrape
        for step in range(3):
            got = samples(collector)
            want = expected([log.round_detail(r) for r in range(1, log.last_round_id() + 1)])
            for key, value in want.items():
                assert math.isclose(got[key], value), (step, key, got[key], value)
            if step == 0:
                log.record_dropout(4, INVITED[2], phase="offer", reason="disconnected")
            elif step == 1:
                log.finish_round(4, status="completed", ended_at=500.0, model_out_sha256="o")
                write_round(log, 5, finish=None)
    assert got[("silofed_rounds_completed", ())] == 3
    assert got[("silofed_dropouts_total", (("phase", "offer"),))] == 1

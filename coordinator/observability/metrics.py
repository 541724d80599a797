"""Prometheus metrics endpoint of the coordinator (`[metrics] listen = "host:port"`; off if absent).

Rule: metrics are computed at scrape time from the two sources of truth, never kept in
parallel: the round log (durations, phases, dropouts, bytes — finished rounds are immutable, so
their figures are summed once and a scrape reads only the rounds after them) and the Hub's live
status (connected silos, certificate expiry). The
runtime needs one call, `start_metrics_from_config(config, hub.status)`; the HTTP server runs in
a daemon thread and writes its bound port to `<state_dir>/metrics.port` (listen port 0 works).

Exported: silofed_round_duration_seconds (histogram over finished rounds),
silofed_phase_duration_seconds{phase} (histogram), silofed_dropouts_total{phase},
silofed_bytes_total{direction="in"|"out"} (as seen by the coordinator),
silofed_connected_silos, silofed_cert_expiry_days{silo}, silofed_cert_expiry_seconds{silo},
silofed_current_round,
silofed_rounds_completed.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from coordinator.config import CoordinatorConfig
from coordinator.storage.roundlog import (
    LOG_FILENAME,
    RoundDetail,
    RoundLog,
    RoundLogError,
    RoundStatus,
)
from protos import federation_pb2 as pb

log = logging.getLogger("silofed.coordinator")

PORT_FILENAME = "metrics.port"
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
PHASE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(slots=True)
class _Histogram:
    """Cumulative bucket counts and sum of one histogram's observations, per label values."""

    buckets: Sequence[float]
    counts: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    sums: dict[tuple[str, ...], float] = field(default_factory=dict)

    def add(self, labels: tuple[str, ...], value: float) -> None:
        # The last slot is +Inf (every observation).
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

    def family(self, name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(labels))
        bounds = [*(str(b) for b in self.buckets), "+Inf"]
        for label_values, counts in sorted(self.counts.items()):
            family.add_metric(
                list(label_values),
                [(b, float(n)) for b, n in zip(bounds, counts, strict=True)],
                sum_value=self.sums[label_values],
            )
        return family


@dataclass(slots=True)
class _Totals:
    """Every round-log figure the endpoint exports, summed over the rounds added to it."""

    rounds: _Histogram = field(default_factory=lambda: _Histogram(ROUND_BUCKETS))
    phases: _Histogram = field(default_factory=lambda: _Histogram(PHASE_BUCKETS))
    dropouts: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    completed: int = 0

    def add(self, d: RoundDetail) -> None:
        if d.status is RoundStatus.COMPLETED:
            self.completed += 1
        if d.status is not RoundStatus.RUNNING and d.duration_s is not None:
            self.rounds.add((d.status.value,), d.duration_s)
        for p in d.phases:
            self.phases.add((p.phase,), p.duration_s)
        for drop in d.dropouts:
            self.dropouts[drop.phase] = self.dropouts.get(drop.phase, 0) + 1
        self.bytes_in += sum(s.bytes_in for s in d.silos)
        self.bytes_out += sum(s.bytes_out for s in d.silos)


@dataclass(eq=False)  # the registry keys collectors by identity
class FederationCollector(Collector):
    """Builds every metric from the round log at `log_path` and `status()` at scrape time.

    A scrape costs the same however many rounds the log holds: the finished rounds (which never
    change) are added to `_done` once, in order, and only the rounds after them are read again
    (the running one, if any)."""

    log_path: Path
    status: Callable[[], pb.StatusReply]
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._done = _Totals()
        self._done_through = 0  # rounds 1.._done_through are finished and in _done
        self._lock = threading.Lock()

    def _totals(self) -> _Totals:
        """The totals over every round in the log: `_done` plus the rounds after it."""
        if not self.log_path.exists():
            return _Totals()
        with self._lock, RoundLog.open_readonly(self.log_path) as rl:
            later: list[RoundDetail] = []
            for d in rl.rounds_after(self._done_through):
                if not later and d.status is not RoundStatus.RUNNING:
                    self._done.add(d)
                    self._done_through = d.round_id
                else:
                    later.append(d)
            # A copy: a concurrent scrape may add to _done while this one builds its families.
            totals = copy.deepcopy(self._done)
            for d in later:
                totals.add(d)
            return totals

    def collect(self) -> Iterator[Metric]:
        try:
            totals = self._totals()
        except RoundLogError as exc:
            log.warning("metrics: cannot read the round log: %s", exc)
            totals = _Totals()
        yield totals.rounds.family(
            "silofed_round_duration_seconds", "Duration of finished rounds, by final status.",
            ["status"],
        )  # fmt: skip
        yield totals.phases.family(
            "silofed_phase_duration_seconds", "Duration of round phases.", ["phase"]
        )
        drops = CounterMetricFamily(
            "silofed_dropouts", "Silos that dropped out of a round, by phase.", labels=["phase"]
        )
        for phase, n in sorted(totals.dropouts.items()):
            drops.add_metric([phase], float(n))
        yield drops
        traffic = CounterMetricFamily(
            "silofed_bytes",
            "Protocol bytes of logged rounds as counted by the coordinator (in = from silos).",
            labels=["direction"],
        )
        traffic.add_metric(["in"], float(totals.bytes_in))
        traffic.add_metric(["out"], float(totals.bytes_out))
        yield traffic
        yield GaugeMetricFamily(
            "silofed_rounds_completed", "Completed rounds in the log.",
            value=float(totals.completed),
        )  # fmt: skip
        yield from self._live()

    def _live(self) -> Iterator[Metric]:
        reply = self.status()
        now = self.clock()
        yield GaugeMetricFamily(
            "silofed_connected_silos", "Silos with a live stream.", value=float(len(reply.silos))
        )
        yield GaugeMetricFamily(
            "silofed_current_round", "Round in progress (0 when idle).",
            value=float(reply.current_round),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "silofed_aborted_rounds_in_a_row",
            "Rounds aborted since the last completed one (the coordinator backs off between "
            "them and stops at [rounds] max_consecutive_aborts of one cause).",
            value=float(reply.aborted_in_a_row),
        )
        expiry = GaugeMetricFamily(
            "silofed_cert_expiry_days",
            "Days until each connected silo's certificate expires.",
            labels=["silo"],
        )
        # The same in seconds, for alert rules (docs/pki.md: renewal and expiry warnings).
        expiry_s = GaugeMetricFamily(
            "silofed_cert_expiry_seconds",
            "Seconds until each connected silo's certificate expires (negative: expired).",
            labels=["silo"],
        )
        for s in sorted(reply.silos, key=lambda s: s.silo_id):
            expiry.add_metric([s.silo_id], (s.cert_not_after_unix - now) / 86400)
            expiry_s.add_metric([s.silo_id], s.cert_not_after_unix - now)
        yield expiry
        yield expiry_s


@dataclass(frozen=True, slots=True)
class MetricsServer:
    port: int
    _server: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(
    listen: str, state_dir: Path, status: Callable[[], pb.StatusReply]
) -> MetricsServer:
    """Serve /metrics on `listen` in a daemon thread; write the bound port to state_dir."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(state_dir / LOG_FILENAME, status))
    server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    bound = int(server.server_port)
    tmp = state_dir / (PORT_FILENAME + ".tmp")
    tmp.write_text(f"{bound}\n")
    tmp.replace(state_dir / PORT_FILENAME)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(bound, server, thread)


def start_metrics_from_config(
    config: CoordinatorConfig, status: Callable[[], pb.StatusReply]
) -> MetricsServer | None:
    """The runtime's one hook: start the endpoint when the config has `[metrics] listen`."""
    if config.metrics is None:
        return None
    return start_metrics(config.metrics.listen, config.state_dir, status)

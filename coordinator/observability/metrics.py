"""Prometheus metrics endpoint of the coordinator (`[metrics] listen = "host:port"`; off if absent).

Rule: metrics are computed at scrape time from the two sources of truth, never kept in
parallel: the round log (durations, phases, dropouts, bytes — finished rounds are immutable, so
their figures are cached) and the Hub's live status (connected silos, certificate expiry). The
runtime needs one call, `start_metrics_from_config(config, hub.status)`; the HTTP server runs in
a daemon thread and writes its bound port to `<state_dir>/metrics.port` (listen port 0 works).

Exported: silofed_round_duration_seconds (histogram over finished rounds),
silofed_phase_duration_seconds{phase} (histogram), silofed_dropouts_total{phase},
silofed_bytes_total{direction="in"|"out"} (as seen by the coordinator),
silofed_connected_silos, silofed_cert_expiry_days{silo}, silofed_current_round,
silofed_rounds_completed.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

from coordinator.config import ConfigError
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


class MetricsConfigError(ConfigError):
    """`[metrics]` in the coordinator config is wrong; str() names the file and key."""


def metrics_listen(config_source: Path) -> str | None:
    """`[metrics] listen` of a coordinator TOML file, or None when metrics are off."""
    with config_source.open("rb") as fh:
        table = tomllib.load(fh).get("metrics")
    if table is None:
        return None
    listen = table.get("listen") if isinstance(table, dict) else None
    host, sep, port = listen.rpartition(":") if isinstance(listen, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise MetricsConfigError(
            f'{config_source}: [metrics] listen must be host:port (e.g. "127.0.0.1:9464"), '
            f"got {listen!r}"
        )
    unknown = sorted(set(table) - {"listen"})
    if unknown:
        raise MetricsConfigError(f"{config_source}: [metrics] {unknown[0]} is not a known key")
    return str(listen)


def _histogram(
    name: str, doc: str, samples: dict[tuple[str, ...], list[float]], labels: Sequence[str],
    buckets: Sequence[float],
) -> HistogramMetricFamily:  # fmt: skip
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for label_values, values in sorted(samples.items()):
        counts = [(str(b), float(sum(1 for v in values if v <= b))) for b in buckets]
        counts.append(("+Inf", float(len(values))))
        family.add_metric(list(label_values), counts, sum_value=sum(values))
    return family


@dataclass(eq=False)  # the registry keys collectors by identity
class FederationCollector(Collector):
    """Builds every metric from the round log at `log_path` and `status()` at scrape time."""

    log_path: Path
    status: Callable[[], pb.StatusReply]
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._finished: dict[int, RoundDetail] = {}
        self._lock = threading.Lock()

    def _details(self) -> list[RoundDetail]:
        if not self.log_path.exists():
            return []
        with self._lock, RoundLog.open_readonly(self.log_path) as rl:
            out: list[RoundDetail] = []
            for summary in rl.rounds():
                cached = self._finished.get(summary.round_id)
                if cached is None:
                    cached = rl.round_detail(summary.round_id)
                    if cached.status is not RoundStatus.RUNNING:
                        self._finished[summary.round_id] = cached
                out.append(cached)
            return out

    def collect(self) -> Iterator[Metric]:
        try:
            details = self._details()
        except RoundLogError as exc:
            log.warning("metrics: cannot read the round log: %s", exc)
            details = []
        rounds: dict[tuple[str, ...], list[float]] = {}
        phases: dict[tuple[str, ...], list[float]] = {}
        dropouts: dict[str, int] = {}
        bytes_in = bytes_out = 0
        completed = 0
        for d in details:
            if d.status is RoundStatus.COMPLETED:
                completed += 1
            if d.status is not RoundStatus.RUNNING and d.duration_s is not None:
                rounds.setdefault((d.status.value,), []).append(d.duration_s)
            for p in d.phases:
                if p.duration_s is not None:
                    phases.setdefault((p.phase,), []).append(p.duration_s)
            for drop in d.dropouts:
                dropouts[drop.phase] = dropouts.get(drop.phase, 0) + 1
            bytes_in += sum(s.bytes_in for s in d.silos)
            bytes_out += sum(s.bytes_out for s in d.silos)
        yield _histogram(
            "silofed_round_duration_seconds", "Duration of finished rounds, by final status.",
            rounds, ["status"], ROUND_BUCKETS,
        )  # fmt: skip
        yield _histogram(
            "silofed_phase_duration_seconds", "Duration of round phases.", phases, ["phase"],
            PHASE_BUCKETS,
        )  # fmt: skip
        drops = CounterMetricFamily(
            "silofed_dropouts", "Silos that dropped out of a round, by phase.", labels=["phase"]
        )
        for phase, n in sorted(dropouts.items()):
            drops.add_metric([phase], float(n))
        yield drops
        traffic = CounterMetricFamily(
            "silofed_bytes",
            "Protocol bytes of logged rounds as counted by the coordinator (in = from silos).",
            labels=["direction"],
        )
        traffic.add_metric(["in"], float(bytes_in))
        traffic.add_metric(["out"], float(bytes_out))
        yield traffic
        yield GaugeMetricFamily(
            "silofed_rounds_completed", "Completed rounds in the log.", value=float(completed)
        )
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
        for s in sorted(reply.silos, key=lambda s: s.silo_id):
            expiry.add_metric([s.silo_id], (s.cert_not_after_unix - now) / 86400)
        yield expiry


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
    config: Any, status: Callable[[], pb.StatusReply]
) -> MetricsServer | None:
    """The runtime's one hook: start the endpoint when the config has `[metrics] listen`."""
    listen = metrics_listen(Path(config.source))
    if listen is None:
        return None
    return start_metrics(listen, Path(config.state_dir), status)

"""The coordinator process: the hub, the gRPC server, metrics, signals, and the exit code.

Rule: the composition root. `serve` builds the hub and the server, runs the rounds on the
calling thread until they are done or a signal arrives, and maps how they ended (`Outcome`) to
the process exit code. Nothing else here: the hub and the driver do the work.
"""

from __future__ import annotations

import enum
import logging
import threading
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.runtime import malloc

log = logging.getLogger("silofed.coordinator")


class Outcome(enum.Enum):
    """How `Hub.run_rounds` ended; `serve` maps it to the process exit code."""

    FINISHED = 0  # the log holds [rounds] count completed rounds
    NO_SILOS = 1  # too few silos connected within [rounds] start_timeout_s
    STALLED = 4  # the same cause aborted [rounds] max_consecutive_aborts rounds in a row
    STOPPED = 130  # a signal


def write_port_file(state_dir: Path, port: int) -> Path:
    """Write the bound port atomically, so a reader never sees a half-written number."""
    path = state_dir / "coordinator.port"
    tmp = path.with_suffix(".port.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)
    return path


def serve(config: CoordinatorConfig, *, keep_serving: bool = False) -> int:
    """Run the coordinator until its rounds are done (or forever with `keep_serving`).

    Returns the process exit code (`Outcome`): 0 when the log holds `[rounds] count` completed
    rounds, 1 when too few silos connected in time, 4 when the federation stalled (the same
    cause aborted `[rounds] max_consecutive_aborts` rounds in a row; the diagnosis is logged and
    kept in the round log). Stops cleanly on SIGTERM/SIGINT (exit code 130 for the signal).
    """
    import signal

    from coordinator.observability.metrics import start_metrics_from_config
    from coordinator.observability.progress import start_live_status
    from coordinator.runtime.hub import Hub
    from coordinator.transport.server import ListenError, start_server
    from coordinator.transport.servicer import FederationServicer
    from silofed.task import load_model_factory

    malloc.limit_arenas()
    hub = Hub(config, model_factory=load_model_factory(config.task_spec))
    servicer = FederationServicer(
        hub,
        limits=config.server,
        # One stream per roster member, with room for the roster to grow while serving.
        max_silos=max(64, 2 * len(hub.roster.entries)),
    )
    try:
        running = start_server(
            servicer,
            listen=config.listen,
            ca_cert=config.tls.ca_cert,
            cert=config.tls.cert,
            key=config.tls.key,
            limits=config.server,
        )
    except ListenError as exc:
        hub.roundlog.close()
        raise ListenError(f"{exc}; change [server] listen in {config.source}") from None
    try:
        start_metrics_from_config(config, hub.status)  # [metrics] listen; a daemon thread
    except OSError as exc:
        running.stop()
        hub.roundlog.close()
        raise ListenError(
            f"cannot serve metrics: {exc.strerror or exc}; change [metrics] listen in "
            f"{config.source}"
        ) from None
    live = start_live_status(hub.status)  # round/phase line on a terminal; else a no-op
    interrupted = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("received signal %d: stopping", signum)
        interrupted.set()
        hub.stopping.set()
        with hub.lock:
            hub.changed.notify_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port_file = write_port_file(config.state_dir, running.port)
    log.info(
        "coordinator for federation %s listening on %s (port %d written to %s); aggregation %s",
        config.federation_id,
        config.listen,
        running.port,
        port_file,
        config.rounds.aggregation,
    )
    outcome = Outcome.STOPPED
    try:
        outcome = hub.run_rounds()
        if outcome is Outcome.FINISHED and keep_serving:
            log.info("all rounds done; --keep-serving: streams stay open until a signal")
            hub.stopping.wait()
    finally:
        live.stop()
        hub.close_all(finished=outcome is Outcome.FINISHED)
        running.stop()
        hub.roundlog.close()
    if interrupted.is_set() and outcome is not Outcome.FINISHED:
        return Outcome.STOPPED.value
    return outcome.value

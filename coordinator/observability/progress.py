"""Live progress of a running coordinator on the operator's terminal.

Rule: a display only, never a source of truth. A thread polls a `status()` callable (the Hub's
`status`, the same `StatusReply` that `silofed-coordinator status` and the metrics endpoint
read) twice a second and shows one line at the bottom of the terminal, e.g.

    round 4 (3/10 completed) · phase train for 12.3 s · 3 silos connected

while log lines scroll above it. It runs only when `cmd_serve` enabled it (`configure`), which
it does when stderr is a terminal and `--log-format` is not json: never when piped, in CI or
for log shippers. The runtime's hook is `start_live_status(hub.status)`, which returns a handle
whose `stop()` is always safe to call (a no-op when the display is off).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.text import Text

from protos import federation_pb2 as pb

log = logging.getLogger("silofed.coordinator")

POLL_S = 0.5


@dataclass(slots=True)
class _Settings:
    enabled: bool = False
    total_rounds: int | None = None
    console: Console | None = None


_settings = _Settings()


def configure(
    *, enabled: bool, total_rounds: int | None = None, console: Console | None = None
) -> None:
    """Called by `cmd_serve` before `serve()`: whether `start_live_status` shows anything."""
    _settings.enabled = enabled
    _settings.total_rounds = total_rounds
    _settings.console = console


def describe(reply: pb.StatusReply, now: float, total_rounds: int | None = None) -> str:
    """The one-line view of `reply` at time `now` (unix seconds)."""
    done = (
        f"{reply.rounds_completed}/{total_rounds}" if total_rounds else f"{reply.rounds_completed}"
    )
    silos = len(reply.silos)
    connected = f"{silos} silo{'' if silos == 1 else 's'} connected"
    if not reply.current_round:
        return f"idle ({done} rounds completed) · {connected}"
    where = f"phase {reply.phase or '?'}"
    if reply.phase_started_unix:
        where += f" for {max(0.0, now - reply.phase_started_unix):.1f} s"
    return f"round {reply.current_round} ({done} completed) · {where} · {connected}"


class LiveStatus:
    """Polls `status` on a thread and keeps `describe(...)` at the bottom of `console`."""

    def __init__(
        self,
        status: Callable[[], pb.StatusReply],
        *,
        console: Console,
        total_rounds: int | None = None,
        interval_s: float = POLL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._status = status
        self._console = console
        self._total = total_rounds
        self._interval = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._live = Live(
            Text("starting…"),
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._thread = threading.Thread(target=self._run, name="live-status", daemon=True)
        self.polls = 0

    def start(self) -> LiveStatus:
        self._live.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = describe(self._status(), self._clock(), self._total)
            except Exception as exc:  # a display must never take the coordinator down
                line = f"(status unavailable: {exc})"
            self._live.update(Text(line, style="bold"), refresh=True)
            self.polls += 1
            self._stop.wait(self._interval)

    def stop(self) -> None:
        """Stop polling and remove the line (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self._live.stop()


class _Off:
    """What `start_live_status` returns when the display is off."""

    def stop(self) -> None:
        return None


def start_live_status(status: Callable[[], pb.StatusReply]) -> LiveStatus | _Off:
    """The runtime's hook: start the display if `configure` enabled it; `.stop()` it at the end."""
    if not _settings.enabled:
        return _Off()
    console = _settings.console or Console(stderr=True)
    try:
        return LiveStatus(status, console=console, total_rounds=_settings.total_rounds).start()
    except Exception as exc:  # e.g. another live display already running
        log.warning("live progress display not started: %s", exc)
        return _Off()

"""Live progress on a terminal: the coordinator's round/phase line, the silo's training bar.

Unit level: the line's wording, the poller (a rich console writing to a buffer that claims to be
a terminal), the silo's bar and the hospital task's callback calls. End to end on a pseudo
terminal: `serve` and `run` draw them when stderr is a TTY; never in JSON mode.
"""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from coordinator.observability import progress as coordinator_progress
from coordinator.observability.progress import LiveStatus, describe, start_live_status
from examples.hospital.data import silo_data
from examples.hospital.task import TASK
from protos import federation_pb2 as pb
from silo_agent.observability.progress import TrainingProgress
from silofed import logs
from tests.federation_helpers import (
    RECORDING_SPEC,
    REPO,
    child_env,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)


def reply(
    round_id: int = 0, phase: str = "", started: float = 0.0, silos: int = 3
) -> pb.StatusReply:
    return pb.StatusReply(
        federation_id="f",
        current_round=round_id,
        phase=phase,
        phase_started_unix=started,
        rounds_completed=3,
        silos=[pb.SiloStatus(silo_id=f"spiffe://f/silo/{i}") for i in range(silos)],
    )


def terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


def test_describe_says_round_phase_time_and_silos() -> None:
    assert describe(reply(4, "train", 100.0), 112.34, 10) == (
        "round 4 (3/10 completed) · phase train for 12.3 s · 3 silos connected"
    )
    assert describe(reply(silos=1), 0.0, None) == "idle (3 rounds completed) · 1 silo connected"


def test_live_status_polls_and_draws_until_stopped() -> None:
    console, buffer = terminal()
    calls = threading.Event()
    seen: list[int] = []

    def status() -> pb.StatusReply:
        seen.append(1)
        if len(seen) >= 3:
            calls.set()
        return reply(4, "train", time.time() - 2)

    live = LiveStatus(status, console=console, total_rounds=10, interval_s=0.02).start()
    try:
        assert calls.wait(10), "the status was not polled"
    finally:
        live.stop()
    polled = len(seen)
    time.sleep(0.1)
    assert len(seen) == polled, "still polling after stop()"
    assert "round 4 (3/10 completed) · phase train for 2." in buffer.getvalue()
    live.stop()  # idempotent


def test_a_failing_status_does_not_stop_the_display() -> None:
    console, buffer = terminal()
    count = [0]

    def status() -> pb.StatusReply:
        count[0] += 1
        if count[0] == 1:
            raise RuntimeError("log closed")
        return reply(2, "offer", time.time())

    live = LiveStatus(status, console=console, interval_s=0.02).start()
    deadline = time.monotonic() + 10
    while count[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    live.stop()
    assert count[0] >= 3
    assert "status unavailable: log closed" in buffer.getvalue()
    assert "round 2" in buffer.getvalue()


def test_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> pb.StatusReply:
        raise AssertionError("status polled while the display is off")

    monkeypatch.setattr(coordinator_progress, "_settings", coordinator_progress._Settings())
    handle = start_live_status(never)
    handle.stop()
    assert not isinstance(handle, LiveStatus)
    console, buffer = terminal()
    coordinator_progress.configure(enabled=True, total_rounds=5, console=console)
    live = start_live_status(lambda: reply(1, "offer", time.time()))
    assert isinstance(live, LiveStatus)
    live.stop()


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_enabled_only_on_a_terminal_and_not_json() -> None:
    assert logs.progress_enabled("auto", FakeTty())
    assert logs.progress_enabled("text", FakeTty())
    assert not logs.progress_enabled("json", FakeTty())
    assert not logs.progress_enabled("text", io.StringIO())


def test_training_bar_shows_done_of_total() -> None:
    console, buffer = terminal()
    bar = TrainingProgress(enabled=True, console=console)
    with bar.round(7) as tick:
        tick(1, 4)
        tick("x", 0)  # type: ignore[arg-type]  # nonsense from a task is ignored
        tick(4, 4)
    out = buffer.getvalue()
    assert "round 7 · local training" in out and "4/4" in out

    quiet, silent = terminal()
    with TrainingProgress(enabled=False, console=quiet).round(7) as tick:
        tick(1, 4)
    assert silent.getvalue() == ""


def test_hospital_task_reports_batches_without_changing_training() -> None:
    data = silo_data(0, 3)
    calls: list[tuple[int, int]] = []
    params = {"epochs": 2, "batch_size": 32, "round": 3}
    reported, plain = TASK.build_model(), TASK.build_model()
    with_progress = TASK.train(
        reported, data, {**params, "progress": lambda d, t: calls.append((d, t))}
    )
    without = TASK.train(plain, data, params)
    batches = 2 * -(-len(data.train) // 32)
    assert calls == [(i, batches) for i in range(1, batches + 1)]
    assert with_progress == without
    for a, b in zip(reported.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A non-callable "progress" (e.g. a [train] key) is ignored.
    TASK.train(TASK.build_model(), data, {**params, "progress": "yes"})


# ---- end to end on a pseudo terminal ---------------------------------------------------------


class PtyProcess:
    """A child whose stdout and stderr are a pseudo terminal; its output is read on a thread."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        env = child_env({"TERM": "xterm-256color", "COLUMNS": "160"})
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=slave, stderr=slave, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not shown in {timeout_s} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self._master)


@pytest.mark.e2e
def test_serve_and_run_draw_progress_on_a_terminal(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "ptyfed", ["a"])
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=state, task_spec="examples.hospital.task:TASK",
        rounds=3, min_silos=1, train={"epochs": 40, "batch_size": 8},
    )  # fmt: skip
    started: list[PtyProcess] = []
    try:
        coordinator = PtyProcess(["-m", "coordinator", "serve", "--config", str(cfg)])
        started.append(coordinator)
        port = wait_for_port(state, _AsProc(coordinator))
        toml = write_silo_config(
            tmp_path / "a.toml", fed.silos["a"], port=port,
            task_spec="examples.hospital.task:TASK", options={"silo_index": 0},
        )  # fmt: skip
        silo = PtyProcess(["-m", "silo_agent", "run", "--config", str(toml)])
        started.append(silo)
        coordinator.wait_for("(0/3 completed) · phase", 60)
        silo.wait_for("local training", 60)
        assert coordinator.popen.wait(timeout=120) == 0, coordinator.output()[-3000:]
        assert "1 silo connected" in coordinator.output()
    finally:
        for proc in reversed(started):
            proc.stop()


class _AsProc:
    """Enough of federation_helpers.Proc for wait_for_port."""

    def __init__(self, proc: PtyProcess) -> None:
        self.popen = proc.popen

    def log(self) -> str:
        return ""


@pytest.mark.e2e
def test_no_progress_when_piped_or_json(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "pipefed", ["a"])
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=state, task_spec=RECORDING_SPEC, rounds=1,
        min_silos=1, start_timeout_s=1.5,  # three polls of the live line (POLL_S) if it were on
    )  # fmt: skip
    piped = subprocess.run(
        [sys.executable, "-m", "coordinator", "serve", "--config", str(cfg)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 1  # gave up waiting for silos
    assert "idle (" not in piped.stderr and "\x1b[" not in piped.stderr, piped.stderr
    (state / "coordinator.port").unlink()
    on_tty = PtyProcess(
        ["-m", "coordinator", "serve", "--config", str(cfg), "--log-format", "json"]
    )
    try:
        assert on_tty.popen.wait(timeout=60) == 1
    finally:
        on_tty.stop()
    assert "idle (" not in on_tty.output() and "\x1b[" not in on_tty.output()

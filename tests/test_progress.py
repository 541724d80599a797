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
import tempfile
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
from tests import launcher
from tests.federation_helpers import (
    RECORDING_SPEC,
    REPO,
    child_env,
    free_port,
    provision,
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


class OutputProcess:
    """A child whose stdout and stderr are one pseudo terminal (`tty`) or one pipe (a FIFO under
    `tmp`); its output is read on a thread. Forked from the tests' warm launcher (it does not
    import torch again), which opens that terminal or pipe by path as the child's fd 1 and 2."""

    def __init__(self, args: list[str], *, tty: bool, tmp: Path, name: str) -> None:
        env = child_env({"TERM": "xterm-256color", "COLUMNS": "160"})
        self._chunks: list[bytes] = []
        self._keep: int | None = None  # our copy of the terminal's child end, closed in stop()
        if tty:
            master, self._keep = pty.openpty()
            path = Path(os.ttyname(self._keep))
            self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        else:
            path = tmp / f"{name}.fifo"
            os.mkfifo(path)
            self._reader = threading.Thread(target=self._read_fifo, args=(path,), daemon=True)
        self._reader.start()
        self.popen: subprocess.Popen[bytes] | launcher.LaunchedProcess
        if launcher.enabled():
            status_dir = Path(tempfile.gettempdir()) / f"silofed-launcher-{os.getpid()}"
            self.popen = launcher.launch(args, env, REPO, path, status_dir)
        else:
            with path.open("wb", buffering=0) as out:
                self.popen = subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=out, start_new_session=True,
                )  # fmt: skip

    def _read(self, fd: int) -> None:
        try:
            while data := os.read(fd, 65536):
                self._chunks.append(data)
        except OSError:  # EIO: no process holds the terminal's child end any more
            pass
        finally:
            os.close(fd)

    def _read_fifo(self, path: Path) -> None:
        with path.open("rb", buffering=0) as fifo:  # returns once the child has opened it
            self._read(os.dup(fifo.fileno()))

    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                self._reader.join(timeout=5)
                if text in self.output():
                    return
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} not shown in {timeout_s} s (exit {self.popen.poll()}):\n"
            + self.output()[-3000:]
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        if self._keep is not None:
            os.close(self._keep)
            self._keep = None
        self._reader.join(timeout=5)


@pytest.mark.e2e
def test_serve_and_run_draw_progress_on_a_terminal(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "ptyfed", ["a"])
    port = free_port()  # known before the coordinator binds: the silo starts alongside it
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=tmp_path / "coord",
        task_spec="examples.hospital.task:TASK", rounds=3, min_silos=1,
        train={"epochs": 40, "batch_size": 8}, listen=f"127.0.0.1:{port}",
    )  # fmt: skip
    toml = write_silo_config(
        tmp_path / "a.toml", fed.silos["a"], port=port,
        task_spec="examples.hospital.task:TASK", options={"silo_index": 0},
    )  # fmt: skip
    started: list[OutputProcess] = []
    try:
        for name, args in (
            ("coordinator", ["-m", "coordinator", "serve", "--config", str(cfg)]),
            ("silo", ["-m", "silo_agent", "run", "--config", str(toml)]),
        ):
            started.append(OutputProcess(args, tty=True, tmp=tmp_path, name=name))
        coordinator, silo = started
        coordinator.wait_for("(0/3 completed) · phase", 60)
        silo.wait_for("local training", 60)
        assert coordinator.popen.wait(timeout=120) == 0, coordinator.output()[-3000:]
        assert "1 silo connected" in coordinator.output()
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.mark.e2e
def test_no_progress_when_piped_or_json(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "pipefed", ["a"])
    configs = [
        write_coordinator_config(
            tmp_path / f"{name}.toml",
            fed,
            state_dir=tmp_path / name,
            task_spec=RECORDING_SPEC,
            rounds=1,
            min_silos=1,
            start_timeout_s=1.5,  # three polls of the live line (POLL_S) if it were on
        )  # fmt: skip
        for name in ("piped", "tty")
    ]
    # Side by side, each on its own state directory: serve with its output on a pipe, and serve
    # on a terminal asked for JSON logs. Both give up waiting for silos.
    started: list[OutputProcess] = []
    try:
        started.append(
            OutputProcess(
                ["-m", "coordinator", "serve", "--config", str(configs[0])],
                tty=False,
                tmp=tmp_path,
                name="piped",
            )  # fmt: skip
        )
        started.append(
            OutputProcess(
                ["-m", "coordinator", "serve", "--config", str(configs[1]), "--log-format", "json"],
                tty=True,
                tmp=tmp_path,
                name="tty",
            )  # fmt: skip
        )
        piped, on_tty = started
        assert piped.popen.wait(timeout=60) == 1, piped.output()  # gave up waiting for silos
        assert on_tty.popen.wait(timeout=60) == 1, on_tty.output()
    finally:
        for proc in reversed(started):
            proc.stop()
    # What was read is the processes' output (the check below is not about an empty capture).
    assert "listening on" in piped.output() and "listening on" in on_tty.output()
    assert "idle (" not in piped.output() and "\x1b[" not in piped.output(), piped.output()
    assert "idle (" not in on_tty.output() and "\x1b[" not in on_tty.output()

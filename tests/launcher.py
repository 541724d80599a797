"""Start the coordinator and silo agents as real, separate processes — forked from a warm parent.

Rule: every process an end-to-end test starts is still its own OS process, started with its own
arguments, environment, working directory, session and log file, running the same `python -m
<package>` entry point as a user's; it can be SIGKILLed by PID and its exit status is the real one.
What is shared is only the work done before `main` runs: a long-lived *launcher* process per
pytest worker imports the heavy libraries once (torch alone costs about 1.7 s of CPU per start on
the CI machine, and the e2e step starts a few hundred processes), and then forks one child per
request. The launcher has started no thread, opened no gRPC channel and seeded nothing that the
children would share (Python's `random` reseeds after `fork`; torch's default seed is the same in
every process anyway), so a child is what a fresh interpreter would be after those imports.

The launcher is not the test's child's parent as `subprocess` would be: it reaps its children and
writes each exit status to `<status_dir>/<pid>`, and `LaunchedProcess` (the subset of
`subprocess.Popen` the tests use: pid, poll, wait, returncode, send_signal, terminate, kill) reads
it. Set SILOFED_TEST_NO_LAUNCHER=1 to start every process with a fresh interpreter instead.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Imported once in the launcher so that a child starts without paying for them.
PRELOAD = ("torch", "numpy", "safetensors.torch", "cryptography.x509", "google.protobuf")
POLL_S = 0.02


# ---- the launcher process (runs `python tests/launcher.py <status_dir>`) ---------------------


def _serve(status_dir: Path) -> dict[str, Any] | None:
    """Read one JSON request per line on stdin; fork a child for each, answer its PID on stdout.
    Returns the request in the child (which then runs it); None in the launcher at EOF."""
    children: set[int] = set()
    stdin = sys.stdin.buffer
    buffered = b""
    while True:
        _reap(children, status_dir)
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the test process is gone: children keep running, as with subprocess
            while children:  # but their statuses are still written until they end
                _reap(children, status_dir)
                time.sleep(POLL_S)
            return None
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                return dict(request)
            children.add(pid)
            os.write(sys.stdout.fileno(), f"{pid}\n".encode())


def _reap(children: set[int], status_dir: Path) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            tmp = status_dir / f"{pid}.tmp"
            tmp.write_text(str(os.waitstatus_to_exitcode(status)))
            tmp.replace(status_dir / str(pid))


def _become(request: dict[str, Any]) -> str:
    """In the forked child: take the request's session, directory, environment, output and
    arguments. Returns the module to run as __main__."""
    os.setsid()
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()
    os.environ.clear()
    os.environ.update(request["env"])
    out = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.close(devnull)
    # PYTHONUNBUFFERED as the child's environment asks: the tests read the log while it runs.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own descriptor
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    args = list(request["args"])
    if args[:1] != ["-m"] or len(args) < 2:
        raise SystemExit(f"launcher: only `-m module args...` is supported, not {args!r}")
    sys.argv = [args[1], *args[2:]]
    return str(args[1])


def _launcher_main(status_dir: Path) -> None:
    # As under `python -m`: the working directory (the repository) first on the path, not this
    # file's folder (tests/secagg would shadow the real secagg package).
    sys.path[0] = os.getcwd()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C goes to pytest, which stops the children
    for module in PRELOAD:
        __import__(module)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    request = _serve(status_dir)
    if request is None:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module = _become(request)
    import runpy

    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException:  # as the interpreter would: the traceback on stderr, status 1
        import traceback

        traceback.print_exc()
        code = 1
    _finish(code)


def _exit_status(code: object) -> int:
    """What `sys.exit(code)` makes the process's status (None is 0, a message is 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish(code: int) -> None:
    """Exit as the interpreter would, minus tearing down torch's modules one by one (0.5-0.8 s
    per process with torch loaded, 2-3 s under load): wait for non-daemon threads, run atexit
    handlers (logging flushes there), flush the standard streams, then leave."""
    threading_shutdown = getattr(threading, "_shutdown", None)
    if threading_shutdown is not None:
        threading_shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ---- the test side ---------------------------------------------------------------------------


class _Launcher:
    """One launcher process for this pytest process, started on first use."""

    def __init__(self, status_dir: Path, repo: Path) -> None:
        self.status_dir = status_dir
        status_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(status_dir)],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        if self.stdout.readline() != b"ready\n":
            raise RuntimeError("the test launcher did not start")

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> int:
        request = {"args": args, "env": env, "cwd": str(cwd), "log": str(log)}
        with self.lock:
            self.stdin.write(json.dumps(request).encode() + b"\n")
            self.stdin.flush()
            answer = self.stdout.readline()
        if not answer.strip():
            raise RuntimeError(f"the test launcher exited ({self.proc.poll()})")
        return int(answer)

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def _get_launcher(status_dir: Path, repo: Path) -> _Launcher:
    global _launcher
    with _launcher_lock:
        if _launcher is None or _launcher.proc.poll() is not None:
            _launcher = _Launcher(status_dir, repo)
        return _launcher


def stop_launcher() -> None:
    """End the launcher (its children have been stopped by their tests already)."""
    global _launcher
    with _launcher_lock:
        if _launcher is not None:
            _launcher.close()
            _launcher = None


def enabled() -> bool:
    return os.environ.get("SILOFED_TEST_NO_LAUNCHER", "") != "1"


@dataclass
class LaunchedProcess:
    """The part of `subprocess.Popen` the tests use, for a process the launcher forked."""

    pid: int
    status_file: Path
    args: list[str]
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.status_file.exists():
            self.returncode = int(self.status_file.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(POLL_S)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a PID that may have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def launch(
    args: list[str], env: dict[str, str], cwd: Path, log: Path, status_dir: Path
) -> LaunchedProcess:
    """Start `python <args>` (args begin with `-m module`) as a forked child of the launcher."""
    launcher = _get_launcher(status_dir, cwd)
    pid = launcher.spawn(args, env, cwd, log)
    return LaunchedProcess(pid, launcher.status_dir / str(pid), [sys.executable, *args])


if __name__ == "__main__":
    _launcher_main(Path(sys.argv[1]))

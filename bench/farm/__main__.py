"""`python -m bench.farm`: host one real silo agent per config file on threads of this process.

See bench/farm/__init__.py for what the farm shares, how silos are ended and how CPU seconds
are counted. Exit code 0 when every silo ended with code 0 or was cut on request, 130 when a
signal stopped the farm, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Before torch is imported (in a fresh interpreter): one thread per BLAS/OpenMP pool.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.farm.cpu_log import write_sample  # noqa: E402
from bench.farm.owners import ThreadOwners  # noqa: E402
from silo_agent.config import SiloConfig, load_silo_config  # noqa: E402
from silo_agent.pki.preflight import preflight  # noqa: E402
from silo_agent.runtime.runner import EXIT_OK, EXIT_STOPPED, SiloRunner  # noqa: E402
from silo_agent.storage.state_lock import hold  # noqa: E402
from silofed.task import load_task  # noqa: E402

log = logging.getLogger("silofed.farm")

JOIN_S = 30.0  # per silo thread, once asked to stop
CUT_PREFIX = "cut-"
DONE_SUFFIX = ".done"


@dataclass
class FarmedSilo:
    """One silo agent of the farm: its runner, the thread running it, its exit code."""

    name: str
    runner: SiloRunner
    lock: IO[str]  # the state directory's flock, held while the silo runs
    thread: threading.Thread = field(init=False)
    code: int | None = None
    cut: bool = False

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"silo {self.name}", daemon=True)

    def _run(self) -> None:
        try:
            self.code = self.runner.run()
        except Exception:  # a bug in one silo ends that silo, not the farm
            log.exception("silo %s failed", self.name)
            self.code = 1
        finally:
            self.lock.close()


def build_silo(path: Path) -> FarmedSilo:
    """A silo agent for the config at `path`, built as silo_agent/commands/run.py builds it."""
    config: SiloConfig = load_silo_config(path)
    lock = hold(config.state_dir)
    try:
        silo_id = preflight(config, now=dt.datetime.now(dt.UTC))
        task = load_task(config.task_spec)
        data = task.load_data(config.task_options)
    except BaseException:
        lock.close()
        raise
    runner = SiloRunner(config, task, data, silo_id)
    return FarmedSilo(config.name or path.stem, runner, lock)


class _SiloTag(logging.Filter):
    """Adds `silo`: the silo the logging thread works for ("farm" for the farm's own)."""

    def __init__(self, owners: ThreadOwners) -> None:
        super().__init__()
        self.owners = owners

    def filter(self, record: logging.LogRecord) -> bool:
        record.silo = self.owners.silo_of(threading.current_thread()) or "farm"
        return True


def _setup_logging(level: str, owners: ThreadOwners) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(silo)s] %(name)s: %(message)s")
    )
    handler.addFilter(_SiloTag(owners))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _cut_requested(control: Path | None, silos: dict[str, FarmedSilo]) -> None:
    """Cut every silo named by a `cut-<name>` file in `control` and not cut yet."""
    if control is None:
        return
    for name, silo in silos.items():
        request = control / f"{CUT_PREFIX}{name}"
        if not silo.cut and request.exists():
            log.warning("cutting silo %s (%s)", name, request)
            silo.cut = True
            silo.runner.request_stop()
            request.with_name(request.name + DONE_SUFFIX).write_text(f"{time.time()}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("configs", nargs="+", type=Path, help="silo TOML files, one per silo")
    parser.add_argument("--cpu-log", type=Path, required=True, help="CPU samples (JSON lines)")
    parser.add_argument("--control-dir", type=Path, help="where cut-<name> files cut a silo")
    parser.add_argument("--sample-s", type=float, default=0.2, help="CPU sample interval")
    parser.add_argument(
        "--max-s", type=float, default=3600.0, help="stop every silo after this many seconds"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when every silo ended with code 0 or was cut on request, 130 when a signal
    stopped the farm, else 1."""
    args = _parse(argv)
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only possible before any inter-op work
        torch.set_num_interop_threads(1)
    owners = ThreadOwners()
    owners.install()
    _setup_logging(args.log_level, owners)
    silos = {s.name: s for s in (build_silo(path) for path in args.configs)}
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("received signal %d: stopping %d silos", signum, len(silos))
        stopping.set()  # the loop below stops them (request_stop takes a lock: not in here)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("farm of %d silos, pid %d", len(silos), os.getpid())
    for silo in silos.values():
        owners.start_for(silo.name, silo.thread)
    deadline = time.monotonic() + args.max_s
    with args.cpu_log.open("a", encoding="utf-8") as cpu_log:
        while not stopping.is_set() and time.monotonic() < deadline:
            if not any(s.thread.is_alive() for s in silos.values()):
                break
            _cut_requested(args.control_dir, silos)
            write_sample(cpu_log, owners.cpu_s())
            stopping.wait(args.sample_s)
        for silo in silos.values():  # --max-s passed or a signal: nothing is left running
            silo.runner.request_stop()
        for silo in silos.values():
            silo.thread.join(JOIN_S)
        write_sample(cpu_log, owners.cpu_s())
    if stopping.is_set():
        return EXIT_STOPPED
    failed = {n: s.code for n, s in silos.items() if s.code != EXIT_OK and not s.cut}
    if failed:
        log.error("silos that did not end cleanly (exit codes): %s", failed)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

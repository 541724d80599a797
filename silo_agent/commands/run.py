"""`silofed-silo run`: join the federation and train on local data until told to stop.

Rule: argument parsing, logging and progress-display setup and signal wiring only; the loop is
`SiloRunner`.
Exit codes: 0 done (federation finished or --rounds reached), 2 bad configuration or task
(including a task whose `load_data` fails), 3 refused (our own certificate check or the
coordinator's), 4 another agent already runs with this state directory, 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
from pathlib import Path
from typing import Any

from silo_agent.config import ConfigError, load_silo_config
from silofed import logs

log = logging.getLogger("silofed.silo")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("run", help="connect to the coordinator and take part in rounds")
    p.add_argument("--config", required=True, type=Path, help="silo TOML file")
    p.add_argument(
        "--rounds", type=int, default=None, help="stop after taking part in N completed rounds"
    )
    p.add_argument(
        "--serve-forever",
        action="store_true",
        help="when a federation run finishes, wait for the next one (reconnecting with "
        "backoff) instead of exiting",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    logs.add_log_format_argument(p)  # --log-format auto|text|json
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.setup_logging(args.log_level, args.log_format)
    from silo_agent.observability import progress

    # A local-training progress bar on a terminal only (never in JSON mode or when piped).
    progress.configure(enabled=logs.progress_enabled(args.log_format), console=logs.console())
    from silo_agent.pki.preflight import preflight
    from silo_agent.runtime.runner import SiloRunner
    from silo_agent.storage.state_lock import hold
    from silofed.task import load_task

    # ConfigError, TaskLoadError, StateDirBusy and PreflightError end the command with the exit
    # codes of silo_agent.cli's EXIT_CODES.
    config = load_silo_config(args.config)
    if args.rounds is not None and args.rounds <= 0:
        raise ConfigError("--rounds must be > 0")
    lock = hold(config.state_dir)  # held until the process exits
    silo_id = preflight(config, now=dt.datetime.now(dt.UTC))
    task = load_task(config.task_spec)
    data = _load_data(task, config)
    runner = SiloRunner(
        config, task, data, silo_id, max_rounds=args.rounds, serve_forever=args.serve_forever
    )

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("received signal %d: stopping", signum)
        runner.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("silo %s starting; coordinator %s", silo_id, config.address)
    try:
        return runner.run()
    finally:
        lock.close()


def _load_data(task: Any, config: Any) -> Any:
    """The task's `load_data`, whose failure (any exception: it is the task's own code) is a
    configuration problem of this silo, reported in one line rather than a traceback."""
    from silofed.task import TaskLoadError

    try:
        return task.load_data(config.task_options)
    except Exception as exc:
        raise TaskLoadError(
            f"task {config.task_spec}: load_data failed: {type(exc).__name__}: {exc}; fix "
            f"[task.options] in {config.source}"
        ) from exc

"""`silofed-coordinator serve`: run the coordinator from its TOML configuration.

Rule: argument parsing, logging and progress-display setup only; the work is
`coordinator.runtime.serve.serve`. Errors are raised, not caught: coordinator.cli's EXIT_CODES
maps them to exit codes. Configuration errors, task-loading errors, a damaged rollback
intent (`<state_dir>/rollback.json`) and an address that cannot be bound (the port in use) end
the process with exit code 2 and one line naming the file and key (or the task spec) to fix.
Exit codes: 0 finished, 1 too few silos connected in time, 2 as above, 4 stalled (the same cause
aborted [rounds] max_consecutive_aborts rounds in a row; the diagnosis is logged), 130 signal.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from coordinator.config import ConfigError, load_coordinator_config
from silofed import logs

# TLS refusals (a foreign CA, an expired certificate, a plain-TCP client) happen inside grpc
# core before any Python code runs; grpc logs their cause ("Handshake failed ... certificate has
# expired") only at INFO verbosity, and reads the setting once, when grpc is first loaded. An
# operator's explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "INFO")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("serve", help="serve the federation and run its rounds")
    p.add_argument("--config", required=True, type=Path, help="coordinator TOML file")
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the streams open after the last round instead of exiting",
    )
    p.add_argument("--rounds", type=int, default=None, help="override [rounds] count")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    logs.add_log_format_argument(p)  # --log-format auto|text|json
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until the federation ends; the exit codes of its errors are coordinator.cli's
    EXIT_CODES."""
    logs.setup_logging(args.log_level, args.log_format)
    from dataclasses import replace

    from coordinator.observability import progress
    from coordinator.runtime.serve import serve

    config = load_coordinator_config(args.config)
    if args.rounds is not None:
        if args.rounds <= 0:
            raise ConfigError("--rounds must be > 0")
        config = replace(config, rounds=replace(config.rounds, count=args.rounds))
    # The live line (round, phase, time in phase, silos) on a terminal only; serve() starts it
    # with the hub's status.
    progress.configure(
        enabled=logs.progress_enabled(args.log_format),
        total_rounds=config.rounds.count,
        console=logs.console(),
    )
    return serve(config, keep_serving=args.keep_serving)

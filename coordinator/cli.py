"""`silofed-coordinator` (also `python -m coordinator`): the coordinator operator's commands.

Each command lives in its own `cmd_*` module that registers its subparser here; a command's
function takes the parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

# grpc reads its verbosity once, when first imported, and logs the cause of a refused TLS
# handshake (foreign CA, expired certificate, plain TCP) only at INFO: set it before any
# command module can import grpc, so those causes reach the coordinator's log.
os.environ.setdefault("GRPC_VERBOSITY", "INFO")

from coordinator import cmd_pki, cmd_rollback, cmd_rounds, cmd_serve, cmd_status

COMMAND_MODULES = (cmd_serve, cmd_pki, cmd_rounds, cmd_status, cmd_rollback)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silofed-coordinator",
        description="Run a silofed federation: provision it, serve rounds, inspect the round log.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code

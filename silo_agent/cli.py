"""`silofed-silo` (also `python -m silo_agent`): the silo operator's commands.

Each command lives in its own `cmd_*` module that registers its subparser here; a command's
function takes the parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from silo_agent import cmd_check, cmd_enroll, cmd_ledger, cmd_run

COMMAND_MODULES = (cmd_enroll, cmd_run, cmd_check, cmd_ledger)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silofed-silo",
        description="Run a silofed silo agent: enroll, join the federation, train on local data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code

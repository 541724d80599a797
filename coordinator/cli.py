"""`silofed-coordinator` (also `python -m coordinator`): the coordinator operator's commands.

Each command lives in its own `cmd_*` module that registers its subparser here; a command's
function takes the parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from coordinator import cmd_pki, cmd_rounds, cmd_serve

COMMAND_MODULES = (cmd_serve, cmd_pki, cmd_rounds)


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

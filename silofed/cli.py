"""The shape both roles' console scripts share: one subcommand per `cmd_*` module.

Rule: a command module registers its subparser (`register(sub)`) and sets `func`, which takes
the parsed arguments and returns the process exit code; a role's cli declares one `Program`
(its name, a sentence, its modules) and nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class CommandModule(Protocol):
    """A `cmd_*` module: adds its subcommand (with `func` set) to a role's parser."""

    def register(self, sub: argparse._SubParsersAction[Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Program:
    """A role's console script: `prog COMMAND ...`, one command per module, in the order given."""

    prog: str
    description: str
    modules: Sequence[CommandModule]

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for module in self.modules:
            module.register(sub)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse `argv` (None: the process's) and run the chosen command; its exit code."""
        args = self.parser().parse_args(argv)
        code: int = args.func(args)
        return code

"""The shape both roles' console scripts share: one subcommand per command module, and one table
of the exceptions that end a command with a documented exit code.

Rule: a command module registers its subparser (`register(sub)`) and sets `func`, which takes
the parsed arguments and returns the process exit code; a role's cli declares one `Program`
(its name, a sentence, its modules, its exit-code table) and nothing else. A command raises the
ordinary errors (a bad config, a damaged log, a taken port) and never catches them to pick an
exit code: the role's table (`ExitOn` rows) says which code each one ends which command with,
and how its one-line message reaches the operator. An exception the table does not name
propagates (a traceback is a bug to fix, not an operator's mistake).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class CommandModule(Protocol):
    """A command module: adds its subcommand (with `func` set) to a role's parser."""

    def register(self, sub: argparse._SubParsersAction[Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class ExitOn:
    """One row of a role's exit-code table: `command` ending with an exception of one of
    `errors` exits with `code` after one line, `prefix` + the exception's message.

    `errors` name classes as "package.module:Class" and are resolved only when an exception
    escapes a command, from the modules already imported (an exception cannot be an instance of
    a class whose module was never loaded): declaring the table imports nothing, so a command
    keeps its heavy imports (grpc, torch) lazy. `logged`: the line goes to the role's logger, as
    the command's other output does (a long-running command with `--log-format`); otherwise it
    goes to stderr as "error: <message>" (a one-shot command whose stdout is its answer).
    """

    command: str
    code: int
    errors: tuple[str, ...]
    logged: bool = False
    prefix: str = ""

    def matches(self, command: str, exc: BaseException) -> bool:
        return command == self.command and any(
            isinstance(exc, cls) for cls in _loaded_classes(self.errors)
        )

    def report(self, exc: BaseException, logger: str) -> None:
        if self.logged:
            logging.getLogger(logger).error("%s%s", self.prefix, exc)
        else:
            print(f"error: {self.prefix}{exc}", file=sys.stderr)


def _loaded_classes(names: Sequence[str]) -> list[type]:
    """The classes of `names` whose modules are loaded (see ExitOn)."""
    found = []
    for name in names:
        module_name, _, class_name = name.partition(":")
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return found


def resolve(name: str) -> type[BaseException]:
    """The exception class "package.module:Class" names, importing its module (for the test
    that every row of every table names a real exception class)."""
    import importlib

    module_name, _, class_name = name.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError(f"{name} is not an exception class")
    return cls


@dataclass(frozen=True, slots=True)
class Program:
    """A role's console script: `prog COMMAND ...`, one command per module, in the order given;
    `exit_codes` is its table (ExitOn), `logger` the logger its logged errors go to."""

    prog: str
    description: str
    modules: Sequence[CommandModule]
    exit_codes: Sequence[ExitOn] = ()
    logger: str = "silofed"

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for module in self.modules:
            module.register(sub)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse `argv` (None: the process's) and run the chosen command; its exit code, or the
        table's for the exception it ended with."""
        args = self.parser().parse_args(argv)
        try:
            code: int = args.func(args)
        except Exception as exc:
            for row in self.exit_codes:
                if row.matches(args.command, exc):
                    row.report(exc, self.logger)
                    return row.code
            raise
        return code

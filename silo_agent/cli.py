"""`silofed-silo` (also `python -m silo_agent`): the silo operator's commands.

Each command lives in its own `cmd_*` module, listed in PROGRAM (silofed.cli.Program), which
registers its subparser; a command's function takes the parsed arguments and returns the
process exit code.
"""

from __future__ import annotations

from silo_agent.commands import check as cmd_check
from silo_agent.commands import enroll as cmd_enroll
from silo_agent.commands import ledger as cmd_ledger
from silo_agent.commands import run as cmd_run
from silofed.cli import Program

PROGRAM = Program(
    "silofed-silo",
    "Run a silofed silo agent: enroll, join the federation, train on local data.",
    (cmd_enroll, cmd_run, cmd_check, cmd_ledger),
)
build_parser = PROGRAM.parser
main = PROGRAM.main

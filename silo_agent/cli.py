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
from silofed.cli import ExitOn, Program

# The exceptions that end a command with a documented exit code (silofed.cli.ExitOn), named, not
# imported. Codes the commands return themselves: run 0 done, 3 the coordinator refused this
# identity (runtime.runner.EXIT_REFUSED), 130 stopped by a signal; ledger 1 mismatch; check and
# enroll 1 a failed check or enrollment.
EXIT_CODES = (
    # A configuration or task to fix (including a task whose load_data fails).
    ExitOn(
        "run",
        2,
        ("silo_agent.config:ConfigError", "silofed.task:TaskLoadError"),
        logged=True,
    ),
    # Our own certificate cannot work (expired, foreign CA, not on the roster, wrong key): the
    # same code as the coordinator's refusal.
    ExitOn("run", 3, ("silo_agent.pki.preflight:PreflightError",), logged=True),
    # The state directory needs the operator: another agent runs with it (the line names its
    # pid), or its secure-aggregation state is damaged (restore it: docs/runbooks.md). A restart
    # would only repeat either.
    ExitOn(
        "run",
        4,
        (
            "silo_agent.storage.state_lock:StateDirBusy",
            "silo_agent.storage.silo_state:SiloStateError",
        ),
        logged=True,
    ),
    # No ledger or export to read, an unreadable one, a command line not saying which silo.
    ExitOn(
        "ledger",
        1,
        (
            "silo_agent.storage.ledger_verify:LedgerError",
            "silo_agent.config:ConfigError",
            "silo_agent.commands.ledger:UsageError",
        ),
    ),
)

PROGRAM = Program(
    "silofed-silo",
    "Run a silofed silo agent: enroll, join the federation, train on local data.",
    (cmd_enroll, cmd_run, cmd_check, cmd_ledger),
    exit_codes=EXIT_CODES,
    logger="silofed.silo",
)
build_parser = PROGRAM.parser
main = PROGRAM.main

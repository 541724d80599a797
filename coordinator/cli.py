"""`silofed-coordinator` (also `python -m coordinator`): the coordinator operator's commands.

Each command lives in its own `cmd_*` module, listed in PROGRAM (silofed.cli.Program), which
registers its subparser; a command's function takes the parsed arguments and returns the
process exit code.
"""

from __future__ import annotations

import os

# grpc reads its verbosity once, when first imported, and logs the cause of a refused TLS
# handshake (foreign CA, expired certificate, plain TCP) only at INFO: set it before any
# command module can import grpc, so those causes reach the coordinator's log.
os.environ.setdefault("GRPC_VERBOSITY", "INFO")

from coordinator.commands import pki as cmd_pki
from coordinator.commands import rollback as cmd_rollback
from coordinator.commands import rounds as cmd_rounds
from coordinator.commands import serve as cmd_serve
from coordinator.commands import status as cmd_status
from silofed.cli import ExitOn, Program

# The exceptions that end a command with a documented exit code (silofed.cli.ExitOn), named, not
# imported. Codes the commands return themselves: serve 0 finished, 1 too few silos connected in
# time, 4 stalled (the same cause aborted [rounds] max_consecutive_aborts rounds in a row), 130
# signal; rounds 0 done.
EXIT_CODES = (
    # A configuration or task spec to fix: the line names the file and key, or the spec.
    ExitOn(
        "serve",
        2,
        ("coordinator.config:ConfigError", "silofed.task:TaskLoadError"),
        logged=True,
    ),
    # A damaged or unusable <state_dir>/rollback.json; a port in use or an address not this
    # machine's; a checkpoint or a server optimizer state that is damaged or belongs to another
    # method, layout or model.
    ExitOn(
        "serve",
        2,
        (
            "coordinator.storage.rollback:RollbackError",
            "coordinator.transport.server:ListenError",
            "coordinator.storage.checkpoints:CheckpointCorrupt",
            "coordinator.rounds.server_optimizer:ServerOptimizerStateError",
        ),
        logged=True,
        prefix="cannot start: ",
    ),
    # No log, an unreadable log, no such round, unknown metric, a checkpoint not matching the log.
    ExitOn(
        "rounds",
        1,
        ("coordinator.commands.rounds:CommandError", "coordinator.storage.roundlog:RoundLogError"),
    ),
)

PROGRAM = Program(
    "silofed-coordinator",
    "Run a silofed federation: provision it, serve rounds, inspect the round log.",
    (cmd_serve, cmd_pki, cmd_rounds, cmd_status, cmd_rollback),
    exit_codes=EXIT_CODES,
    logger="silofed.coordinator",
)
build_parser = PROGRAM.parser
main = PROGRAM.main

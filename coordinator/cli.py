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
from silofed.cli import Program

PROGRAM = Program(
    "silofed-coordinator",
    "Run a silofed federation: provision it, serve rounds, inspect the round log.",
    (cmd_serve, cmd_pki, cmd_rounds, cmd_status, cmd_rollback),
)
build_parser = PROGRAM.parser
main = PROGRAM.main

"""`silofed-coordinator rollback --to N`: start the next round from round N's checkpoint.

Rule: validation and the intent file only (`coordinator.storage.rollback`); the coordinator honours
the
intent at its next start and records `rollback_of = N` on the first round it then runs. Run it
with the coordinator stopped (or stop and restart it afterwards). `--cancel` removes a pending
intent, and also a damaged intent file (which `serve` refuses to start with, exit 2; `--to`
refuses to overwrite one unseen, exit 2). Exit codes: 0 recorded, 1 bad round / unreadable log,
2 damaged intent file (the message says what to do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.config import ConfigError, load_coordinator_config
from coordinator.storage.rollback import (
    INTENT_FILENAME,
    IntentDamaged,
    RollbackError,
    discard,
    pending,
    request,
)
from coordinator.storage.roundlog import LOG_FILENAME, RoundLog, RoundLogError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "rollback",
        help="make the next round start from the checkpoint of an earlier round N",
        description="Record a rollback; the coordinator honours it at its next start.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="coordinator TOML file")
    where.add_argument("--state-dir", type=Path, help="the coordinator's [federation] state_dir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--to", type=int, help="completed round whose model to start from (0: initial)"
    )
    what.add_argument("--cancel", action="store_true", help="remove a pending rollback")
    p.add_argument("--reason", default="", help="why (kept in the intent file)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        state_dir: Path = (
            load_coordinator_config(args.config).state_dir
            if args.config is not None
            else args.state_dir
        )
        if not state_dir.is_dir():
            raise RollbackError(
                f"state directory {state_dir} does not exist; pass the coordinator's "
                "[federation] state_dir"
            )
        if args.cancel:
            intent, damage = discard(state_dir)
            doc: dict[str, Any] = {"cancelled": None if intent is None else intent.to}
            if damage is not None:
                doc["removed_damaged"] = str(state_dir / INTENT_FILENAME)
                text = f"removed the damaged rollback intent {state_dir / INTENT_FILENAME}"
            elif intent is None:
                text = "no rollback was pending"
            else:
                text = f"cancelled rollback to round {intent.to}"
        else:
            # A damaged intent is not overwritten unseen: IntentDamaged (exit 2) says to
            # remove it with --cancel first.
            before = pending(state_dir)
            with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
                ckpt = request(state_dir, log, args.to, now=time.time(), reason=args.reason)
                next_round = log.last_round_id() + 1
            doc = {
                "rollback_to": args.to,
                "checkpoint": str(ckpt.path),
                "checkpoint_sha256": ckpt.sha256,
                "next_round": next_round,
                "replaced": None if before is None else before.to,
            }
            text = (
                f"rollback recorded: round {next_round} will start from the model of round "
                f"{args.to} ({ckpt.sha256[:12]}); (re)start the coordinator to apply it"
            )
            if before is not None:
                text += f" (replaces the pending rollback to round {before.to})"
    except IntentDamaged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, RollbackError, RoundLogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write((json.dumps(doc) if args.json else text) + "\n")
    return 0

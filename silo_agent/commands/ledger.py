"""`silofed-silo ledger [show|verify]`: what left this site, and whether the coordinator agrees.

Rule: reading and printing only; the file format is in `storage/ledger.py`, the comparison in
`storage/ledger_verify.py`.
`ledger` (= `ledger show`) prints one row per round: when its first message left, aggregation,
model-in hash, the update blob (bytes, digest), every message sent in order, and the key shares
released for other silos. `ledger verify --export FILE` compares the ledger with a
`silofed-coordinator rounds export --format json` file and names round + field of every
mismatch. Exit codes: 0 OK, 1 mismatch or unreadable input (the message says what to do).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from secagg.identity import load_pem_certificate, uri_san
from silo_agent.config import load_silo_config
from silo_agent.storage.ledger import FINAL_EVALUATION, LEDGER_FILENAME, NO_ROUND
from silo_agent.storage.ledger_verify import (
    RoundRecord,
    by_round,
    load_export,
    read_ledger,
    verify,
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="silo TOML file (reads its [silo] state_dir)")
    where.add_argument("--state-dir", type=Path, help="the silo's state directory")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "ledger",
        parents=[common],
        help="what left this site per round; `ledger verify` checks it against the coordinator",
    )
    p.set_defaults(func=_to_stdout(show))
    verbs = p.add_subparsers(dest="ledger_command", required=False, metavar="ACTION")
    s = verbs.add_parser("show", parents=[common], help="print the ledger (the default)")
    s.set_defaults(func=_to_stdout(show))
    v = verbs.add_parser(
        "verify",
        parents=[common],
        help="compare the ledger with a `rounds export --format json` file",
    )
    v.add_argument("--export", required=True, type=Path, help="the coordinator's JSON export")
    v.add_argument(
        "--silo-id",
        default=None,
        help="this silo's spiffe:// id (default: the URI SAN of the certificate in --config)",
    )
    v.set_defaults(func=_to_stdout(verify_cmd))


class UsageError(Exception):
    """The command line does not say which silo; the message says what to pass."""


def _to_stdout(command: Any) -> Any:
    """`command` printing to stdout; its errors (LedgerError, ConfigError, UsageError) end it
    with silo_agent.cli's EXIT_CODES."""

    def run(args: argparse.Namespace) -> int:
        code: int = command(args, sys.stdout)
        return code

    return run


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        path: Path = args.state_dir
        return path
    if args.config is not None:
        return load_silo_config(args.config).state_dir
    raise UsageError("say which silo: --config FILE (the silo's TOML) or --state-dir DIR")


def _silo_id(args: argparse.Namespace) -> str:
    if args.silo_id:
        silo_id: str = args.silo_id
        return silo_id
    if args.config is None:
        raise UsageError("pass --silo-id spiffe://... or --config FILE (its certificate names it)")
    config = load_silo_config(args.config)
    found = uri_san(load_pem_certificate(config.tls.cert.read_bytes()))
    if found is None:
        raise UsageError(f"{config.tls.cert} has no URI SAN; pass --silo-id")
    return found


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def show(args: argparse.Namespace, out: TextIO) -> int:
    rounds = by_round(read_ledger(_state_dir(args) / LEDGER_FILENAME))
    if args.json:
        out.write(json.dumps([_round_doc(r) for r in rounds], indent=2) + "\n")
        return 0
    table = Table(title=f"what left this site, per round ({len(rounds)} round(s))")
    columns = ("round", "first sent (UTC)", "aggregation", "model in", "update", "sent, in order")
    for col in (*columns, "key shares released"):
        table.add_column(col, justify="right" if col == "round" else "left")
    for r in rounds:
        table.add_row(*_row(r))
    _console(out).print(table)
    return 0


def _round_doc(r: RoundRecord) -> dict[str, Any]:
    update = r.update
    return {
        "round_id": r.round_id,
        "aggregation": r.aggregation,
        "model_in_sha256": r.model_in_sha256,
        "update": None
        if update is None
        else {"message": update.message, "bytes": update.size, "sha256": update.sha256},
        "share_releases": r.share_releases(),
        "messages": [e.to_dict() for e in r.entries],
    }


def _row(r: RoundRecord) -> tuple[str, ...]:
    update = r.update
    sent = ", ".join(
        e.message + (" (final evaluation)" if e.aggregation == FINAL_EVALUATION else "")
        for e in r.entries
    )
    if not r.complete:
        sent += " (format-1 line: only the upload was recorded)"
    releases = "; ".join(
        f"{kind.removesuffix('_shares_for')} for {', '.join(_who(s) for s in silos)}"
        for kind, silos in r.share_releases().items()
        if silos
    )
    return (
        "-" if r.round_id == NO_ROUND else str(r.round_id),  # e.g. a roster adoption
        _when(r.entries[0].at),
        r.aggregation or "?",
        (r.model_in_sha256 or "?")[:16],
        "-" if update is None else f"{update.size:,} B {update.sha256[:16]}",
        sent,
        releases or "-",
    )


def _who(silo: str | int) -> str:
    """A silo id's last path segment (its name); `#i` for a bare secagg index."""
    return f"#{silo}" if isinstance(silo, int) else silo.rsplit("/", 1)[-1]


def verify_cmd(args: argparse.Namespace, out: TextIO) -> int:
    entries = read_ledger(_state_dir(args) / LEDGER_FILENAME)
    export = load_export(args.export)
    silo_id = _silo_id(args)
    problems = verify(entries, export, silo_id)
    rounds = [r for r in by_round(entries) if r.round_id != NO_ROUND]
    uploads = sum(1 for r in rounds if r.update is not None)
    if args.json:
        doc = {
            "silo_id": silo_id,
            "rounds": len(rounds),
            "uploads": uploads,
            "ok": not problems,
            "mismatches": [
                {
                    "round": m.round_id,
                    "field": m.field,
                    "ledger": m.ledger,
                    "coordinator": m.coordinator,
                    "explanation": m.explanation,
                }
                for m in problems
            ],
        }
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
    elif problems:
        for m in problems:
            out.write(f"MISMATCH {m}\n")
        out.write(f"{len(problems)} mismatch(es) between the ledger and {args.export}\n")
    else:
        out.write(
            f"OK: {len(rounds)} round(s), {uploads} upload(s) of {silo_id} agree with "
            f"{args.export}\n"
        )
    return 1 if problems else 0


def _console(out: TextIO) -> Console:
    terminal = out.isatty()
    return Console(file=out, force_terminal=terminal, width=None if terminal else 160)

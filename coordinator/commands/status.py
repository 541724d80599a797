"""`silofed-coordinator status`: live view of a running coordinator.

Rule: ask the coordinator (GetStatus over mTLS, through `status_client`) and print: connected
silos with their certificate expiry (and days left), the silos it excluded (proven to have sent
an out-of-range weight element; not invited until it restarts), the current round, its phase
and the time spent in it, rounds completed, and the gRPC health status. `--json` prints the
same as one JSON object. `--config` reads the coordinator's config for the address (host of
`[server] listen`, port from `<state_dir>/coordinator.port` when listen uses port 0) and the
CA; `--address/--ca-cert` instead. The operator authenticates with an operator certificate from
`silofed-coordinator issue-operator-cert` (URI SAN spiffe://<federation>/operator/<name>,
clientAuth): `--cert/--key`, or `--operator-dir DIR` holding operator.pem and operator.key, or
by default, with `--config`, `<federation dir>/operators/operator/` where the federation dir is
the parent of `[tls] ca_cert`'s `ca/` folder (the `pki` layout; `provision-dev` makes that
operator). The coordinator refuses status to silo certificates (PERMISSION_DENIED), and TLS
refuses its own server certificate as a client ("unsupported certificate purpose").
Exit codes: 0 answered, 1 unreachable, refused or bad arguments (the message says what to do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.table import Table

from coordinator.config import ConfigError, load_coordinator_config
from coordinator.pki.authority import CA_DIR, OPERATOR_CERT, OPERATOR_KEY, operator_dir
from coordinator.pki.expiry import DEFAULT_WARNING_DAYS, expiry_warning
from protos import federation_pb2 as pb

if TYPE_CHECKING:
    from coordinator.transport.status_client import Credentials


class _UsageError(Exception):
    pass


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("status", help="live view of a running coordinator (silos, round, phase)")
    p.add_argument("--config", type=Path, help="coordinator TOML file (address and credentials)")
    p.add_argument("--address", help="host:port of the coordinator (overrides --config)")
    p.add_argument("--ca-cert", type=Path, help="federation CA certificate (PEM)")
    p.add_argument("--cert", type=Path, help="operator certificate (from issue-operator-cert, PEM)")
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    p.add_argument(
        "--operator-dir",
        type=Path,
        help="directory with operator.pem and operator.key (default with --config: "
        "<federation dir>/operators/operator/)",
    )
    p.add_argument("--server-name", default=None, help="name in the coordinator's certificate")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def default_operator_dir(ca_cert: Path) -> Path | None:
    """`<federation dir>/operators/operator/` when `ca_cert` sits in the pki layout
    (`<federation dir>/ca/ca.pem`), else None."""
    if ca_cert.parent.name != CA_DIR:
        return None
    return operator_dir(ca_cert.parent.parent)


def _credentials_paths(
    args: argparse.Namespace, config_ca: Path | None
) -> tuple[Path | None, Path | None]:
    cert: Path | None = args.cert
    key: Path | None = args.key
    if cert is not None or key is not None:
        return cert, key
    where: Path | None = args.operator_dir
    if where is None and config_ca is not None:
        where = default_operator_dir(config_ca)
        if where is None or not (where / OPERATOR_CERT).exists():
            return None, None
    if where is None:
        return None, None
    if not (where / OPERATOR_CERT).exists() or not (where / OPERATOR_KEY).exists():
        raise _UsageError(
            f"{where} has no {OPERATOR_CERT} and {OPERATOR_KEY}; issue them with "
            "`silofed-coordinator issue-operator-cert --dir <federation dir>`"
        )
    return where / OPERATOR_CERT, where / OPERATOR_KEY


def _warning_days(args: argparse.Namespace) -> float:
    """[pki] expiry_warning_days of the coordinator's config when given, else the default."""
    if args.config is None:
        return DEFAULT_WARNING_DAYS
    return load_coordinator_config(args.config).pki.expiry_warning_days


def _target(args: argparse.Namespace) -> tuple[str, Credentials]:
    address: str | None = args.address
    ca = args.ca_cert
    server_name: str | None = args.server_name
    config_ca: Path | None = None
    if args.config is not None:
        config = load_coordinator_config(args.config)
        host, _, port = config.listen.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        if port == "0":
            port_file = config.state_dir / "coordinator.port"
            try:
                port = port_file.read_text().strip()
            except FileNotFoundError as exc:
                raise _UsageError(
                    f"{port_file} does not exist: the coordinator is not running (start it with "
                    "`silofed-coordinator serve`) or pass --address host:port"
                ) from exc
        address = address or f"{host}:{port}"
        config_ca = config.tls.ca_cert
        ca = ca or config_ca
        server_name = server_name or "localhost"
    if address is None or ca is None:
        raise _UsageError(
            "say which coordinator: --config FILE (the coordinator's TOML), or --address "
            "host:port with --ca-cert"
        )
    cert, key = _credentials_paths(args, config_ca)
    if cert is None or key is None:
        raise _UsageError(
            "pass --cert and --key (or --operator-dir): an operator client certificate from "
            "`silofed-coordinator issue-operator-cert --dir <federation dir>`; silo "
            "certificates are refused status, and the coordinator's own certificate is for "
            "serving only (see docs/auditing.md)"
        )
    from coordinator.transport.status_client import Credentials

    try:
        creds = Credentials(ca.read_bytes(), cert.read_bytes(), key.read_bytes(), server_name)
    except OSError as exc:
        raise _UsageError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return address, creds


def status_doc(
    address: str,
    reply: pb.StatusReply,
    health: str,
    now: float,
    warning_days: float = DEFAULT_WARNING_DAYS,
) -> dict[str, Any]:
    """The JSON form; times are unix seconds, durations seconds, expiry in days from `now`;
    `cert_warning` is set for a certificate within `warning_days` of expiry (else null)."""
    return {
        "address": address,
        "federation_id": reply.federation_id,
        "health": health,
        "round": reply.current_round or None,
        "phase": reply.phase or None,
        "phase_started_at": reply.phase_started_unix or None,
        "time_in_phase_s": (now - reply.phase_started_unix) if reply.phase_started_unix else None,
        "rounds_completed": reply.rounds_completed,
        "silos": [
            {
                "silo_id": s.silo_id,
                "connected_since": s.connected_since_unix,
                "cert_not_after": s.cert_not_after_unix,
                "cert_days_left": (s.cert_not_after_unix - now) / 86400,
                "cert_warning": expiry_warning(s.silo_id, s.cert_not_after_unix, now, warning_days),
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
            }
            for s in sorted(reply.silos, key=lambda s: s.silo_id)
        ],
        "excluded": [
            {"silo_id": e.silo_id, "round": e.round_id, "excluded_at": e.excluded_at_unix}
            for e in sorted(reply.excluded, key=lambda e: e.silo_id)
        ],
    }


def _print(doc: dict[str, Any], out: TextIO) -> None:
    terminal = out.isatty()
    console = Console(file=out, force_terminal=terminal, width=None if terminal else 160)
    if doc["round"] is None:
        where = "idle (no round running)"
    else:
        where = f"round {doc['round']}, phase {doc['phase']} for {doc['time_in_phase_s']:.1f} s"
    console.print(
        f"coordinator {doc['address']} ({doc['federation_id']}): {doc['health']}; {where}; "
        f"{doc['rounds_completed']} round(s) completed; {len(doc['silos'])} silo(s) connected"
        + (f"; {len(doc['excluded'])} excluded" if doc["excluded"] else "")
    )
    table = Table(title="connected silos")
    for col in ("silo", "connected (UTC)", "cert expires (UTC)", "days left", "in", "out"):
        table.add_column(col, justify="right" if col in ("days left", "in", "out") else "left")
    for s in doc["silos"]:
        table.add_row(
            s["silo_id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s["connected_since"])),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["cert_not_after"])),
            f"{s['cert_days_left']:.1f}",
            f"{s['bytes_in']:,}",
            f"{s['bytes_out']:,}",
        )
    console.print(table)
    for s in doc["silos"]:
        if s["cert_warning"]:
            console.print(f"warning: {s['cert_warning']}", markup=False)
    if doc["excluded"]:
        # Proven with its own signature: the fix is the operator's (revoke the certificate).
        excluded = Table(
            title="excluded silos (sent an out-of-range weight element; revoke them: "
            "silofed-coordinator revoke)"
        )
        for col in ("silo", "blamed in round", "excluded (UTC)"):
            excluded.add_column(col, justify="right" if col == "blamed in round" else "left")
        for e in doc["excluded"]:
            excluded.add_row(
                e["silo_id"],
                str(e["round"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["excluded_at"])),
            )
        console.print(excluded)


def run(args: argparse.Namespace, clock: Callable[[], float] = time.time) -> int:
    # The CLI turns grpc's logging to INFO for `serve`; a one-shot client wants errors only,
    # and grpc reads the setting once, at import.
    if "grpc" not in sys.modules:
        os.environ["GRPC_VERBOSITY"] = "ERROR"
    from coordinator.transport.status_client import StatusUnavailable, fetch_status, probe_health

    try:
        address, creds = _target(args)
        reply = fetch_status(address, creds, timeout_s=args.timeout)
        health = probe_health(address, creds, timeout_s=args.timeout)
    except (ConfigError, StatusUnavailable, _UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc = status_doc(address, reply, health, clock(), _warning_days(args))
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print(doc, sys.stdout)
    return 0

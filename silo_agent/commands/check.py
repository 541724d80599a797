"""`silofed-silo check --config FILE`: is this silo ready to join? One line per check.

Rule: every check runs (a failure does not hide the next one, except where a check needs what
failed before it), each prints OK with the fact it established or FAIL with what to fix, and the
exit code is 0 only when all pass. Checks: config, certificate (federation CA, validity, days to
expiry), roster pin, coordinator reachable (TCP, through `[coordinator] proxy` when set, + mutual
TLS handshake, our certificate offered, theirs verified against the CA), task imports, data
loads. Nothing is sent beyond the handshake.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from secagg.identity import (
    CertificateRejected,
    check_certificate,
    load_pem_certificate,
    load_pem_chain,
)
from silo_agent.config import ConfigError, SiloConfig, load_silo_config
from silo_agent.pki.preflight import PinnedFiles
from silo_agent.pki.renewal import renew_at

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("check", help="check config, certificate, roster, coordinator, task, data")
    p.add_argument("--config", required=True, type=Path, help="silo TOML file")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to reach the coordinator (default 5)"
    )
    p.set_defaults(func=run)


def check_certificate_validity(config: SiloConfig, now: dt.datetime) -> CheckResult:
    # The certificate file may carry its issuing intermediate after the leaf (docs/pki.md).
    chain = load_pem_chain(config.tls.cert.read_bytes())
    cert = chain[0]
    ca = load_pem_certificate(config.tls.ca_cert.read_bytes())
    try:
        silo_id = check_certificate(cert, ca, now=now, intermediates=chain[1:])
    except CertificateRejected as exc:
        return CheckResult(
            "certificate", False, f"{config.tls.cert}: {exc}; re-enroll (silofed-silo enroll)"
        )
    days = (cert.not_valid_after_utc - now).total_seconds() / 86400
    detail = (
        f"{silo_id}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({days:.0f} days)"
    )
    # Still a pass (it works today), with the warning an operator must act on or expect.
    if now.timestamp() >= renew_at(cert, config.pki.renew_before_days):
        if config.pki.auto_renew:
            detail += (
                "; WARNING: renewal due: the running agent asks the coordinator for a renewed "
                "certificate (same key) over its connection; if it is still due tomorrow, ask "
                "the coordinator operator (`silofed-coordinator pki list`)"
            )
        else:
            detail += (
                "; WARNING: expires soon and [pki] auto_renew is off: have it renewed before "
                "it expires"
            )
    return CheckResult("certificate", True, detail)


def check_roster_pin(config: SiloConfig, now: dt.datetime) -> CheckResult:
    pinned = PinnedFiles.read(config)  # the files and the check the agent uses before dialing
    roster = pinned.roster
    try:
        pinned.check(now)
    except CertificateRejected as exc:
        return CheckResult(
            "roster pin",
            False,
            f"{config.tls.roster} (version {roster.version}): {exc}; ask the federation "
            "operator for the current roster or re-enroll",
        )
    return CheckResult(
        "roster pin",
        True,
        f"{pinned.expected_silo_id} pinned in roster v{roster.version} "
        f"({roster.digest().hex()[:12]})",
    )


def check_reachable(config: SiloConfig, timeout_s: float) -> CheckResult:
    host, _, port = config.address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.tls.ca_cert))
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    ctx.set_alpn_protocols(["h2"])  # what a gRPC client offers
    server_name = config.server_name or host
    via = f" through proxy {config.proxy}" if config.proxy else ""
    try:
        with (
            _dial(host, int(port), config.proxy, timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            version = tls.version()
    except ProxyRefused as exc:
        return CheckResult(
            "coordinator",
            False,
            f"{config.address}: the proxy {config.proxy} did not open a tunnel ({exc}); ask "
            "its operator to allow CONNECT to the coordinator's host and port",
        )
    except ssl.SSLCertVerificationError as exc:
        return CheckResult(
            "coordinator",
            False,
            f"{config.address}: its certificate does not verify against {config.tls.ca_cert} "
            f"for name {server_name!r} ({exc.verify_message}); check [coordinator] server_name "
            "and [tls] ca_cert",
        )
    except ssl.SSLError as exc:
        return CheckResult(
            "coordinator",
            False,
            f"{config.address}: TLS handshake failed ({exc.reason}); the coordinator may not "
            "accept this certificate — ask its operator",
        )
    except OSError as exc:
        return CheckResult(
            "coordinator",
            False,
            f"{config.address}: cannot connect{via} ({exc.strerror or exc}); is the "
            "coordinator running, and are [coordinator] address and proxy right?",
        )
    return CheckResult(
        "coordinator", True, f"{config.address} reachable{via}, mutual TLS ({version})"
    )


class ProxyRefused(Exception):
    """The HTTP CONNECT proxy answered, but not with a tunnel."""


def _dial(host: str, port: int, proxy: str | None, timeout_s: float) -> socket.socket:
    """A TCP connection to host:port, tunnelled through the HTTP CONNECT proxy `proxy`
    (http://host:port, as the agent's gRPC channel dials it) when one is configured."""
    if proxy is None:
        return socket.create_connection((host, port), timeout=timeout_s)
    url = urlsplit(proxy)
    assert url.hostname is not None and url.port is not None  # checked by the config loader
    sock = socket.create_connection((url.hostname, url.port), timeout=timeout_s)
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("ascii"))
        reply = b""
        while b"\r\n\r\n" not in reply:  # the proxy's reply head, bounded
            data = sock.recv(1)  # one byte at a time: nothing of the tunnel is read past it
            if not data or len(reply) > 8192:
                raise ProxyRefused("it closed the connection or sent no complete reply")
            reply += data
        status = reply.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] != ["200"]:
            raise ProxyRefused(status.strip()[:200])
    except BaseException:
        sock.close()
        raise
    return sock


def check_task(config: SiloConfig) -> tuple[CheckResult, CheckResult]:
    from silofed.task import TaskLoadError, load_task, trains_distributed

    try:
        task = load_task(config.task_spec)
    except TaskLoadError as exc:
        failed = CheckResult("task", False, f"{exc}; fix [task] spec in {config.source}")
        return failed, CheckResult("data", False, "not tried: the task did not load")
    workers = config.train.workers
    if workers > 1 and not trains_distributed(task):  # what `run` refuses at its start
        failed = CheckResult(
            "task",
            False,
            f"{config.task_spec} does not declare `distributed = True`, but [train] workers = "
            f"{workers} in {config.source}; set workers = 1 or use a task written for several "
            "workers (docs/task-api.md)",
        )
        return failed, CheckResult("data", False, "not tried: the task cannot train here")
    ok = CheckResult("task", True, f"{config.task_spec} imports")
    try:
        data = task.load_data(config.task_options)
    except Exception as exc:  # a task's own loader can raise anything; report, do not crash
        return ok, CheckResult(
            "data", False, f"{type(exc).__name__}: {exc}; fix [task.options] in {config.source}"
        )
    size = f" ({len(data)} items)" if hasattr(data, "__len__") else ""
    return ok, CheckResult("data", True, f"loaded{size}")


def run_checks(config_path: Path, *, now: dt.datetime, timeout_s: float) -> list[CheckResult]:
    try:
        config = load_silo_config(config_path)
    except ConfigError as exc:
        return [CheckResult("config", False, str(exc))]
    results = [CheckResult("config", True, str(config.source))]
    steps: list[Callable[[], CheckResult]] = [
        lambda: check_certificate_validity(config, now),
        lambda: check_roster_pin(config, now),
        lambda: check_reachable(config, timeout_s),
    ]
    names = ("certificate", "roster pin", "coordinator")
    for name, step in zip(names, steps, strict=True):
        try:
            results.append(step())
        except (OSError, ValueError) as exc:
            results.append(CheckResult(name, False, f"{exc}; fix [tls] in {config.source}"))
    results.extend(check_task(config))
    return results


def run(args: argparse.Namespace) -> int:
    results = run_checks(args.config, now=dt.datetime.now(dt.UTC), timeout_s=args.timeout)
    ok = all(r.ok for r in results)
    if args.json:
        doc = {
            "ok": ok,
            "checks": [{"check": r.name, "ok": r.ok, "detail": r.detail} for r in results],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for r in results:
            sys.stdout.write(f"{'OK  ' if r.ok else 'FAIL'} {r.name:<12} {r.detail}\n")
    return EXIT_OK if ok else EXIT_FAILED

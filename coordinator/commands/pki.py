"""PKI commands for the coordinator operator: provision-dev, init-ca, issue-server-cert,
issue-operator-cert, sign, sign-roster, revoke, `pki intermediate-csr|issue-intermediate` for
the online issuing CA below the offline root, and `pki list|approve` for certificate renewals
waiting for approval (coordinator.pki.renewal).

Every command prints what it made and where, never key material, and exits 1 with a sentence
saying what to fix when it is refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from coordinator.pki import authority as pki
from coordinator.pki import renewal
from coordinator.pki.operator import DEFAULT_OPERATOR_NAME
from secagg.identity import Roster, spki_sha256, uri_san


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _federation_of(directory: Path) -> str:
    return pki.load_roster(directory / pki.ROSTER_FILE).federation_id


def _load_ca(directory: Path) -> pki.CA:
    """The CA of the federation in `directory` (its id read from the roster there)."""
    return pki.load_ca(directory, _federation_of(directory))


def _read_csr(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise pki.PkiError(f"cannot read CSR {path}: {exc.strerror}") from exc


def run_provision_dev(args: argparse.Namespace) -> int:
    names = (
        [n.strip() for n in args.silo_names.split(",") if n.strip()]
        if args.silo_names
        else [f"hospital-{i}" for i in range(1, args.silos + 1)]
    )
    fed = pki.provision_dev(Path(args.dir), args.federation, names, now=_now(), force=args.force)
    print(f"dev federation {fed.federation_id!r} in {fed.dir}")
    print(f"  CA certificate:          {fed.ca_cert}")
    print(f"  coordinator certificate: {fed.coordinator_cert}")
    print(f"  roster:                  {fed.roster}")
    for name, paths in fed.silos.items():
        print(f"  silo {name}: {paths.dir} (key, certificate, pinned CA and roster)")
    if fed.operator is not None:
        print(f"  operator {fed.operator.operator_id}: {fed.operator.dir} (for `status`)")
    return 0


def run_init_ca(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca = pki.create_ca(directory, args.federation, now=_now(), force=args.force)
    roster_path = directory / pki.ROSTER_FILE
    if not roster_path.exists() or args.force:
        pki.write_roster(roster_path, Roster(args.federation, 0, {}), ca)
    print(f"CA for federation {args.federation!r}: {directory / pki.CA_DIR / 'ca.pem'}")
    print(f"empty roster: {roster_path} (signed: {pki.roster_signature_path(roster_path)})")
    return 0


def run_issue_server_cert(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca = _load_ca(directory)
    cert, _key = pki.issue_coordinator_cert(
        ca,
        directory / pki.COORDINATOR_DIR,
        now=_now(),
        hosts=args.host or ("localhost", "127.0.0.1"),
    )
    print(f"coordinator certificate: {cert}")
    return 0


def run_issue_operator_cert(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca = _load_ca(directory)
    out = Path(args.out) if args.out else pki.operator_dir(directory, args.name)
    op = pki.issue_operator_cert(
        ca, out, name=args.name, now=_now(), valid_days=args.days, force=args.force
    )
    cert = x509.load_pem_x509_certificate(op.cert.read_bytes())
    print(f"operator {op.operator_id} (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    print(f"  certificate: {op.cert}")
    print(f"  key:         {op.key} (mode 0600; keep it on the operator's machine)")
    print(f"  CA:          {op.ca_cert}")
    print(
        "  use: silofed-coordinator status --config coordinator.toml "
        f"--cert {op.cert} --key {op.key}"
    )
    return 0


def run_intermediate_csr(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    csr = pki.intermediate_csr(out, args.federation, force=args.force)
    print(f"issuing CA key: {out / pki.ISSUING_KEY} (mode 0600; it stays on this host)")
    print(f"request:        {csr}")
    print(
        "  take the request to the root: silofed-coordinator pki issue-intermediate --dir FED "
        f"--csr {pki.ISSUING_CSR} --out DIR; bring back {pki.ISSUING_CERT}"
    )
    return 0


def run_issue_intermediate(args: argparse.Namespace) -> int:
    root = _load_ca(Path(args.dir))
    out = Path(args.out)
    if args.csr:
        csr_pem = _read_csr(args.csr)
        cert_path = out / pki.ISSUING_CERT
        pki.write_public(
            cert_path, pki.sign_intermediate(root, csr_pem, now=_now(), valid_days=args.days)
        )
        key_note = "its key stayed where the request was made"
    else:
        cert_path, key_path = pki.issue_intermediate(
            root, out, now=_now(), valid_days=args.days, force=args.force
        )
        key_note = f"key {key_path} (mode 0600)"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    print(
        f"issuing CA {cert.subject.rfc4514_string()}: {cert_path}, serial {cert.serial_number:x}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}; {key_note}"
    )
    print(
        "  on the coordinator: [pki] issuing_cert and issuing_key point at it (auto_renew = "
        "true); the root key goes back offline. Revoke it with: silofed-coordinator revoke "
        f"--dir FED --cert {cert_path} --reason ..."
    )
    return 0


def run_sign(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca = _load_ca(directory)
    cert_pem = pki.sign_csr(
        ca, _read_csr(args.csr), federation_id=ca.federation_id, now=_now(), valid_days=args.days
    )
    pki.write_public(Path(args.out), cert_pem)
    roster_path = directory / pki.ROSTER_FILE
    roster = pki.add_to_roster(roster_path, cert_pem, ca=ca)
    cert = x509.load_pem_x509_certificate(cert_pem)
    print(f"signed {uri_san(cert)} -> {args.out} (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    print(f"  roster pin (SHA-256 of the public key): {spki_sha256(cert).hex()}")
    print(f"  roster version {roster.version}, digest {roster.digest().hex()}")
    print(f"  roster signed by the CA: {pki.roster_signature_path(roster_path)}")
    print(
        "  give this silo its certificate, ca.pem and the new roster.json; connected silos "
        "receive the signed roster from the coordinator (unless they set [tls] roster_updates "
        '= "manual": give them roster.json too)'
    )
    return 0


def run_sign_roster(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    roster_path = directory / pki.ROSTER_FILE
    roster = pki.sign_roster_file(roster_path, _load_ca(directory))
    print(f"signed roster version {roster.version} ({len(roster.entries)} silos)")
    print(f"  digest    {roster.digest().hex()}")
    print(f"  signature {pki.roster_signature_path(roster_path)}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.cert:
        try:
            cert = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
        except (OSError, ValueError) as exc:
            raise pki.PkiError(f"cannot read certificate {args.cert}: {exc}") from exc
        serial, silo_id = cert.serial_number, uri_san(cert) or "?"
    else:
        try:
            serial, silo_id = int(args.serial, 16), "?"
        except ValueError as exc:
            raise pki.PkiError(f"--serial {args.serial!r} is not hexadecimal") from exc
    pki.revoke(
        directory / pki.REVOKED_FILE, serial=serial, silo_id=silo_id, now=_now(), reason=args.reason
    )
    print(f"revoked serial {serial:x} ({silo_id}); the coordinator refuses it from its next check")
    return 0


def _renewals_dir(args: argparse.Namespace) -> Path:
    if args.renewals:
        return Path(args.renewals)
    if args.config:
        from coordinator.config import ConfigError, load_coordinator_config

        try:
            return load_coordinator_config(Path(args.config)).renewals_dir
        except ConfigError as exc:
            raise pki.PkiError(str(exc)) from exc
    raise pki.PkiError(
        "say where the renewal requests are: --config (the coordinator's TOML) or --renewals DIR"
    )


def run_renewals_list(args: argparse.Namespace) -> int:
    directory = _renewals_dir(args)
    federation_id = _federation_of(Path(args.dir))
    waiting = renewal.list_pending(directory, federation_id)
    if not waiting:
        print(f"no renewal requests waiting in {directory}")
        return 0
    print(f"{len(waiting)} renewal request(s) waiting in {directory}:")
    for r in waiting:
        asked = dt.datetime.fromtimestamp(r.requested_at, dt.UTC)
        print(f"  {r.name}  {r.silo_id}  requested {asked:%Y-%m-%d %H:%M} UTC")
    print("  approve one with: silofed-coordinator pki approve --dir FED --silo NAME ...")
    return 0


def run_renewals_approve(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca = _load_ca(directory)
    roster = pki.load_roster(directory / pki.ROSTER_FILE)
    try:
        out, cert = renewal.approve(
            _renewals_dir(args), args.silo, ca=ca, roster=roster, now=_now(), valid_days=args.days
        )
    except renewal.RenewalRefused as exc:
        raise pki.PkiError(f"not approved: {exc}") from exc
    print(
        f"approved the renewal of {uri_san(cert)}: serial {cert.serial_number:x}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d} (same key: the roster is unchanged)"
    )
    print(f"  certificate: {out}; the silo picks it up with its next renewal request")
    return 0


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except pki.PkiError as exc:
            print(f"error: {exc}")
            return 1
        return code

    return run


# The --dir help of each command: where it reads the CA (ca/) and the roster, or writes them.
_DIR = "federation directory"
_DIR_WITH_CA = "federation directory (with ca/ and roster.json)"


def _command(
    sub: argparse._SubParsersAction[Any],
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    dir_help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add one PKI command: each works on a federation directory (`--dir`, its first option) and
    exits 1 with the reason when the PKI refuses it (`_guard`); the caller adds the rest."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    p.add_argument("--dir", required=True, help=dir_help)
    p.set_defaults(func=_guard(run))
    return p


def _days_option(p: argparse.ArgumentParser, default: int) -> None:
    """`--days`: the validity of what the command signs."""
    p.add_argument(
        "--days", type=int, default=default, help=f"validity in days (default: {default})"
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = _command(
        sub,
        "provision-dev",
        run_provision_dev,
        "one-command dev federation: CA, coordinator certificate and N enrolled silos",
        "directory to write the federation into",
    )
    p.add_argument("--federation", default="demo", help="federation id (default: demo)")
    p.add_argument("--silos", type=int, default=3, help="number of silos (default: 3)")
    p.add_argument("--silo-names", help="comma-separated silo names (default hospital-1..N)")
    p.add_argument("--force", action="store_true", help="replace an existing CA in --dir")

    p = _command(sub, "init-ca", run_init_ca, "create the federation CA and an empty roster", _DIR)
    p.add_argument("--federation", required=True, help="federation id")
    p.add_argument("--force", action="store_true", help="replace an existing CA")

    p = _command(
        sub,
        "issue-server-cert",
        run_issue_server_cert,
        "issue the coordinator's TLS certificate",
        _DIR_WITH_CA,
    )
    p.add_argument(
        "--host", action="append", help="DNS name or IP for the certificate (repeatable)"
    )

    p = _command(
        sub,
        "issue-operator-cert",
        run_issue_operator_cert,
        "issue an operator client certificate (for `status` and health probes)",
        _DIR_WITH_CA,
        description="Make an operator key (0600) and a client certificate from the federation "
        "CA with URI SAN spiffe://<federation>/operator/<name>. The coordinator answers "
        "`status` for it; it is never on the roster, so it cannot join rounds.",
    )
    p.add_argument(
        "--name",
        default=DEFAULT_OPERATOR_NAME,
        help=f"operator name (default: {DEFAULT_OPERATOR_NAME})",
    )
    p.add_argument(
        "--out",
        help="directory for operator.key, operator.pem, ca.pem (default: DIR/operators/NAME)",
    )
    _days_option(p, pki.OPERATOR_VALID_DAYS)
    p.add_argument("--force", action="store_true", help="replace an existing operator key")

    p = _command(sub, "sign", run_sign, "sign a silo's CSR and pin it in the roster", _DIR)
    p.add_argument("--csr", required=True, help="the silo's CSR (from `silofed-silo enroll`)")
    p.add_argument("--out", required=True, help="where to write the signed certificate")
    _days_option(p, pki.SILO_VALID_DAYS)

    _command(
        sub,
        "sign-roster",
        run_sign_roster,
        "sign roster.json with the federation CA (after editing it by hand)",
        _DIR_WITH_CA,
        description="Write roster.json.sig: the CA's signature over roster.json as it is. The "
        "coordinator delivers a signed roster to silos pinning an older version; `sign` and "
        "`init-ca` sign the roster they write, so this is needed only after a manual edit "
        "(which must also raise its version).",
    )

    _register_renewals(sub)

    p = _command(sub, "revoke", run_revoke, "revoke a silo certificate", _DIR)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--cert", help="the certificate to revoke (PEM)")
    group.add_argument("--serial", help="the serial number to revoke (hex)")
    p.add_argument("--reason", required=True, help="why (recorded in revoked.json)")


def _register_intermediate(sub: argparse._SubParsersAction[Any]) -> None:
    """`intermediate-csr` (where the issuing CA runs) and `issue-intermediate` (where the root
    is): the online CA that signs renewals, so the root key can stay offline."""
    p = _command(
        sub,
        "intermediate-csr",
        run_intermediate_csr,
        "on the coordinator host: make the issuing CA's key (0600) and a request for the root",
        "directory for issuing.key and issuing.csr",
    )
    p.add_argument("--federation", required=True, help="federation id")
    p.add_argument("--force", action="store_true", help="replace an existing issuing key")
    p = _command(
        sub,
        "issue-intermediate",
        run_issue_intermediate,
        "with the root: issue the online issuing CA that signs silo renewals",
        _DIR_WITH_CA,
        description="The root signs an issuing CA certificate (CA:TRUE, path length 0, key "
        "usage certificate and CRL signing only). With --csr it signs a request made by "
        "`intermediate-csr` where the issuing CA runs; without, it also makes the key in "
        "--out (one machine, e.g. a dev federation). Rosters stay signed by the root only.",
    )
    p.add_argument("--out", required=True, help="directory for issuing.pem (and issuing.key)")
    p.add_argument("--csr", help="the issuing CA's request (from `intermediate-csr`)")
    _days_option(p, pki.INTERMEDIATE_VALID_DAYS)
    p.add_argument("--force", action="store_true", help="replace an existing issuing key")


def _register_renewals(sub: argparse._SubParsersAction[Any]) -> None:
    """`pki list` and `pki approve`: the queue of same-key renewals ([pki] auto_renew = false)."""
    group = sub.add_parser(
        "pki",
        help="the online issuing CA (intermediate-csr, issue-intermediate) and certificate "
        "renewals waiting for approval (list, approve)",
        description="Silos ask for a new certificate for their pinned key over their "
        "connection; with [pki] auto_renew = true the coordinator's issuing CA (an intermediate "
        "below the offline root: intermediate-csr, issue-intermediate) signs it at once, with "
        "false the coordinator queues each request. Run list/approve where the CA key is (the "
        "federation directory), on the renewals folder of the coordinator (or a copy of it: "
        "copy the issued certificate back).",
    )
    actions = group.add_subparsers(dest="pki_command", required=True)
    _register_intermediate(actions)
    for name, run, summary in (
        ("list", run_renewals_list, "show the renewal requests waiting for approval"),
        ("approve", run_renewals_approve, "sign a silo's waiting renewal request with the CA"),
    ):
        p = _command(actions, name, run, summary, _DIR_WITH_CA)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", help="the coordinator's TOML (its [pki] renewals_dir)")
        where.add_argument("--renewals", help="the renewals folder (default <state_dir>/renewals)")
        if name == "approve":
            p.add_argument("--silo", required=True, help="the silo's name (as `list` shows it)")
            _days_option(p, pki.SILO_VALID_DAYS)

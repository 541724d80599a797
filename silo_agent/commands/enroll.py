"""`silofed-silo enroll`: make this silo's key and CSR, on site."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from silo_agent.pki.enrollment import EnrollError, csr_pin, generate_key_and_csr


def run_enroll(args: argparse.Namespace) -> int:
    try:
        csr = generate_key_and_csr(Path(args.dir), args.federation, args.name, force=args.force)
    except EnrollError as exc:
        print(f"error: {exc}")
        return 1
    print(f"key written to {Path(args.dir) / 'silo.key'} (mode 0600; it never leaves this site)")
    print(f"CSR: {csr}")
    print(f"public-key pin (SHA-256 of the SPKI): {csr_pin(csr)}")
    print("send the CSR to the coordinator operator; install the returned certificate as silo.pem")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("enroll", help="generate this silo's key (0600) and a CSR for the CA")
    p.add_argument("--dir", required=True, help="the silo's directory for its key and CSR")
    p.add_argument("--federation", required=True, help="federation id")
    p.add_argument("--name", required=True, help="this silo's name (letters, digits, - _ .)")
    p.add_argument("--force", action="store_true", help="replace an existing key (re-enroll)")
    p.set_defaults(func=run_enroll)

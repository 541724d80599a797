"""The federation CA: create it, issue certificates, keep the roster and the revocation list.

Rule: this is the coordinator operator's side of the PKI. It never sees a silo's private key in
production: a silo enrolls on site (`silofed-silo enroll`) and hands over only a CSR. The one
exception is `provision_dev`, which plays every party on one machine for the demo and tests and
still writes each silo's key into that silo's own directory. Keys are ECDSA P-256 (grpcio's TLS
stack refuses Ed25519 client certificates) and are written 0600 from the first byte.

Rosters are signed: every roster this module writes gets a detached signature by the CA key
beside it (`roster.json.sig`, secagg.roster_sig), so the coordinator can deliver a new roster
version to silos that pin an older one and they can check it came from the CA, not from the
coordinator. `write_roster` writes the signature before the roster: a reader that sees the new
roster finds its signature already there.

The root may stay offline: `issue_intermediate` (or `intermediate_csr` where the issuing CA
runs, then `sign_intermediate` where the root is) makes the coordinator's online issuing CA,
which signs silo renewals only; rosters are signed by the root alone.

Operator certificates (`issue_operator_cert`) let the coordinator operator's tools (`status`,
health probes) authenticate over mTLS: clientAuth, URI SAN `spiffe://<federation>/operator/<name>`
(see coordinator.pki.operator), never on the roster, so they can read status but never join rounds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from coordinator.pki.certificates import (
    CA,
    CA_DIR,
    COORDINATOR_DIR,
    INTERMEDIATE_VALID_DAYS,
    ISSUING_CERT,
    ISSUING_CSR,
    ISSUING_KEY,
    OPERATOR_CERT,
    OPERATOR_KEY,
    OPERATOR_VALID_DAYS,
    OPERATORS_DIR,
    REVOKED_FILE,
    ROSTER_FILE,
    ROSTER_SIGNATURE_FILE,
    SILO_VALID_DAYS,
    SILOS_DIR,
    OperatorPaths,
    PkiError,
    SiloPaths,
    _new_key,
    chain_pem,
    create_ca,
    intermediate_csr,
    is_root,
    issue_coordinator_cert,
    issue_intermediate,
    issue_operator_cert,
    load_ca,
    load_issuer,
    load_private_key,
    operator_dir,
    sign_csr,
    sign_intermediate,
    write_private_key,
    write_public,
)
from coordinator.pki.roster import (
    SignedRoster,
    add_to_roster,
    load_revoked_serials,
    load_roster,
    load_signed_roster,
    revoke,
    roster_bytes,
    roster_signature_path,
    sign_roster_file,
    write_roster,
)
from secagg.identity import Roster, build_silo_csr

# The PKI's public names: the CA and certificates (coordinator.pki.certificates), the roster and
# revocations (coordinator.pki.roster), and the dev federation made here.
__all__ = [
    "CA",
    "CA_DIR",
    "COORDINATOR_DIR",
    "INTERMEDIATE_VALID_DAYS",
    "ISSUING_CERT",
    "ISSUING_CSR",
    "ISSUING_KEY",
    "OPERATORS_DIR",
    "OPERATOR_CERT",
    "OPERATOR_KEY",
    "OPERATOR_VALID_DAYS",
    "REVOKED_FILE",
    "ROSTER_FILE",
    "ROSTER_SIGNATURE_FILE",
    "SILO_VALID_DAYS",
    "SILOS_DIR",
    "DevFederation",
    "OperatorPaths",
    "PkiError",
    "SignedRoster",
    "SiloPaths",
    "add_to_roster",
    "chain_pem",
    "create_ca",
    "intermediate_csr",
    "is_root",
    "issue_coordinator_cert",
    "issue_intermediate",
    "issue_operator_cert",
    "load_ca",
    "load_issuer",
    "load_private_key",
    "load_revoked_serials",
    "load_roster",
    "load_signed_roster",
    "operator_dir",
    "provision_dev",
    "revoke",
    "roster_bytes",
    "roster_signature_path",
    "sign_csr",
    "sign_intermediate",
    "sign_roster_file",
    "write_private_key",
    "write_public",
    "write_roster",
]


@dataclass(frozen=True, slots=True)
class DevFederation:
    """Every path of a dev federation made by `provision_dev`."""

    federation_id: str
    dir: Path
    ca_cert: Path
    ca_key: Path
    coordinator_cert: Path
    coordinator_key: Path
    roster: Path
    revoked: Path
    silos: dict[str, SiloPaths]
    operator: OperatorPaths | None = None


def _dev_silo_key_and_csr(silo_dir: Path, federation_id: str, name: str) -> bytes:
    # Dev provisioning plays the silo here: the key is generated in the silo's own directory,
    # exactly as `silofed-silo enroll` would, and only the CSR travels to the CA.
    key = _new_key()
    write_private_key(silo_dir / "silo.key", key, force=True)
    pem = build_silo_csr(key, federation_id, name)
    write_public(silo_dir / "silo.csr", pem)
    return pem


def provision_dev(
    directory: Path,
    federation_id: str,
    silo_names: Sequence[str],
    *,
    now: dt.datetime,
    force: bool = False,
) -> DevFederation:
    """CA, coordinator certificate, roster, empty revocation list and N enrolled silos."""
    directory = Path(directory)
    ca = create_ca(directory, federation_id, now=now, force=force)
    coord_cert, coord_key = issue_coordinator_cert(ca, directory / COORDINATOR_DIR, now=now)
    roster_path, revoked_path = directory / ROSTER_FILE, directory / REVOKED_FILE
    write_roster(roster_path, Roster(federation_id, 0, {}), ca)
    write_public(revoked_path, b'{"revoked": []}\n')
    silos: dict[str, SiloPaths] = {}
    for name in silo_names:
        silo_dir = directory / SILOS_DIR / name
        csr_pem = _dev_silo_key_and_csr(silo_dir, federation_id, name)
        cert_pem = sign_csr(ca, csr_pem, federation_id=federation_id, now=now)
        write_public(silo_dir / "silo.pem", cert_pem)
        add_to_roster(roster_path, cert_pem, ca=ca)
        silos[name] = SiloPaths(
            silo_dir,
            silo_dir / "silo.key",
            silo_dir / "silo.csr",
            silo_dir / "silo.pem",
            silo_dir / "ca.pem",
            silo_dir / ROSTER_FILE,
        )
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    pinned = roster_path.read_bytes()
    signature = roster_signature_path(roster_path).read_bytes()
    for paths in silos.values():
        write_public(paths.ca_cert, ca_pem)
        write_public(roster_signature_path(paths.roster), signature)
        write_public(paths.roster, pinned)
    # So `silofed-coordinator status` works against the dev federation out of the box.
    operator = issue_operator_cert(ca, operator_dir(directory), now=now, force=True)
    return DevFederation(
        federation_id,
        directory,
        directory / CA_DIR / "ca.pem",
        directory / CA_DIR / "ca.key",
        coord_cert,
        coord_key,
        roster_path,
        revoked_path,
        silos,
        operator,
    )

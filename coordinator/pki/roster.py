"""Who may join: the signed roster file and the revocation list.

Rule: every roster this module writes is signed by the CA key beside it (`roster.json.sig`,
secagg.roster_sig), signature first, so a reader that sees the new roster finds its signature
already there; a roster read for delivery to silos carries its signature only when it verifies
(`load_signed_roster`). The revocation list only grows (`revoke` is idempotent).
coordinator.pki.authority is the import for all of it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.pki.certificates import CA, PkiError, _utc, is_root, write_public
from secagg.identity import Roster, SiloId, spki_sha256, uri_san
from secagg.roster_sig import SIGNATURE_SUFFIX, roster_signature_valid, sign_roster


def load_roster(path: Path) -> Roster:
    try:
        return Roster.from_json(path.read_text())
    except OSError as exc:
        raise PkiError(f"cannot read roster {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"roster {path} is invalid: {exc}") from exc


def roster_signature_path(roster_path: Path) -> Path:
    """Where a roster's detached signature lives: `<roster>.sig`."""
    return roster_path.with_name(roster_path.name + SIGNATURE_SUFFIX)


def roster_bytes(roster: Roster) -> bytes:
    """A roster's file contents (what is signed and delivered, byte for byte)."""
    return roster.to_json().encode() + b"\n"


def write_roster(roster_path: Path, roster: Roster, ca: CA | None) -> bytes:
    """Save `roster`, signed by `ca` (or unsigned, any stale signature removed, when None).

    The signature is written first, so whoever sees the new roster finds its signature; a
    reader between the two renames sees the old roster with the new signature, which fails
    verification and is reread when the roster file changes. Returns the file's bytes.
    """
    data = roster_bytes(roster)
    sig_path = roster_signature_path(roster_path)
    if ca is not None:
        write_public(sig_path, sign_roster(_root_key(ca), data))
    else:
        sig_path.unlink(missing_ok=True)
    write_public(roster_path, data)
    return data


def sign_roster_file(roster_path: Path, ca: CA) -> Roster:
    """(Re-)sign a roster file as it is, e.g. one edited by hand. Raises PkiError when it is
    unreadable or not for the CA's federation."""
    data = _read_roster_bytes(roster_path)
    roster = _parse_roster(roster_path, data)
    if roster.federation_id != ca.federation_id:
        raise PkiError(
            f"roster {roster_path} is for federation {roster.federation_id!r}, the CA for "
            f"{ca.federation_id!r}; sign a roster of this federation"
        )
    write_public(roster_signature_path(roster_path), sign_roster(_root_key(ca), data))
    return roster


def _root_key(ca: CA) -> ec.EllipticCurvePrivateKey:
    """Only the root signs rosters: silos verify them with the root certificate they pin, so an
    online intermediate's key (which signs renewals) can never change who is a member."""
    if not is_root(ca.cert):
        raise PkiError(
            f"{ca.cert.subject.rfc4514_string()} is an intermediate; rosters are signed by the "
            "federation CA (the root) only: run this where the root key is kept"
        )
    return ca.key


@dataclass(frozen=True, slots=True)
class SignedRoster:
    """A roster file as read, with its signature when one is present and valid.

    `problem` says why it cannot be delivered to silos (no signature, or one that does not
    verify with the CA certificate); None when `signature` is set."""

    roster: Roster
    data: bytes
    signature: bytes | None
    problem: str | None


def _read_roster_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read roster {path}: {exc.strerror}") from exc


def _parse_roster(path: Path, data: bytes) -> Roster:
    try:
        return Roster.from_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PkiError(f"roster {path} is invalid: {exc}") from exc


def load_signed_roster(roster_path: Path, ca_cert: x509.Certificate) -> SignedRoster:
    """Read a roster and check its detached signature with `ca_cert`. Raises PkiError when the
    roster itself is unreadable or invalid; a missing or bad signature is `problem`."""
    data = _read_roster_bytes(roster_path)
    roster = _parse_roster(roster_path, data)
    sig_path = roster_signature_path(roster_path)
    try:
        signature = sig_path.read_bytes()
    except FileNotFoundError:
        return SignedRoster(
            roster,
            data,
            None,
            f"{sig_path} is missing: silos cannot check this roster, so it is not delivered "
            "to them; sign it with `silofed-coordinator sign-roster --dir FEDERATION_DIR`",
        )
    except OSError as exc:
        return SignedRoster(roster, data, None, f"cannot read {sig_path}: {exc.strerror}")
    if not roster_signature_valid(ca_cert, data, signature):
        return SignedRoster(
            roster,
            data,
            None,
            f"{sig_path} does not verify with the federation CA for {roster_path} as it is now "
            "(edited after signing, or signed by another CA); re-sign it with "
            "`silofed-coordinator sign-roster --dir FEDERATION_DIR`",
        )
    return SignedRoster(roster, data, signature, None)


def add_to_roster(roster_path: Path, cert_pem: bytes, *, ca: CA | None = None) -> Roster:
    """Pin the certificate's key for its silo id, one roster version up, and save the roster
    (signed by `ca` when given; see `write_roster`)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    silo_id = uri_san(cert)
    if silo_id is None:
        raise PkiError("the certificate has no single URI SAN; it is not a silo certificate")
    roster = load_roster(roster_path).with_silo(SiloId(silo_id), spki_sha256(cert))
    write_roster(roster_path, roster, ca)
    return roster


def _read_revoked(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        entries = raw["revoked"]
        if not isinstance(entries, list):
            raise TypeError("'revoked' is not a list")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PkiError(f"revocation list {path} is unreadable ({exc}); fix or restore it") from exc


def revoke(revoked_path: Path, *, serial: int, silo_id: str, now: dt.datetime, reason: str) -> None:
    """Add a certificate serial to the revocation list (idempotent)."""
    entries = _read_revoked(revoked_path)
    if any(int(e["serial"], 16) == serial for e in entries):
        return
    entries.append(
        {
            "serial": f"{serial:x}",
            "silo_id": silo_id,
            "revoked_at": _utc(now).isoformat(),
            "reason": reason,
        }
    )
    write_public(revoked_path, json.dumps({"revoked": entries}, indent=2).encode() + b"\n")


def load_revoked_serials(path: Path) -> frozenset[int]:
    """The revoked serial numbers; a missing file means none."""
    try:
        return frozenset(int(e["serial"], 16) for e in _read_revoked(path))
    except (KeyError, ValueError, TypeError) as exc:
        raise PkiError(f"revocation list {path} has a malformed entry: {exc}") from exc

"""Enrollment on the silo's own machine: make the silo's key and a CSR for the federation CA.

Rule: the private key is generated here, written 0600 from its first byte, and never leaves
this machine or appears in any output; only the CSR (public) goes to the coordinator operator,
who signs it (`silofed-coordinator sign`) and returns the certificate and the pinned roster.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secagg.identity import build_silo_csr

KEY_FILE = "silo.key"
CSR_FILE = "silo.csr"
CERT_FILE = "silo.pem"


class EnrollError(Exception):
    """Enrollment was refused; str() says why and what to do."""


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def generate_key_and_csr(
    silo_dir: Path, federation_id: str, name: str, *, force: bool = False
) -> Path:
    """Write `silo.key` (0600) and `silo.csr` under `silo_dir`; return the CSR's path.

    Raises EnrollError if a key already exists (unless `force`) or the name is not usable in
    a silo id.
    """
    if not _valid_name(name) or not _valid_name(federation_id):
        raise EnrollError(
            f"federation {federation_id!r} and silo name {name!r} may use only letters, digits, "
            "'-', '_' and '.'"
        )
    silo_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = silo_dir / KEY_FILE
    if key_path.exists():
        if not force:
            raise EnrollError(
                f"{key_path} already exists; enrolling again would replace this silo's identity "
                "(use --force only if you mean to re-enroll with a new key)"
            )
        key_path.unlink()
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    csr_path = silo_dir / CSR_FILE
    csr_path.write_bytes(build_silo_csr(key, federation_id, name))
    return csr_path


def csr_pin(csr_path: Path) -> str:
    """Hex SHA-256 of the CSR's SubjectPublicKeyInfo: the roster pin the operator will record."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()

"""Who may ask the coordinator for its status: operator identities.

Rule: pure functions over certificates, no I/O. An operator certificate is issued by the
federation CA (`silofed-coordinator issue-operator-cert`) with extended key usage clientAuth and
exactly one URI SAN ``spiffe://<federation>/operator/<name>``. That path is distinct from a
silo's (``.../silo/<name>``) and an operator is never on the roster, so an operator certificate
cannot join rounds, and a silo certificate cannot read the federation's status. TLS has already
checked the chain to the federation CA and the validity window before any RPC runs; what is left
for the RPC is the identity's shape, its federation and the revocation list.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography import x509

from secagg.identity import uri_san

OPERATOR_PATH_SEGMENT = "/operator/"
DEFAULT_OPERATOR_NAME = "operator"


class NotAnOperator(Exception):
    """The peer is not an operator of this federation; str() is the sentence it receives."""


def valid_name(name: str) -> bool:
    """Operator names use the same alphabet as silo names: letters, digits, '-', '_', '.'."""
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def operator_id_for(federation_id: str, name: str) -> str:
    """The URI SAN of operator `name` in `federation_id`."""
    return f"spiffe://{federation_id}{OPERATOR_PATH_SEGMENT}{name}"


def operator_name(uri: str | None, federation_id: str) -> str | None:
    """The operator name in `uri` when it is an operator id of `federation_id`, else None."""
    prefix = operator_id_for(federation_id, "")
    if uri is None or not uri.startswith(prefix):
        return None
    name = uri.removeprefix(prefix)
    return name if valid_name(name) else None


def check_operator(
    cert_pem: bytes | None, federation_id: str, revoked_serials: Collection[int] = ()
) -> str:
    """The operator id of the peer certificate `cert_pem`. Raises NotAnOperator saying why."""
    if cert_pem is None:
        raise NotAnOperator("no client certificate was presented")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise NotAnOperator("the client certificate could not be parsed") from exc
    uri = uri_san(cert)
    if operator_name(uri, federation_id) is None:
        raise NotAnOperator(
            f"status is for operators only and {uri or 'this certificate'} is not an operator "
            f"of federation {federation_id!r}; use a certificate from `silofed-coordinator "
            f"issue-operator-cert` (URI SAN {operator_id_for(federation_id, '<name>')})"
        )
    if cert.serial_number in revoked_serials:
        raise NotAnOperator(
            f"{uri} (serial {cert.serial_number:x}) is revoked; issue a new operator certificate"
        )
    assert uri is not None  # operator_name() returned a name, so there is a URI
    return uri

"""Dial a running coordinator over mTLS for its status and its gRPC health, as an operator.

Rule: the only operator-side module that speaks gRPC; every call has a deadline, and any failure
becomes `StatusUnavailable` whose text says what to check. The operator authenticates with a
client certificate (clientAuth) issued by the federation CA; the server requires one, and
answers `GetStatus` only for operator certificates (coordinator.pki.operator).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc


class StatusUnavailable(Exception):
    """The coordinator could not be asked; str() says what to check."""


@dataclass(frozen=True, slots=True)
class Credentials:
    ca_cert: bytes
    cert: bytes
    key: bytes
    server_name: str | None = None


def _channel(address: str, creds: Credentials) -> grpc.Channel:
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_cert, private_key=creds.key, certificate_chain=creds.cert
    )
    options: list[tuple[str, str | int]] = [("grpc.enable_retries", 0)]
    if creds.server_name:
        options.append(("grpc.ssl_target_name_override", creds.server_name))
    return grpc.secure_channel(address, channel_creds, options=options)


def _explain(address: str, exc: grpc.RpcError) -> StatusUnavailable:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return StatusUnavailable(
            f"coordinator at {address} refused the request (PERMISSION_DENIED: {details})"
        )
    return StatusUnavailable(
        f"coordinator at {address} did not answer ({code.name if code else 'error'}: {details}); "
        "is `silofed-coordinator serve` running there, and is --cert an operator certificate "
        "from the federation CA (`silofed-coordinator issue-operator-cert`)?"
    )


def fetch_status(address: str, creds: Credentials, *, timeout_s: float = 5.0) -> pb.StatusReply:
    """The coordinator's `GetStatus` reply. Raises StatusUnavailable."""
    with _channel(address, creds) as channel:
        stub = pb_grpc.FederationStub(channel)
        try:
            reply: pb.StatusReply = stub.GetStatus(pb.StatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _explain(address, exc) from exc
        return reply


def probe_health(
    address: str, creds: Credentials, *, service: str = "", timeout_s: float = 5.0
) -> str:
    """The standard gRPC health status name (e.g. "SERVING"). Raises StatusUnavailable."""
    with _channel(address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _explain(address, exc) from exc
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name

"""Build and start the coordinator's gRPC server: mTLS with required client certificates.

Rule: the only place that knows about server credentials, ports, thread pools and channel
options. gRPC's message limits stay small (payloads travel in chunks of at most 1 MiB); they are
set explicitly and never raised to fit a model.

No connection or stream is held for free. A TCP connection must finish TLS and HTTP/2 setup
within `[server] handshake_timeout_s`, and a connection with no open stream is closed after
`idle_connection_s`; streams are bounded by the servicer (coordinator.transport.servicer). A stream
holds
one worker thread for its life, so the pool has one per stream the servicer may keep open plus
`OPERATOR_RESERVE` that streams never take: status and health always have a worker. gRPC's own
`maximum_concurrent_rpcs` is not used: it counts every RPC alike, so idle streams could fill it
and make status fail with RESOURCE_EXHAUSTED.

The Federation service is registered as the generated `add_FederationServicer_to_server` does it
(from the same descriptor), with one difference: a response that is already serialised (a model
chunk framed by protos/blobs.py:serialized_chunks, as a `Serialized`) is sent as it is, without a
message object.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.config import ServerLimits
from coordinator.transport.servicer import FederationServicer
from protos import federation_pb2 as pb
from protos.blobs import Serialized
from silofed.wire import MAX_MESSAGE_BYTES

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Detect dead silos within ~30 s even when no round is running.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC waits this long for any ping's answer (60 s by default, whatever the keepalive timeout).
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A port another process already serves must fail to bind (exit 2, "cannot listen"), not be
    # shared: gRPC sets SO_REUSEPORT by default.
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # No bandwidth-delay probing: it grows each stream's receive window to megabytes, so the
    # uploads waiting for a buffered-upload slot would sit in gRPC's buffers instead, and memory
    # would grow with the number of silos (bench/round.py, N=10 vs 3 at 10^7 parameters: peak
    # +10..38% with it, +7% without; round time unchanged).
    ("grpc.http2.bdp_probe", 0),
    # A silo uses one stream per connection, an operator one call: more on one connection are
    # an attack on the workers, queued by the client instead of opened here.
    ("grpc.max_concurrent_streams", 8),
    # Pings faster than min_ping_interval_without_data_ms twice earn a GOAWAY.
    ("grpc.http2.max_ping_strikes", 2),
)

# Workers that streams never take: status, health and the refusals of streams beyond the bounds.
OPERATOR_RESERVE = 8


def connection_options(limits: ServerLimits) -> tuple[tuple[str, int], ...]:
    """Channel options that close connections which hold the server without using it."""
    return (
        # From accept to the peer's HTTP/2 SETTINGS (TCP, then TLS): raw sockets that never
        # handshake, or handshake slowly, are closed after this.
        ("grpc.server_handshake_timeout_ms", round(limits.handshake_timeout_s * 1000)),
        # A connection with no call open (a refused or finished stream's) is closed after this;
        # a silo's connection always has its stream open.
        ("grpc.max_connection_idle_ms", round(limits.idle_connection_s * 1000)),
    )


# grpc's handler constructors by (request streaming, response streaming).
_HANDLERS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def federation_handlers(servicer: object) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The Federation service's name and its method handlers on `servicer`: what the generated
    registration builds, but each response serializer passes a `Serialized` through."""
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    handlers = {}
    for method in service.methods:
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=serialize_response,
        )
    return service.full_name, handlers


def serialize_response(response: Message | Serialized) -> bytes:
    """A response message serialised, or a pre-serialised one's bytes as they are: the stream
    sends a model's chunks framed once, with no message object (protos/blobs.py)."""
    if isinstance(response, Serialized):
        return response.take()
    return response.SerializeToString()


class _CheckOnlyHealth(health.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """The standard health service without Watch: a Watch call stays open as long as the client
    likes, and keeps its connection from ever being idle (any CA-signed certificate could hold
    connections that way). Probes use Check."""

    def Watch(  # noqa: N802 - gRPC method name
        self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None
    ) -> None:
        del request, send_response_callback
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "health Watch is not served; use Check")


@dataclass(frozen=True, slots=True)
class RunningServer:
    server: grpc.Server
    port: int

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait(grace_s + 1.0)


class ListenError(OSError):
    """The server's address cannot be bound; str() names it and the likely cause."""


def start_server(
    servicer: FederationServicer[Any],
    *,
    listen: str,
    ca_cert: Path,
    cert: Path,
    key: Path,
    limits: ServerLimits | None = None,
) -> RunningServer:
    """Start serving on `listen` (host:port; port 0 picks one), with `limits` ([server] table;
    its defaults when None) on connections.

    Raises ListenError when the address cannot be bound.
    """
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca_cert.read_bytes(),
        require_client_auth=True,
    )
    workers = servicer.stream_capacity + OPERATOR_RESERVE
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=SERVER_OPTIONS + connection_options(limits or ServerLimits()),
    )
    name, handlers = federation_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
    # The standard health service, so an orchestrator can probe the coordinator (over mTLS).
    health_servicer = _CheckOnlyHealth()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("silofed.v1.Federation", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError:  # recent grpcio raises where older ones returned 0
        port = 0
    if port == 0:
        raise ListenError(
            f"cannot listen on {listen}: the address is in use (another coordinator?) or not "
            "an address of this machine"
        )
    server.start()
    return RunningServer(server, port)

"""The gRPC face of the coordinator: admit a TLS peer, then pump its stream to and from the hub.

Rule: a servicer method is a few lines. Identity comes from the peer certificate in
`auth_context()` (never from a message); the hub decides whether to admit it and the servicer
translates a refusal into a status code with an operator-readable detail, logging the cause.
Each stream has a reader thread feeding the hub and a response generator draining the silo's
outbound queue (heartbeats when idle). Nothing here knows about rounds.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc

log = logging.getLogger("silofed.coordinator.servicer")


class RefusalCode(enum.Enum):
    """Why a peer is refused, as the hub sees it; mapped to a gRPC status here."""

    UNAUTHENTICATED = "cannot tell who the peer is"
    PERMISSION_DENIED = "the peer is known but not allowed"
    INVALID_ARGUMENT = "the peer broke the protocol"


_STATUS = {
    RefusalCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RefusalCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    RefusalCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
}


class Refused(Exception):
    """The hub will not serve this peer; `code` says why, str() is the operator's sentence."""

    def __init__(self, code: RefusalCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class Outbound(Protocol):
    """A silo's outbound side as the servicer sees it."""

    silo_id: str

    def next_messages(self, timeout_s: float) -> Iterable[pb.CoordinatorMessage] | None: ...


S = TypeVar("S", bound=Outbound)


class Hub(Protocol[S]):
    """The part of the coordinator the servicer talks to (implemented in `coordinator.serve`)."""

    def admit(self, cert_pem: bytes | None, hello: pb.Hello) -> S: ...

    def welcome(self, session: S) -> pb.Welcome: ...

    def on_message(self, session: S, message: pb.SiloMessage) -> None: ...

    def on_disconnect(self, session: S, why: str) -> None: ...

    def status(self) -> pb.StatusReply: ...


def _peer_cert(context: grpc.ServicerContext) -> bytes | None:
    certs = context.auth_context().get("x509_pem_cert")
    return certs[0] if certs else None


# Sees every message a silo's stream delivers, before the hub does (tests record the wire).
ReceiveHook = Callable[[str, pb.SiloMessage], None]


class FederationServicer(pb_grpc.FederationServicer, Generic[S]):
    def __init__(
        self, hub: Hub[S], *, idle_heartbeat_s: float = 5.0, on_receive: ReceiveHook | None = None
    ) -> None:
        self._hub = hub
        self._idle = idle_heartbeat_s
        self._on_receive = on_receive

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorMessage]:
        peer = context.peer()
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            log.warning("peer %s closed its stream before saying hello", peer)
            return
        if first.WhichOneof("kind") != "hello":
            log.warning(
                "refused %s: first message was %s, not hello", peer, first.WhichOneof("kind")
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        try:
            session = self._hub.admit(_peer_cert(context), first.hello)
        except Refused as refusal:
            log.warning("refused connection from %s: %s", peer, refusal)
            context.abort(_STATUS[refusal.code], str(refusal))
        # Fires however the RPC ends (client cancel, broken connection, server stop): the
        # reader thread or the generator may be blocked and never notice on their own.
        context.add_callback(lambda: self._hub.on_disconnect(session, "stream ended"))
        yield pb.CoordinatorMessage(welcome=self._hub.welcome(session))
        done = threading.Event()
        reader = threading.Thread(
            target=self._read,
            args=(session, request_iterator, done),
            name=f"read {session.silo_id}",
            daemon=True,
        )
        reader.start()
        try:
            while not done.is_set() and context.is_active():
                batch = session.next_messages(self._idle)
                if batch is None:  # the hub closed this session
                    return
                sent = False
                for message in batch:
                    sent = True
                    yield message
                if not sent:
                    yield pb.CoordinatorMessage(heartbeat=pb.Heartbeat())
        finally:
            done.set()
            self._hub.on_disconnect(session, "stream ended")

    def _read(self, session: S, messages: Iterator[pb.SiloMessage], done: threading.Event) -> None:
        why = "silo closed its stream"
        try:
            for message in messages:
                if self._on_receive is not None:
                    self._on_receive(session.silo_id, message)
                self._hub.on_message(session, message)
        except grpc.RpcError as exc:
            why = f"stream broke: {exc.code() if hasattr(exc, 'code') else exc}"
        except Exception as exc:  # a hub bug must not leave the stream half-open
            log.exception("error handling a message from %s", session.silo_id)
            why = f"internal error: {exc}"
        finally:
            done.set()
            self._hub.on_disconnect(session, why)

    def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.StatusReply:
        """The live status, for operators only (coordinator.operator): a silo's certificate
        gets PERMISSION_DENIED. Revocations are those the hub last loaded (if it keeps any)."""
        del request
        from coordinator.operator import NotAnOperator, check_operator

        reply = self._hub.status()
        revoked: frozenset[int] = getattr(self._hub, "revoked", frozenset())
        try:
            check_operator(_peer_cert(context), reply.federation_id, revoked)
        except NotAnOperator as exc:
            log.warning("refused status to %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return reply


def abort_details(exc: Any) -> str:
    """Best-effort text of a gRPC error for logs."""
    return str(getattr(exc, "details", lambda: exc)())

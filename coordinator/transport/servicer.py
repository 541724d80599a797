"""The gRPC face of the coordinator: admit a TLS peer, then pump its stream to and from the hub.

Rule: a servicer method is a few lines. Identity comes from the peer certificate in
`auth_context()` (never from a message); the hub decides whether to admit it and the servicer
translates a refusal into a status code with an operator-readable detail, logging the cause.

Admission comes before resources. When a stream opens, before any message is read, the hub
checks the certificate (federation CA, roster, revocation; an operator's is refused), and a
refused peer holds nothing past that. An accepted identity holds one stream: a new one replaces
its previous stream (coordinator.transport.admission). At most `[server] max_pending_streams`
streams may
wait for their hello, which must come within `hello_timeout_s`; beyond either bound the stream
ends at once (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), never queued. The hello's wire version is
checked before the hub sees the hello (silofed.wire.wire_refusal): a silo speaking an
incompatible version, or none, is refused with FAILED_PRECONDITION naming both versions. So the
streams are bounded by the roster plus that bound, whatever members do, and `stream_capacity`
sizes the server's worker pool (server.py adds a reserve for status and health on top).

Each admitted stream has a reader thread feeding the hub and a response generator draining the
silo's outbound queue. Nothing here knows about rounds. Liveness is not checked here: the
server's gRPC keepalive pings every connection and ends the streams of one whose peer stops
answering (coordinator.transport.server; docs/operations.md, transport).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from coordinator.config import ServerLimits
from coordinator.observability.ratelimit import PeerLog, exception_line
from coordinator.pki.renewal import RenewalRefused, RenewalService, RenewalUnavailable
from coordinator.runtime.peer_input import AGENT_VERSION_MAX, DETAIL_MAX, clean_hello, clip_text
from coordinator.transport.admission import Busy, Stream, StreamTable
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos.blobs import Serialized
from silofed import wire

log = logging.getLogger("silofed.coordinator.servicer")


class RefusalCode(enum.Enum):
    """Why a peer is refused, as the hub sees it; mapped to a gRPC status here."""

    UNAUTHENTICATED = "cannot tell who the peer is"
    PERMISSION_DENIED = "the peer is known but not allowed"
    INVALID_ARGUMENT = "the peer broke the protocol"
    INCOMPATIBLE = "the peer speaks a wire version this coordinator does not admit"


_STATUS = {
    RefusalCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RefusalCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    RefusalCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    RefusalCode.INCOMPATIBLE: grpc.StatusCode.FAILED_PRECONDITION,
}


class Refused(Exception):
    """The hub will not serve this peer; `code` says why, str() is the operator's sentence."""

    def __init__(self, code: RefusalCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


# What a stream sends: a message, or one already serialised (a model's chunk, framed once:
# protos/blobs.py:serialized_chunks; server.py's serializer passes its bytes through).
Outgoing = pb.CoordinatorMessage | Serialized


class Outbound(Protocol):
    """A silo's outbound side as the servicer sees it."""

    silo_id: str

    def next_messages(self, timeout_s: float) -> Iterable[Outgoing] | None: ...

    def attach_stream(self, cancel: Callable[[], object]) -> None: ...


S = TypeVar("S", bound=Outbound)


class Hub(Protocol[S]):
    """The part of the coordinator the servicer talks to (implemented in
    `coordinator.runtime.hub`)."""

    def check_peer(self, cert_pem: bytes | None) -> str: ...

    def admit(self, cert_pem: bytes | None, hello: pb.Hello) -> S: ...

    def welcome(self, session: S) -> pb.Welcome: ...

    def on_message(self, session: S, message: pb.SiloMessage) -> None: ...

    def on_disconnect(self, session: S, why: str) -> None: ...

    def status(self) -> pb.StatusReply: ...

    @property
    def federation_id(self) -> str: ...


def _peer_cert(context: grpc.ServicerContext) -> bytes | None:
    certs = context.auth_context().get("x509_pem_cert")
    return certs[0] if certs else None


def _peer_key(context: grpc.ServicerContext) -> str:
    """Who a not-yet-admitted peer is, for rate-limiting its log lines: its certificate (a
    client's port changes with every connection; its certificate does not), else its host."""
    cert = _peer_cert(context)
    if cert is not None:
        return "cert " + hashlib.sha256(cert).hexdigest()[:16]
    return str(context.peer()).rsplit(":", 1)[0]


# Sees every message a silo's stream delivers, before the hub does (tests record the wire).
ReceiveHook = Callable[[str, pb.SiloMessage], None]


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, detail: str) -> NoReturn:
    context.abort(code, clip_text(detail, DETAIL_MAX))
    raise AssertionError("grpc's context.abort returned")  # it raises; for the type checker


REPLACED = "a newer stream of this silo replaced this one"


class FederationServicer(pb_grpc.FederationServicer, Generic[S]):
    def __init__(
        self,
        hub: Hub[S],
        *,
        poll_s: float = 1.0,
        on_receive: ReceiveHook | None = None,
        limits: ServerLimits | None = None,
        max_silos: int = 64,
    ) -> None:
        """`max_silos`: admitted streams the server has workers for (at least the roster's
        size); `limits`: the [server] table's bounds on what a peer may hold (its defaults when
        None); `poll_s`: how often an idle stream's generator looks whether the stream ended."""
        limits = limits or ServerLimits()
        self._hub = hub
        self._poll_s = poll_s
        self._on_receive = on_receive
        self._peer_log = PeerLog(log)  # one line per (cause, peer) per 10 s, with counts
        self._hello_timeout_s = limits.hello_timeout_s
        self._streams: StreamTable[S] = StreamTable(
            max_pending=limits.max_pending_streams, capacity=max_silos + limits.max_pending_streams
        )
        self._renewals = RenewalService()

    @property
    def stream_capacity(self) -> int:
        """Streams open at once at most (each holds a server worker while it lasts)."""
        return self._streams.capacity

    # The generated stub types it as messages only; server.py registers it to send serialised
    # chunks too.
    def Connect(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: grpc.ServicerContext
    ) -> Iterator[Outgoing]:
        peer = context.peer()
        cert_pem = _peer_cert(context)
        try:  # before any message is read: a peer the hub refuses holds nothing
            identity = self._hub.check_peer(cert_pem)
        except Refused as refusal:
            self._refuse(context, refusal)
        self._renewals.warn_expiry(self._hub, identity, cert_pem)
        try:
            stream, replaced = self._streams.open(identity)
        except Busy as exc:
            self._peer_log.warning(
                "no room", identity, "refused a stream of %s (%s): %s", identity, peer, str(exc)
            )
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            if replaced is not None:  # its stream sees its session closed, and ends
                self._hub.on_disconnect(replaced, "replaced by a new stream")
            yield from self._serve(stream, cert_pem, request_iterator, context)
        finally:
            self._streams.close(stream)

    def _refuse(self, context: grpc.ServicerContext, refusal: Refused) -> NoReturn:
        self._peer_log.warning(
            f"refused {refusal.code.name}",
            _peer_key(context),
            "refused connection from %s: %s",
            context.peer(),
            str(refusal),
        )
        _abort(context, _STATUS[refusal.code], str(refusal))

    def _await_hello(
        self,
        stream: Stream[S],
        messages: Iterator[pb.SiloMessage],
        context: grpc.ServicerContext,
    ) -> pb.SiloMessage | None:
        """The stream's first message, read by a thread of its own so that the wait is bounded
        by `hello_timeout_s` (and ended by a newer stream of the same silo). None when the
        peer closed the stream first. Aborts the RPC on timeout or replacement; the thread
        then ends with it."""
        first: list[pb.SiloMessage] = []

        def read() -> None:
            try:
                first.append(next(messages))
            except Exception:  # noqa: BLE001 - closed, cancelled or broken: no hello
                pass
            finally:
                stream.wake.set()

        threading.Thread(target=read, name=f"hello {stream.identity}", daemon=True).start()
        stream.wake.wait(self._hello_timeout_s)
        if stream.replaced:
            self._peer_log.info(
                "replaced", stream.identity, "%s (%s): %s", stream.identity, context.peer(),
                REPLACED,
            )  # fmt: skip
            _abort(context, grpc.StatusCode.ABORTED, REPLACED)
        if first:
            return first[0]
        if stream.wake.is_set():
            self._peer_log.warning(
                "closed before hello",
                stream.identity,
                "peer %s (%s) closed its stream before saying hello",
                context.peer(),
                stream.identity,
            )
            return None
        detail = f"no hello within {self._hello_timeout_s:g} s of opening the stream"
        self._peer_log.warning(
            "no hello", stream.identity, "closed a stream of %s (%s): %s", stream.identity,
            context.peer(), detail,
        )  # fmt: skip
        _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, detail)

    def _serve(
        self,
        stream: Stream[S],
        cert_pem: bytes | None,
        request_iterator: Iterator[pb.SiloMessage],
        context: grpc.ServicerContext,
    ) -> Iterator[Outgoing]:
        """Hello, admission, then the stream's life: welcome, and the silo's queue out."""
        peer = context.peer()
        first = self._await_hello(stream, request_iterator, context)
        if first is None:
            return
        if first.WhichOneof("kind") != "hello":
            self._peer_log.warning(
                "first message not hello",
                _peer_key(context),
                "refused %s: first message was %s, not hello",
                peer,
                first.WhichOneof("kind"),
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        # Before anything else in the hello: another major version may mean something else by it.
        announced = clip_text(first.hello.wire_version, AGENT_VERSION_MAX)
        agent = clip_text(first.hello.agent_version, AGENT_VERSION_MAX)
        incompatible = wire.wire_refusal(announced, agent, silo=stream.identity)
        if incompatible is not None:
            self._refuse(context, Refused(RefusalCode.INCOMPATIBLE, incompatible))
        hello = clean_hello(first.hello)
        try:
            admitted = self._streams.admit(stream, lambda: self._hub.admit(cert_pem, hello))
        except Refused as refusal:
            self._refuse(context, refusal)
        if admitted is None:  # a newer stream of this silo opened while this one said hello
            _abort(context, grpc.StatusCode.ABORTED, REPLACED)
        session = admitted
        if announced != str(wire.WIRE_VERSION):  # an upgrade in progress: say who lags
            log.info(
                "%s speaks wire version %s (agent %r), this coordinator %s: compatible, admitted",
                session.silo_id, announced, agent, wire.WIRE_VERSION,
            )  # fmt: skip
        session.attach_stream(context.cancel)  # lets the hub end a stream whose silo stops reading
        # Fires however the RPC ends (client cancel, broken connection, server stop): the
        # reader thread or the generator may be blocked and never notice on their own.
        context.add_callback(lambda: self._hub.on_disconnect(session, "stream ended"))
        yield pb.CoordinatorMessage(welcome=self._hub.welcome(session))
        done = threading.Event()
        violation: list[Refused] = []  # set by the reader: end the stream with its status
        reader = threading.Thread(
            target=self._read,
            args=(session, request_iterator, done, violation),
            name=f"read {session.silo_id}",
            daemon=True,
        )
        reader.start()
        try:
            while not done.is_set() and context.is_active():
                batch = session.next_messages(self._poll_s)
                if batch is None:  # the hub closed this session
                    break
                yield from batch
            if violation:
                broken = violation[0]
                context.abort(_STATUS[broken.code], clip_text(str(broken), DETAIL_MAX))
        finally:
            done.set()
            self._hub.on_disconnect(session, "stream ended")

    def _read(
        self,
        session: S,
        messages: Iterator[pb.SiloMessage],
        done: threading.Event,
        violation: list[Refused],
    ) -> None:
        """Feed the silo's messages to the hub. Whatever one of them does, only this silo's
        stream ends: the hub's refusal, or any other error (a hub bug, a fault a test injects),
        is this silo's protocol violation, logged (rate-limited) and returned as its status."""
        why = "silo closed its stream"
        try:
            for message in messages:
                if self._on_receive is not None:
                    self._on_receive(session.silo_id, message)
                self._hub.on_message(session, message)
                # Not kept while the next one is awaited, which can be a whole phase: the last
                # chunk of each silo's upload (up to 1 MiB, in protobuf's native memory) would
                # stay alive, n of them at once.
                del message
        except grpc.RpcError as exc:
            why = f"stream broke: {exc.code() if hasattr(exc, 'code') else exc}"
        except Refused as refusal:
            violation.append(refusal)
            why = str(refusal)
        except Exception as exc:
            violation.append(
                Refused(RefusalCode.INVALID_ARGUMENT, f"protocol violation: {exception_line(exc)}")
            )
            why = str(violation[0])
        finally:
            if violation:
                self._peer_log.warning(
                    "protocol violation",
                    session.silo_id,
                    "%s: %s; ending its stream (%s)",
                    session.silo_id,
                    why,
                    violation[0].code.name,
                )
            done.set()
            self._hub.on_disconnect(session, why)

    def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.StatusReply:
        """The live status, for operators only (coordinator.pki.operator): a silo's certificate
        gets PERMISSION_DENIED. Revocations are those the hub last loaded (if it keeps any)."""
        del request
        from coordinator.pki.operator import NotAnOperator, check_operator

        # The caller is checked before any status is built: a silo's certificate costs nothing.
        revoked: frozenset[int] = getattr(self._hub, "revoked", frozenset())
        try:
            check_operator(_peer_cert(context), self._hub.federation_id, revoked)
        except NotAnOperator as exc:
            self._peer_log.warning(
                "refused status",
                _peer_key(context),
                "refused status to %s: %s",
                context.peer(),
                str(exc),
            )
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self._hub.status()

    def Renew(  # noqa: N802 - gRPC method name
        self, request: pb.RenewRequest, context: grpc.ServicerContext
    ) -> pb.RenewReply:
        """A silo renews its certificate over its own mutually authenticated channel
        (coordinator.pki.renewal). The caller is checked exactly as a connecting silo is
        (federation CA, validity, revocation, roster) before its CSR is read: a revoked or
        unknown silo is refused here and nothing is signed or queued."""
        cert_pem = _peer_cert(context)
        try:
            silo_id = self._hub.check_peer(cert_pem)
        except Refused as refusal:
            self._refuse(context, refusal)
        assert cert_pem is not None  # check_peer refuses a peer without a certificate
        self._renewals.warn_expiry(self._hub, silo_id, cert_pem)
        try:
            outcome = self._renewals.renew(self._hub, silo_id, cert_pem, request.csr_pem)
        except RenewalUnavailable as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RenewalRefused as exc:
            self._peer_log.warning(
                "refused renewal", silo_id, "refused the renewal of %s: %s", silo_id, str(exc)
            )
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.RenewReply(
            outcome=pb.RenewReply.ISSUED if outcome.issued else pb.RenewReply.QUEUED,
            cert_pem=outcome.cert_pem,
            detail=outcome.detail,
        )


def abort_details(exc: Any) -> str:
    """Best-effort text of a gRPC error for logs."""
    return str(getattr(exc, "details", lambda: exc)())

"""The silo's one outbound gRPC stream to the coordinator, over mTLS.

Rule: the only silo module that imports grpc. It dials out (never listens), sends what the
runner queues (blobs expanded into header + chunks only as they are sent, a masked vector's
protocol header inside its blob header) and yields what the coordinator sends.
Liveness is gRPC keepalive's: the channel pings the coordinator every `keepalive_s` and fails
the stream (UNAVAILABLE, a LinkError the runner reconnects after) when a ping is not answered
within `keepalive_timeout_s`; there is no application heartbeat. Every gRPC failure becomes a
`LinkError` with the status code's name and the coordinator's detail, so the runner never sees
grpc types.

It dials through an HTTP CONNECT proxy only when `[coordinator] proxy` names one: gRPC then
tunnels the TCP connection and mutual TLS runs end to end inside it (the proxy sees the
coordinator's host:port, never the traffic). Without that key gRPC's proxy support is switched
off (`grpc.enable_http_proxy` = 0), so `grpc_proxy`, `https_proxy` or `http_proxy` in the
agent's environment never silently reroute the stream.

The hello always carries this build's wire version (silofed.wire): `open` fills it in unless
the caller set one.

Upload grants (wire 1.1): when the coordinator's Welcome says it grants uploads, a masked
vector's header is sent and its chunks wait here, at home, until an UploadGrant of its round
arrives, so that a coordinator with few upload buffers never holds the chunks of the silos
waiting for one. The wait ends without the chunks (the blob is not reported to `on_sent`) when
the round ends (its AbortNotice or RoundResult), a later round is offered, or the stream ends.
UploadGrant messages are taken here and never reach the runner.

Upload chunks (wire 1.2): uploads are cut into chunks of the size the coordinator's Welcome
names (`upload_chunk_bytes`) when this silo announced 1.2 or later and the size is one this
agent cuts (`MIN_CHUNK_BYTES`..`MAX_CHUNK_BYTES`); otherwise, and from an older coordinator, into
1 MiB chunks. A size outside that range is logged and not followed: a coordinator cannot make
the silo cut a vector into millions of messages.

"Handed to gRPC", for `on_sent`: gRPC asks the request iterator for its next message only after
the previous one's send operation completed (its bytes passed HTTP/2 flow control and were
written to the socket) and never after the call failed. So the code after a `yield` runs only
once that message has left this process, and `on_sent` is called there: for a message after its
own send, for a blob after its header and last chunk. A message still queued, or being sent,
when the stream breaks is never reported. Hello is reported too (the callback decides what to
keep).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos.blobs import blob_messages
from secagg.chunking import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, describe
from silofed import wire
from silofed.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("silofed.silo")

# A ping every 20 s (the coordinator accepts one every 5 s at most: coordinator.transport.server),
# and a
# coordinator that does not answer one within 10 s is gone: the stream fails within 30 s.
KEEPALIVE_S = 20.0
KEEPALIVE_TIMEOUT_S = 10.0


def channel_options(
    keepalive_s: float, keepalive_timeout_s: float, proxy: str | None = None
) -> list[tuple[str, str | int]]:
    """The channel's options: small message limits (payloads travel in chunks), keepalive
    pings that also run while no data flows, so a silent coordinator is noticed when idle, and
    the HTTP CONNECT proxy `proxy` ("http://host:port") or none, whatever the environment says."""
    return [
        *proxy_options(proxy),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
        # gRPC waits this long for a ping's answer (60 s by default, whatever the line above).
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def proxy_options(proxy: str | None) -> list[tuple[str, str | int]]:
    """gRPC's proxy options: tunnel through `proxy`, or (None) no proxy at all. gRPC would
    otherwise read grpc_proxy/https_proxy/http_proxy from the environment by itself."""
    if proxy is None:
        return [("grpc.enable_http_proxy", 0)]
    return [("grpc.enable_http_proxy", 1), ("grpc.http_proxy", proxy)]


# How often the request iterator, with nothing to send, looks whether the call ended.
POLL_S = 1.0

# Status codes after which trying again cannot help until an operator acts (FAILED_PRECONDITION:
# the coordinator does not speak this agent's wire version; one side must be upgraded).
FATAL_CODES = frozenset(
    {"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}
)


class LinkError(Exception):
    """The stream failed or was refused. `code` is the gRPC status name, `detail` its text."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


@dataclass(frozen=True, slots=True)
class OutBlob:
    round_id: int
    kind: pb.BlobKind.ValueType
    data: bytes | memoryview  # a byte view of a numpy vector is sent without a copy
    sha256: bytes | None = None  # when the sender already hashed `data` (not hashed again)
    protocol_header: bytes = b""  # MASKED_VECTOR: secagg's signed header, sent in BlobHeader
    chunk_count: int | None = None  # set by the Link once sent: the chunks it went in


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


class Link:
    """One connection attempt: open() starts the stream, messages() yields what arrives."""

    def __init__(
        self,
        address: str,
        tls: TlsMaterial,
        *,
        server_name: str | None = None,
        proxy: str | None = None,
        keepalive_s: float = KEEPALIVE_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        on_sent: Callable[[pb.SiloMessage | OutBlob], None] | None = None,
    ) -> None:
        """`proxy`: the HTTP CONNECT proxy to dial through ("http://host:port", checked by the
        silo's config), or None to dial `address` directly."""
        options = channel_options(keepalive_s, keepalive_timeout_s, proxy)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca_pem,
            private_key=tls.key_pem,
            certificate_chain=tls.cert_pem,
        )
        self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)
        self._out: queue.Queue[pb.SiloMessage | OutBlob | None] = queue.Queue()
        self._on_sent = on_sent
        self._call: grpc.Future | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.upload_grants = False  # we announced 1.1+ and the Welcome says it grants
        self._announced_grants = False  # our hello's wire version waits for grants
        self._announced_chunks = False  # our hello's wire version takes the Welcome's chunk size
        self.upload_chunk_bytes = MAX_CHUNK_BYTES  # what uploads are cut into (the Welcome's)
        self._grant = threading.Condition()
        self._granted_round = -1  # the latest round an UploadGrant came for
        self._ended_round = -1  # every round up to this one is over (no grant will come)
        self._offered_round = -1  # the latest round offered: no other round can end

    def _requests(self, hello: pb.Hello) -> Iterator[pb.SiloMessage]:
        # Each `self._sent(...)` follows the `yield` of what it reports: see the module docstring.
        first = pb.SiloMessage(hello=hello)
        yield first
        self._sent(first)
        while True:
            try:
                item = self._out.get(timeout=POLL_S)
            except queue.Empty:  # nothing to send: end with the call, else keep waiting
                if self._call is not None and self._call.done():
                    return
                continue
            if item is None:
                return
            if isinstance(item, OutBlob):
                meta = describe(item.data, item.sha256, self.upload_chunk_bytes)
                messages = blob_messages(
                    pb.SiloMessage,
                    round_id=item.round_id,
                    kind=item.kind,
                    data=item.data,
                    meta=meta,
                    protocol_header=item.protocol_header,
                )
                yield next(messages)  # the header
                if item.kind == pb.MASKED_VECTOR and self.upload_grants:
                    granted = self._await_grant(item.round_id)
                    if granted is None:
                        return  # the stream ended
                    if not granted:
                        self._out.task_done()
                        continue
                yield from messages
                self.bytes_out += len(item.data)
                # the digest and chunk count its header carried
                self._sent(
                    dataclasses.replace(item, sha256=meta.sha256, chunk_count=meta.chunk_count)
                )
            else:
                self.bytes_out += item.ByteSize()
                yield item
                self._sent(item)
            self._out.task_done()  # gRPC took everything of this item (and it was reported)

    def _chunk_size(self, asked: int) -> int:
        """The chunk size to cut uploads into, given the Welcome's `upload_chunk_bytes`."""
        if not self._announced_chunks or asked == 0:  # an older silo or coordinator: 1 MiB
            return MAX_CHUNK_BYTES
        if MIN_CHUNK_BYTES <= asked <= MAX_CHUNK_BYTES:
            return asked
        log.warning(
            "the coordinator asked for upload chunks of %d bytes; this agent cuts chunks of "
            "%d to %d bytes, so it sends chunks of %d bytes (the coordinator may refuse them)",
            asked,
            MIN_CHUNK_BYTES,
            MAX_CHUNK_BYTES,
            MAX_CHUNK_BYTES,
        )
        return MAX_CHUNK_BYTES

    def _await_grant(self, round_id: int) -> bool | None:
        """Wait for round `round_id`'s UploadGrant: True once it came, False when the round
        ended first, None when the stream ended."""
        with self._grant:
            while True:
                if self._granted_round >= round_id:
                    return True
                if self._ended_round >= round_id:
                    log.info("round %d ended before its upload was granted", round_id)
                    return False
                if self._call is not None and self._call.done():
                    return None
                self._grant.wait(POLL_S)

    def _note(self, message: pb.CoordinatorMessage) -> bool:
        """Take what concerns upload grants from `message`; False for an UploadGrant (this
        module's own: not for the runner)."""
        kind = message.WhichOneof("kind")
        if kind == "welcome":
            # Both sides must agree: a coordinator that promises grants to a silo that did not
            # announce them (or an older one that grants nothing) must not hold its chunks.
            self.upload_grants = self._announced_grants and message.welcome.upload_grants
            self.upload_chunk_bytes = self._chunk_size(message.welcome.upload_chunk_bytes)
            return True
        if kind == "upload_grant":
            self._advance(granted=message.upload_grant.round_id)
            return False
        if kind == "round_offer":
            round_id = message.round_offer.round_id
            with self._grant:
                self._offered_round = max(self._offered_round, round_id)
            self._advance(ended=round_id - 1)
        elif kind in ("abort", "round_result"):
            # Only a round that was offered can end: an abort naming round 2^64 - 1 must not
            # make every later upload give up.
            ended = getattr(message, kind).round_id
            self._advance(ended=min(ended, self._offered_round))
        return True

    def give_up(self, round_id: int) -> None:
        """The runner is done with round `round_id` (its own deadline passed, or it aborted):
        an upload of it still waiting for its grant is given up, and what was queued behind it
        (the silo's own AbortNotice) goes out."""
        self._advance(ended=round_id)

    def _advance(self, *, granted: int = -1, ended: int = -1) -> None:
        with self._grant:
            self._granted_round = max(self._granted_round, granted)
            self._ended_round = max(self._ended_round, ended)
            self._grant.notify_all()

    def _sent(self, item: pb.SiloMessage | OutBlob) -> None:
        if self._on_sent is None:
            return
        try:
            self._on_sent(item)
        except Exception:  # noqa: BLE001 - an exception here would make gRPC cancel the stream
            log.exception("the on_sent callback failed; the stream goes on")

    def flush(self, timeout_s: float) -> bool:
        """Wait until gRPC has taken every queued message (bounded); True when it has."""
        deadline = time.monotonic() + timeout_s
        while self._out.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._out.unfinished_tasks

    def open(self, hello: pb.Hello) -> Iterator[pb.CoordinatorMessage]:
        """Start the stream; iterate the result for coordinator messages (raises LinkError).
        A hello without a wire version is sent with this build's (silofed.wire.WIRE_VERSION)."""
        if not hello.wire_version:
            stamped = pb.Hello()
            stamped.CopyFrom(hello)
            stamped.wire_version = str(wire.WIRE_VERSION)  # read now: a test may set another
            hello = stamped
        self._announced_grants = wire.speaks_upload_grants(hello.wire_version)
        self._announced_chunks = wire.speaks(hello.wire_version, wire.UPLOAD_CHUNKS)
        self._call = self._stub.Connect(self._requests(hello))
        return self._messages()

    def renew(self, request: pb.RenewRequest, timeout_s: float) -> pb.RenewReply:
        """Ask for a renewed certificate over this link's channel: the same mutually
        authenticated identity as the stream (raises LinkError; UNIMPLEMENTED from a
        coordinator that predates renewal)."""
        try:
            reply: pb.RenewReply = self._stub.Renew(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise LinkError(code.name if code is not None else "UNKNOWN", detail or "") from None
        return reply

    def _messages(self) -> Iterator[pb.CoordinatorMessage]:
        assert self._call is not None
        try:
            for message in self._call:
                self.bytes_in += message.ByteSize()
                if self._note(message):
                    yield message
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise LinkError(code.name if code is not None else "UNKNOWN", detail or "") from None

    def send(self, message: pb.SiloMessage | OutBlob) -> None:
        self._out.put(message)

    def close(self) -> None:
        """End our half of the stream, cancel the call and close the channel."""
        self._out.put(None)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()

"""The silo's one outbound gRPC stream to the coordinator, over mTLS.

Rule: the only silo module that imports grpc. It dials out (never listens), sends what the
runner queues (heartbeats when idle; blobs expanded into header + chunks of at most 1 MiB only
as they are sent) and yields what the coordinator sends. Every gRPC failure becomes a
`LinkError` with the status code's name and the coordinator's detail, so the runner never sees
grpc types.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.chunking import describe, split

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Status codes after which trying again cannot help until an operator acts.
FATAL_CODES = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"})


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
        heartbeat_s: float = 5.0,
    ) -> None:
        options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
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
        self._heartbeat_s = heartbeat_s
        self._call: grpc.Future | None = None
        self.bytes_out = 0
        self.bytes_in = 0

    def _requests(self, hello: pb.Hello) -> Iterator[pb.SiloMessage]:
        yield pb.SiloMessage(hello=hello)
        while True:
            try:
                item = self._out.get(timeout=self._heartbeat_s)
            except queue.Empty:
                beat = pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))
                yield pb.SiloMessage(heartbeat=beat)
                continue
            if item is None:
                return
            if isinstance(item, OutBlob):
                yield from _blob_messages(item)
                self.bytes_out += len(item.data)
            else:
                self.bytes_out += item.ByteSize()
                yield item
            self._out.task_done()  # gRPC took everything of this item

    def flush(self, timeout_s: float) -> bool:
        """Wait until gRPC has taken every queued message (bounded); True when it has."""
        deadline = time.monotonic() + timeout_s
        while self._out.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._out.unfinished_tasks

    def open(self, hello: pb.Hello) -> Iterator[pb.CoordinatorMessage]:
        """Start the stream; iterate the result for coordinator messages (raises LinkError)."""
        self._call = self._stub.Connect(self._requests(hello))
        return self._messages()

    def _messages(self) -> Iterator[pb.CoordinatorMessage]:
        assert self._call is not None
        try:
            for message in self._call:
                self.bytes_in += message.ByteSize()
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


def _blob_messages(blob: OutBlob) -> Iterator[pb.SiloMessage]:
    meta = describe(blob.data, blob.sha256)
    yield pb.SiloMessage(
        blob_header=pb.BlobHeader(
            round_id=blob.round_id,
            kind=blob.kind,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            chunk_count=meta.chunk_count,
        )
    )
    for index, data in enumerate(split(blob.data)):
        chunk = pb.BlobChunk(round_id=blob.round_id, kind=blob.kind, index=index, data=data)
        yield pb.SiloMessage(blob_chunk=chunk)

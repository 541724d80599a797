"""Sending the model to many silos (issue 14): chunks framed once, and download slots.

- protos/blobs.py:serialized_chunks gives exactly the bytes SerializeToString would, and the
  server sends them without a message object (coordinator/transport/server.py);
- coordinator/runtime/downloads.py: at most K streams send a model at once, first come first
  served; a holder that stops taking chunks (or trickles) loses its slot and its stream is ended,
  on a fake clock; N streams through K slots all receive the model;
- the hub: its tick takes the slot back from a silo that stopped reading and drops the silo,
  and a silo waiting behind it then gets the model.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import torch

from coordinator.config import load_coordinator_config
from coordinator.runtime.clock import SYSTEM_CLOCK
from coordinator.runtime.downloads import DownloadSlots
from coordinator.runtime.stream import Blob, Outgoing, SiloStream
from coordinator.transport.server import federation_handlers, serialize_response
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos.blobs import Serialized, serialized_chunks
from secagg.chunking import split
from tests.fakes import FakeClock
from tests.federation_helpers import provision, write_coordinator_config
from tests.hub_harness import delta_of, make_harness

MIB = 1 << 20
SIZES = (0, 1, 127, 128, 16_383, 16_384, MIB - 1, MIB, MIB + 1, 3 * MIB + 5)


# ---- framing ----------------------------------------------------------------------------------


def _as_messages(
    message: type[pb.CoordinatorMessage] | type[pb.SiloMessage],
    round_id: int,
    kind: pb.BlobKind.ValueType,
    data: bytes,
) -> list[bytes]:
    """What the library serialises for each chunk of `data`."""
    return [
        message(
            blob_chunk=pb.BlobChunk(round_id=round_id, kind=kind, index=i, data=chunk)
        ).SerializeToString()
        for i, chunk in enumerate(split(data))
    ]


def test_data_is_the_last_field_of_a_chunk() -> None:
    """The framing appends the chunk after the library's fields: it must be written last."""
    fields = pb.BlobChunk.DESCRIPTOR.fields
    assert max(fields, key=lambda f: f.number).name == "data"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("message", [pb.CoordinatorMessage, pb.SiloMessage])
def test_framed_chunks_are_byte_identical_to_serialize_to_string(
    size: int, message: type[pb.CoordinatorMessage] | type[pb.SiloMessage]
) -> None:
    data = os.urandom(size)
    for round_id in (0, 1, 300, 2**64 - 1):
        for kind in (pb.BLOB_KIND_UNSPECIFIED, pb.GLOBAL_MODEL, pb.MASKED_VECTOR):
            framed = list(serialized_chunks(message, round_id=round_id, kind=kind, data=data))
            assert framed == _as_messages(message, round_id, kind, data), (round_id, kind)


def test_framed_chunks_read_a_mapped_file_in_place(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 17)
    path = tmp_path / "model"
    path.write_bytes(data)
    with (
        path.open("rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as view,  # as the stream reads a mapped checkpoint
    ):
        framed = list(
            serialized_chunks(pb.CoordinatorMessage, round_id=7, kind=pb.GLOBAL_MODEL, data=view)
        )
    assert framed == _as_messages(pb.CoordinatorMessage, 7, pb.GLOBAL_MODEL, data)
    parsed = [pb.CoordinatorMessage.FromString(f).blob_chunk for f in framed]
    assert b"".join(c.data for c in parsed) == data
    assert [c.index for c in parsed] == [0, 1, 2]


def test_a_serialized_message_is_handed_over_once() -> None:
    frame = Serialized(b"\x22\x00")
    assert frame.size == 2
    assert frame.take() == b"\x22\x00"
    with pytest.raises(RuntimeError):
        frame.take()
    assert frame.size == 2  # still counted


def test_the_response_serializer_passes_serialized_bytes_through_and_serializes_messages() -> None:
    data = pb.CoordinatorMessage(blob_chunk=pb.BlobChunk(index=3, data=b"x" * 100))
    raw = data.SerializeToString()
    frame = Serialized(raw)
    assert serialize_response(frame) is raw  # not copied
    message = pb.CoordinatorMessage(welcome=pb.Welcome(federation_id="f", silo_id="s"))
    assert serialize_response(message) == message.SerializeToString()


class _Recorder:
    """Stands in for a grpc.Server: keeps what the generated registration adds."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, object] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        del handlers

    def add_registered_method_handlers(self, name: str, handlers: dict[str, object]) -> None:
        self.name, self.handlers = name, handlers


def test_the_servers_handlers_are_the_generated_ones_but_for_the_serializer() -> None:
    class Servicer:
        def Connect(self) -> None: ...  # noqa: N802 - gRPC method names
        def GetStatus(self) -> None: ...  # noqa: N802
        def Renew(self) -> None: ...  # noqa: N802

    servicer = Servicer()
    generated = _Recorder()
    pb_grpc.add_FederationServicer_to_server(servicer, generated)  # type: ignore[arg-type]
    name, ours = federation_handlers(servicer)
    assert name == generated.name == "silofed.v1.Federation"
    assert ours.keys() == generated.handlers.keys()
    hello = pb.SiloMessage(hello=pb.Hello(silo_id="s", wire_version="1.0")).SerializeToString()
    for method, handler in ours.items():
        theirs = generated.handlers[method]
        for attr in ("request_streaming", "response_streaming"):
            assert getattr(handler, attr) == getattr(theirs, attr), (method, attr)
        behaviour = "_".join("stream" if s else "unary" for s in (
            handler.request_streaming, handler.response_streaming,
        ))  # fmt: skip
        assert getattr(handler, behaviour) == getattr(servicer, method)
        if method == "Connect":
            assert handler.request_deserializer(hello) == theirs.request_deserializer(hello)  # type: ignore[attr-defined]
        assert handler.response_serializer is serialize_response


# ---- a stream sends a blob ----------------------------------------------------------------------


class _Cancel:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def _stream(name: str, slots: DownloadSlots | None) -> tuple[SiloStream, _Cancel]:
    stream = SiloStream(name, 0.0, 0.0, on_delivered=lambda s, r: None, downloads=slots)
    cancel = _Cancel()
    stream.attach_stream(cancel)
    return stream, cancel


def _model(size: int) -> tuple[bytes, Blob]:
    data = os.urandom(size)
    return data, Blob(3, pb.GLOBAL_MODEL, data, hashlib.sha256(data).digest())


def _blob_frames(stream: SiloStream) -> Iterator[Outgoing]:
    """The stream's next item, which must be a blob: its header and chunks, lazily."""
    frames = stream.next_messages(0)
    assert frames is not None
    return iter(frames)


def _parse(sent: Outgoing) -> pb.CoordinatorMessage:
    return pb.CoordinatorMessage.FromString(sent.take()) if isinstance(sent, Serialized) else sent


def test_a_blob_is_sent_within_a_slot_and_counted_as_the_messages_it_replaces() -> None:
    clock = FakeClock()
    slots = DownloadSlots(1, clock=clock, progress_s=30.0)
    stream, _ = _stream("a", slots)
    data, blob = _model(2 * MIB + 5)
    stream.send(blob)
    assert slots.holders == []  # queued only: no slot, nothing framed
    frames = _blob_frames(stream)
    header = _parse(next(frames)).blob_header
    assert slots.holders == ["a"]  # taken before the header
    chunks = [next(frames) for _ in range(header.chunk_count)]
    assert slots.holders == ["a"]  # the last chunk's send has not completed yet
    with pytest.raises(StopIteration):
        next(frames)  # the writer asks for more only once the last send completed
    assert slots.holders == []
    assert all(isinstance(c, Serialized) for c in chunks)
    sizes = [c.size for c in chunks if isinstance(c, Serialized)]
    received = [_parse(c).blob_chunk for c in chunks]
    assert b"".join(c.data for c in received) == data
    expected = pb.CoordinatorMessage(blob_header=header).ByteSize() + sum(
        len(m) for m in _as_messages(pb.CoordinatorMessage, 3, pb.GLOBAL_MODEL, data)
    )
    assert stream.bytes_out == stream.round_bytes_out == expected
    assert sum(sizes) == expected - pb.CoordinatorMessage(blob_header=header).ByteSize()
    assert stream.queue.pending_bytes == 0


def test_a_stream_that_ends_mid_blob_gives_its_slot_back() -> None:
    slots = DownloadSlots(1, clock=FakeClock(), progress_s=30.0)
    stream, _ = _stream("a", slots)
    stream.send(_model(3 * MIB)[1])
    frames = _blob_frames(stream)
    assert isinstance(frames, Generator)
    next(frames)
    next(frames)
    assert slots.holders == ["a"]
    frames.close()  # what collecting an abandoned writer does (the hub releases it too)
    assert slots.holders == []


def test_a_holder_that_stops_taking_chunks_loses_its_slot_to_a_waiter_and_its_stream_ends() -> None:
    """One thread, a fake clock: the waiter's waits move the clock, and the waiter itself takes
    the slot back from the holder once `progress_s` passed without a chunk."""
    clock = FakeClock()
    slots = DownloadSlots(1, clock=clock, progress_s=5.0)
    idle, idle_cancel = _stream("idle", slots)
    honest, honest_cancel = _stream("honest", slots)
    data, blob = _model(2 * MIB)
    idle.send(blob)
    honest.send(blob)
    idle_frames = _blob_frames(idle)
    next(idle_frames)  # the header: idle holds the slot, then never takes another message
    started = clock.monotonic()
    honest_frames = _blob_frames(honest)
    header = _parse(next(honest_frames))  # waits (on the fake clock) until idle's slot is freed
    assert header.HasField("blob_header")
    assert clock.monotonic() - started >= 5.0
    assert slots.holders == ["honest"] and slots.evicted == 1
    assert idle.stalled is not None and idle.stalled.startswith("download stalled")
    assert idle_cancel.calls == 1 and honest_cancel.calls == 0
    with pytest.raises(StopIteration):
        next(idle_frames)  # no further chunk goes out on the ended stream
    assert idle.next_messages(0) is None
    chunks = [_parse(f).blob_chunk.data for f in honest_frames]
    assert b"".join(chunks) == data
    assert slots.holders == []


def test_a_trickling_holder_loses_its_slot_at_the_total_bound() -> None:
    clock = FakeClock()
    slots = DownloadSlots(1, clock=clock, progress_s=5.0, min_rate=MIB)
    stream, cancel = _stream("slow", slots)
    stream.send(_model(4 * MIB)[1])
    frames = _blob_frames(stream)
    next(frames)
    for _ in range(2):  # a chunk every 4 s: progress, within 5 s + 4 MiB at 1 MiB/s so far
        clock.advance(4.0)
        next(frames)
    assert slots.evict_stalled() == 0
    clock.advance(1.0)  # 9 s: the bound (5 s + 4 s)
    assert slots.evict_stalled() == 1
    assert stream.stalled is not None and stream.stalled.startswith("download too slow")
    assert cancel.calls == 1
    assert slots.holders == []


def test_progress_keeps_a_slot_and_waiters_are_served_first_come_first_served() -> None:
    clock = FakeClock()
    slots = DownloadSlots(1, clock=clock, progress_s=5.0)
    a, b, c = (_stream(n, None)[0] for n in "abc")
    assert slots.acquire(a, 64 * MIB, 0)  # its total bound: 5 s + 64 MiB at 256 KiB/s
    assert not slots.acquire(b, MIB, 0)
    assert not slots.acquire(c, MIB, 0)
    assert slots.waiting == ["b", "c"]
    for _ in range(3):  # a moves every 4 s: never idle for 5 s
        clock.advance(4.0)
        slots.moved(a)
        assert slots.evict_stalled() == 0
    slots.release(a)
    slots.release(a)  # idempotent
    assert not slots.acquire(c, MIB, 0)  # b is first in line
    assert slots.acquire(b, MIB, 0)
    slots.release(c)  # c gives up waiting: out of the line
    assert slots.waiting == [] and slots.holders == ["b"]


def test_slots_need_a_positive_count() -> None:
    with pytest.raises(ValueError):
        DownloadSlots(0, clock=FakeClock(), progress_s=1.0)


def test_n_streams_through_k_slots_all_receive_the_model_never_more_than_k_at_once() -> None:
    """Real threads, one writer per stream, as the servicer runs them."""
    n, k = 10, 3
    slots = DownloadSlots(k, clock=SYSTEM_CLOCK, progress_s=60.0)
    data, blob = _model(3 * MIB + 1)
    streams = [_stream(f"s{i}", slots)[0] for i in range(n)]
    received: dict[str, bytes] = {}
    most: list[int] = []
    start = threading.Barrier(n)

    def writer(stream: SiloStream) -> None:
        stream.send(blob)
        start.wait(10)
        chunks = []
        for sent in _blob_frames(stream):
            most.append(len(slots.holders))
            message = _parse(sent)
            if message.HasField("blob_chunk"):
                chunks.append(message.blob_chunk.data)
            time.sleep(0.002)  # a send takes a while: the writers overlap
        received[stream.silo_id] = b"".join(chunks)

    threads = [threading.Thread(target=writer, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert received == {s.silo_id: data for s in streams}
    assert max(most) == k  # they did overlap, and never past the bound
    assert slots.holders == [] and slots.waiting == [] and slots.evicted == 0


# ---- the hub -------------------------------------------------------------------------------------


def test_max_concurrent_downloads_is_read_from_the_server_table(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "dl", ["a"])
    path = write_coordinator_config(
        tmp_path / "c.toml", fed, state_dir=tmp_path / "s", task_spec="x:y", rounds=1, min_silos=1
    )
    assert load_coordinator_config(path).server.max_concurrent_downloads == 8
    text = path.read_text()
    assert "[server]\n" in text
    path.write_text(text.replace("[server]\n", "[server]\nmax_concurrent_downloads = 1\n"))
    assert load_coordinator_config(path).server.max_concurrent_downloads == 1


def big_model() -> torch.nn.Module:
    """Three chunks: the stream that stops reading is stuck mid-blob."""
    torch.manual_seed(0)
    return torch.nn.Linear(512, 1024, bias=False)


def test_the_tick_takes_back_a_stalled_slot_and_drops_the_silo_and_the_waiter_gets_the_model(
    tmp_path: Path,
) -> None:
    h = make_harness(
        tmp_path,
        ("a", "x"),
        min_silos=1,
        offer_s=60.0,
        deadlines={"upload_progress_s": 5.0},
        model_factory=big_model,
    )
    h.hub.downloads = DownloadSlots(1, clock=h.clock, progress_s=5.0)  # one slot, before admit
    a, x = h.connect("a", "x")
    assert a.stream is not None and x.stream is not None
    with h.round_thread() as driver:
        h.wait_until("offered", lambda: h.hub.round is not None)
        h.wait_until("queued", lambda: x.stream is not None and len(x.stream.queue._items) >= 2)
        assert x.stream.next_messages(0)  # the offer
        x_frames = _blob_frames(x.stream)
        next(x_frames)  # x holds the only slot, then stops reading
        waiter = threading.Thread(target=a.drain, daemon=True)
        waiter.start()
        h.wait_until("a waits for the slot", lambda: h.hub.downloads.waiting == [a.silo_id])
        h.clock.advance(5.0)  # no chunk taken by x for upload_progress_s
        waiter.join(10)
        assert not waiter.is_alive()
        h.wait_until("x dropped", lambda: x.silo_id not in h.hub.sessions)
        assert x.stream.stalled is not None and x.stream.closed
        with pytest.raises(StopIteration):
            next(x_frames)
        round_id = h.hub.round.round_id if h.hub.round is not None else 0
        h.wait_until("train", lambda: h.phase() == "train")
        a.report_and_upload(round_id, delta_of(a.model(), 0.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed"
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (x.silo_id, "offer", "DISCONNECTED")
    ]
    assert h.hub.downloads.holders == [] and h.hub.downloads.evicted == 1

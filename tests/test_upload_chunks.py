"""Upload chunk sizes (wire 1.2): a silo of 1.2 or later cuts its uploads into the chunks its
Welcome names, an older one into 1 MiB chunks.

Why it exists: gRPC keeps, on every connection, a read buffer as large as the largest message it
read there, so 1 MiB chunks cost the coordinator about 1.2 MiB per silo for good
(docs/benchmarks.md). Against the real `Hub` (tests/hub_harness.py, real secagg sessions):
silos of both kinds in one round, and members that cut their vector otherwise than agreed.
Against the real silo `Link` over mTLS (a scripted coordinator): the size the Welcome names is
followed when this agent cuts such chunks, and a coordinator that names a tiny or a huge one
cannot make the silo cut its vector into millions of messages or oversized ones.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from protos import federation_pb2 as pb
from secagg.chunking import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, describe
from silo_agent.transport.connection import Link, OutBlob
from silofed.wire import UPLOAD_CHUNK_BYTES
from tests.federation_helpers import provision, serve_scripted
from tests.hub_harness import HubHarness, RoundThread, SecureSilo, make_harness
from tests.test_hub import (
    _assert_completed_with_the_mean_of_1_2_3,
    _masked_inputs_1_2_3,
    _until_masked,
    _until_over,
)
from tests.test_upload_grants import _ScriptedCoordinator, _wait


def wide_model() -> torch.nn.Module:
    """65,792 parameters: a masked vector of 257 KiB, 3 chunks of 128 KiB or 1 of 1 MiB."""
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256)


def _federation(tmp_path: Path, wires: tuple[str, ...]) -> tuple[HubHarness, list[SecureSilo]]:
    """One silo per wire version in `wires` (a, b, c, ...); a round completes with any 3."""
    names = tuple("abcd"[: len(wires)])
    h = make_harness(
        tmp_path,
        names,
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 1000.0, "max_concurrent_uploads": 1, "threshold": 3},
        model_factory=wide_model,
    )
    silos = [h.silo(n) for n in names]
    secure = [s for s in silos if isinstance(s, SecureSilo)]
    for silo, version in zip(secure, wires, strict=True):
        silo.wire_version = version
        silo.connect()
    return h, secure


def _granted(silo: SecureSilo, round_id: int) -> bool:
    silo.drain()
    return any(g.round_id == round_id for g in silo.grants())


def _masked(h: HubHarness, silos: list[SecureSilo]) -> int:
    """The round in its masked phase, every silo's vector masked (not sent)."""
    round_id = _until_masked(h, silos)
    for silo in silos:
        silo.masked_upload(1.0)
    return round_id


def _upload(silo: SecureSilo, round_id: int) -> None:
    """Header, then (once granted, for a silo that waits for grants) the chunks."""
    silo.send_masked_header(round_id)
    if silo.wire_version:
        assert _wait(lambda: _granted(silo, round_id)), silo.name
    silo.send_masked_chunks(round_id)


def _the_others_finish(
    h: HubHarness, round_id: int, others: list[SecureSilo], driver: RoundThread
) -> None:
    """`others` upload in turn; the round completes with them alone."""
    for silo in others:
        _upload(silo, round_id)
    _until_over(h, others, driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert detail.participants["finished"] == tuple(s.silo_id for s in others)


def test_the_welcome_names_the_chunk_size_to_silos_of_wire_1_2_only(tmp_path: Path) -> None:
    h, (a, b, c) = _federation(tmp_path, ("1.0", "1.1", "1.2"))
    told = {s.name: h.hub.welcome(s.stream).upload_chunk_bytes for s in (a, b, c) if s.stream}
    expected = {s.name: s.stream.upload_chunk_bytes for s in (a, b, c) if s.stream}
    assert told == {"a": 0, "b": 0, "c": UPLOAD_CHUNK_BYTES}
    assert expected == {"a": None, "b": None, "c": UPLOAD_CHUNK_BYTES}


def test_silos_cutting_1_mib_and_128_kib_chunks_finish_one_round_with_the_right_sum(
    tmp_path: Path,
) -> None:
    h, (a, b, c) = _federation(tmp_path, ("1.1", "1.2", "1.2"))
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _masked_inputs_1_2_3(h, [a, b, c])
        for silo in (a, b, c):
            _upload(silo, round_id)
        _until_over(h, [a, b, c], driver)
    _assert_completed_with_the_mean_of_1_2_3(h, round_id, [a, b, c], before)


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (MAX_CHUNK_BYTES, "needs 3 chunks"),  # counted and cut as before 1.2
        (UPLOAD_CHUNK_BYTES // 2, "needs 3 chunks"),  # smaller than agreed
    ],
)
def test_a_member_that_cuts_its_vector_otherwise_than_agreed_is_refused_and_the_round_completes(
    tmp_path: Path, cut: int, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    h, (a, b, c, d) = _federation(tmp_path, ("1.2", "1.2", "1.2", "1.2"))
    d.chunk_bytes = cut
    with caplog.at_level(logging.INFO), h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        d.send_masked_header(round_id)  # refused at its header: never granted
        d.send_masked_chunks(round_id)  # ignored
        assert not _granted(d, round_id)
        _the_others_finish(h, round_id, [a, b, c], driver)
    assert why in caplog.text


def test_a_chunk_larger_than_agreed_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The header counts 128 KiB chunks, the chunks that follow are 1 MiB: the first one is
    refused, nothing past it is copied."""
    h, (a, b, c, d) = _federation(tmp_path, ("1.2", "1.2", "1.2", "1.2"))
    with caplog.at_level(logging.INFO), h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        d.send_masked_header(round_id)
        assert _wait(lambda: _granted(d, round_id))
        d.chunk_bytes = MAX_CHUNK_BYTES
        d.send_masked_chunks(round_id)
        _the_others_finish(h, round_id, [a, b, c], driver)
    assert f"more than {UPLOAD_CHUNK_BYTES}" in caplog.text


# ---- the real Link against a coordinator that names a chunk size ------------------------------


class _Naming(_ScriptedCoordinator):
    """Welcomes without grants, naming `chunk_bytes` as the upload chunk size."""

    def __init__(self, chunk_bytes: int) -> None:
        super().__init__(grants=False)
        self.chunk_bytes = chunk_bytes

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorMessage]:
        messages = super().Connect(request_iterator, context)
        next(messages)  # the parent's Welcome, replaced by ours
        yield pb.CoordinatorMessage(welcome=pb.Welcome(upload_chunk_bytes=self.chunk_bytes))
        yield from messages


VECTOR = bytes(range(256)) * (3 << 12)  # 3 MiB


def _cut_by_link(tmp_path: Path, named: int, *, wire_version: str = "") -> list[pb.SiloMessage]:
    """What the real Link sends of a 3 MiB masked vector to a coordinator naming `named`."""
    fed = provision(tmp_path / "fed", "chunks", ["a"])
    coordinator = _Naming(named)
    running, tls = serve_scripted(coordinator, fed, "a")
    sent: list[OutBlob] = []
    link = Link(
        f"127.0.0.1:{running.port}",
        tls,
        server_name="localhost",
        on_sent=lambda item: sent.append(item) if isinstance(item, OutBlob) else None,
    )
    try:
        stream = link.open(pb.Hello(silo_id="spiffe://chunks/silo/a", wire_version=wire_version))
        welcomed = threading.Event()

        def read() -> None:
            try:
                for message in stream:
                    if message.HasField("welcome"):
                        welcomed.set()
            except Exception:  # noqa: BLE001 - the link closed at the test's end
                return

        threading.Thread(target=read, daemon=True).start()
        assert welcomed.wait(10.0)
        link.send(OutBlob(4, pb.MASKED_VECTOR, VECTOR, protocol_header=b"signed"))
        assert _wait(lambda: len(sent) == 1), coordinator.kinds()
        blob = [
            m for m in coordinator.received if m.WhichOneof("kind") in ("blob_header", "blob_chunk")
        ]
        header = blob[0].blob_header
        chunks = [m.blob_chunk for m in blob[1:]]
        assert b"".join(c.data for c in chunks) == VECTOR
        assert header.sha256 == hashlib.sha256(VECTOR).digest()
        assert header.chunk_count == len(chunks) == sent[0].chunk_count  # the ledger's count
        return blob
    finally:
        coordinator.outbox.put(None)
        link.close()
        running.stop()


def test_the_link_cuts_uploads_into_the_chunks_the_welcome_names(tmp_path: Path) -> None:
    blob = _cut_by_link(tmp_path, UPLOAD_CHUNK_BYTES)
    sizes = [len(m.blob_chunk.data) for m in blob[1:]]
    assert sizes == [UPLOAD_CHUNK_BYTES] * (len(VECTOR) // UPLOAD_CHUNK_BYTES)
    assert describe(VECTOR, chunk_bytes=UPLOAD_CHUNK_BYTES).chunk_count == len(sizes)


def test_a_link_that_announced_wire_1_1_cuts_1_mib_chunks_whatever_the_welcome_names(
    tmp_path: Path,
) -> None:
    blob = _cut_by_link(tmp_path, UPLOAD_CHUNK_BYTES, wire_version="1.1")
    assert [len(m.blob_chunk.data) for m in blob[1:]] == [MAX_CHUNK_BYTES] * 3


@pytest.mark.parametrize("named", [1, MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1, (1 << 32) - 1])
def test_a_coordinator_naming_a_size_outside_the_agents_range_gets_1_mib_chunks_and_a_warning(
    tmp_path: Path, named: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        blob = _cut_by_link(tmp_path, named)
    assert [len(m.blob_chunk.data) for m in blob[1:]] == [MAX_CHUNK_BYTES] * 3
    assert f"asked for upload chunks of {named} bytes" in caplog.text

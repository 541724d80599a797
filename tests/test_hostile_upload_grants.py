"""Upload grants (wire 1.1) under attack, from both ends.

A hostile member of wire 1.1 against the real `Hub` (tests/hub_harness.py: real secagg sessions
for every silo, one upload slot, a fake clock): what it does with the line for the upload slot
costs it its own upload only: the honest silos behind it are granted in order, nothing raises on
the hub's lock paths, and the line is empty when the round is over.

A broken or dishonest coordinator (a scripted mTLS server) against the real silo `Link`: grants
for other rounds, floods of them, an abort naming a round that was never offered, and a Welcome
sent again and again (the real runner).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.transport.servicer import Refused
from protos import federation_pb2 as pb
from secagg.chunking import describe
from silo_agent.transport.connection import Link, OutBlob
from tests.federation_helpers import provision, serve_scripted
from tests.hub_harness import HubHarness, SecureSilo, make_harness
from tests.test_hub import _until_masked, _until_over
from tests.test_roster_delivery import runner
from tests.test_upload_grants import QUIET_S, _ScriptedCoordinator, _wait

UINT64_MAX = (1 << 64) - 1


# ---- a hostile member against the real hub ------------------------------------------------------


def _four(tmp_path: Path, **deadlines: float) -> tuple[HubHarness, list[SecureSilo]]:
    """a, b, c honest and d hostile, all of wire 1.1; one upload slot; 3 of 4 may finish."""
    h = make_harness(
        tmp_path,
        ("a", "b", "c", "d"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0, "max_concurrent_uploads": 1, "threshold": 3},
        deadlines=deadlines or None,
    )
    silos = [h.silo(n) for n in ("a", "b", "c", "d")]
    assert all(isinstance(s, SecureSilo) for s in silos)
    secure = [s for s in silos if isinstance(s, SecureSilo)]
    for s in secure:
        s.wire_version = "1.1"
        s.connect()
    return h, secure


def _masked(h: HubHarness, silos: list[SecureSilo]) -> int:
    round_id = _until_masked(h, silos)
    for s in silos:
        s.masked_upload(1.0)
    return round_id


def _send(silo: SecureSilo, **kind: object) -> None:
    """What a hostile member sends must never raise on the hub (a Refused is an exception
    the hub caught on its lock path: a protocol violation it did not foresee)."""
    try:
        silo.send(**kind)
    except Refused as exc:  # pragma: no cover - the failure this file looks for
        raise AssertionError(f"the hub raised on {silo.name}'s message: {exc}") from exc


def _header(silo: SecureSilo, round_id: int, *, extra_bytes: int = 0) -> pb.BlobHeader:
    assert silo.upload is not None
    data = silo.upload.vector.tobytes()
    meta = describe(data, hashlib.sha256(data).digest())
    return pb.BlobHeader(
        round_id=round_id,
        kind=pb.MASKED_VECTOR,
        total_bytes=meta.total_bytes + extra_bytes,
        sha256=meta.sha256,
        chunk_count=meta.chunk_count,
        protocol_header=silo.upload.header,
    )


def _granted(silo: SecureSilo) -> list[int]:
    silo.drain()
    return [g.round_id for g in silo.grants()]


def _upload_in_turn(h: HubHarness, round_id: int, line: list[SecureSilo]) -> None:
    """Each silo of `line` (in the hub's line, in this order) is granted when the one before
    it has uploaded, uploads, and passes the slot on."""
    for s in line:
        assert [r for r in _granted(s) if r == round_id] == [round_id], s.name
        s.send_masked_chunks(round_id)
        assert s.stream is not None and not s.stream.upload_slot
    assert not h.hub.slots.waiting


def _drops(h: HubHarness, round_id: int) -> list[tuple[str, str, str]]:
    detail = h.hub.roundlog.round_detail(round_id)
    return [(d.silo_id.rsplit("/", 1)[-1], d.phase, d.reason) for d in detail.dropouts]


def test_chunks_before_the_grant_and_a_second_header_cost_the_hostile_member_its_upload(
    tmp_path: Path,
) -> None:
    h, (a, b, c, d) = _four(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        a.send_masked_header(round_id)  # a holds the only slot
        _send(d, blob_header=_header(d, round_id))
        assert d.stream is not None and list(h.hub.slots.waiting) == [d.stream]
        d.send_masked_chunks(round_id)  # not granted: ignored, nothing buffered
        assert d.stream.upload is None and d.stream.upload_buffer is None
        _send(d, blob_header=_header(d, round_id))  # a second header while in line
        assert not h.hub.slots.waiting and d.stream.awaiting_grant is None
        _send(d, blob_header=_header(d, round_id + 1))  # another round's: refused, no line
        assert not h.hub.slots.waiting
        b.send_masked_header(round_id)
        c.send_masked_header(round_id)
        a.send_masked_chunks(round_id)
        _upload_in_turn(h, round_id, [b, c])
        assert _granted(d) == []
        _until_over(h, [a, b, c], driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert _drops(h, round_id) == [("d", "masked", "INVALID")]


def test_a_waiter_that_reconnects_and_sends_its_header_again_leaves_no_trace_in_the_line(
    tmp_path: Path,
) -> None:
    h, (a, b, c, d) = _four(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        a.send_masked_header(round_id)
        b.send_masked_header(round_id)
        _send(d, blob_header=_header(d, round_id))
        old = d.stream
        assert b.stream is not None and list(h.hub.slots.waiting) == [b.stream, old]
        for _ in range(3):  # reconnect, header again: bounded
            d.connect()
            _send(d, blob_header=_header(d, round_id))
        assert list(h.hub.slots.waiting) == [b.stream]  # no d, old or new, nor twice
        c.send_masked_header(round_id)
        a.send_masked_chunks(round_id)
        _upload_in_turn(h, round_id, [b, c])
        _until_over(h, [a, b, c], driver)
    assert h.hub.roundlog.round_detail(round_id).status.value == "completed"
    assert _drops(h, round_id) == [("d", "masked", "DISCONNECTED")]


def test_a_granted_member_that_sends_no_chunk_passes_the_slot_on_after_upload_progress_s(
    tmp_path: Path,
) -> None:
    h, (a, b, c, d) = _four(tmp_path, upload_progress_s=20.0, train_s=600.0)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        _send(d, blob_header=_header(d, round_id))
        assert _granted(d) == [round_id]  # and then nothing
        for s in (a, b, c):
            s.send_masked_header(round_id)
        h.clock.advance(19.0)
        h.ticks(3)
        assert _granted(a) == []
        h.clock.advance(1.0)
        h.ticks(3)
        _upload_in_turn(h, round_id, [a, b, c])
        _until_over(h, [a, b, c], driver)
    assert h.hub.roundlog.round_detail(round_id).status.value == "completed"
    assert _drops(h, round_id) == [("d", "masked", "INVALID")]


def test_a_bad_header_is_refused_before_it_joins_the_line(
    tmp_path: Path,
) -> None:
    """The header's size is checked when it arrives: a header in line is never refused at its
    grant (which would hand the slot on recursively, one refusal after another)."""
    h, (a, b, c, d) = _four(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        a.send_masked_header(round_id)
        _send(d, blob_header=_header(d, round_id, extra_bytes=4))
        assert d.stream is not None and d.stream.awaiting_grant is None
        b.send_masked_header(round_id)
        c.send_masked_header(round_id)
        assert len(h.hub.slots.waiting) == 2
        a.send_masked_chunks(round_id)  # the slot goes to b
        assert _granted(d) == []
        _upload_in_turn(h, round_id, [b, c])
        _until_over(h, [a, b, c], driver)
    assert h.hub.roundlog.round_detail(round_id).status.value == "completed"
    assert _drops(h, round_id) == [("d", "masked", "INVALID")]


def test_a_slot_holder_that_sends_another_header_is_out_of_the_round_and_cannot_queue_again(
    tmp_path: Path,
) -> None:
    """Giving a slot back by sending some other blob header would let a member queue again and
    hold a slot once more at each turn: it is dropped instead."""
    h, (a, b, c, d) = _four(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        _send(d, blob_header=_header(d, round_id))  # d holds the only slot
        assert _granted(d) == [round_id]
        for s in (a, b, c):
            s.send_masked_header(round_id)
        stray = pb.BlobHeader(round_id=round_id, kind=pb.PLAINTEXT_UPDATE, total_bytes=1)
        _send(d, blob_header=stray)
        assert d.stream is not None and not d.stream.upload_slot
        _send(d, blob_header=_header(d, round_id))  # out of the round: refused, no line
        assert d.stream.awaiting_grant is None
        _upload_in_turn(h, round_id, [a, b, c])
        _until_over(h, [a, b, c], driver)
    assert h.hub.roundlog.round_detail(round_id).status.value == "completed"
    assert _drops(h, round_id) == [("d", "masked", "INVALID")]


def test_a_round_that_aborts_with_silos_in_line_leaves_the_next_round_a_clean_line(
    tmp_path: Path,
) -> None:
    h, (a, b, c, d) = _four(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked(h, [a, b, c, d])
        d.send_masked_header(round_id)  # d holds the slot; the others wait
        for s in (a, b, c):
            s.send_masked_header(round_id)
        assert len(h.hub.slots.waiting) == 3
        assert a.stream is not None and b.stream is not None
        h.hub.on_disconnect(a.stream, "test: a is gone")
        h.hub.on_disconnect(b.stream, "test: b is gone")  # 2 of 4 left: below threshold 3
        h.clock.advance(3600.0)  # past every deadline: c still in line, d holding the slot
        _until_over(h, [c, d], driver)
    assert h.hub.roundlog.round_detail(round_id).status.value == "aborted"
    assert not h.hub.slots.waiting
    assert all(s.stream is None or s.stream.awaiting_grant is None for s in (a, b, c, d))
    a.connect()
    b.connect()
    with h.round_thread() as driver:
        second = _masked(h, [a, b, c, d])
        assert second == round_id + 1
        for s in (a, b, c, d):
            s.send_masked_header(second)
        assert [r for r in _granted(a) if r == second] == [second]
        a.send_masked_chunks(second)
        _upload_in_turn(h, second, [b, c, d])
        _until_over(h, [a, b, c, d], driver)
    assert h.hub.roundlog.round_detail(second).status.value == "completed"


# ---- a broken or dishonest coordinator against the real Link ----------------------------------


class _Link:
    """The real Link over mTLS to a scripted coordinator that welcomes with grants."""

    def __init__(self, tmp_path: Path, *, wire_version: str = "") -> None:
        fed = provision(tmp_path / "fed", "grants", ["a"])
        self.coordinator = _ScriptedCoordinator(grants=True)
        self.running, tls = serve_scripted(self.coordinator, fed, "a")
        self.link = Link(f"127.0.0.1:{self.running.port}", tls, server_name="localhost")
        self.replies: list[str] = []
        hello = pb.Hello(silo_id="spiffe://grants/silo/a", wire_version=wire_version)
        stream = self.link.open(hello)

        def read() -> None:
            try:
                for message in stream:
                    self.replies.append(str(message.WhichOneof("kind")))
            except Exception:  # noqa: BLE001 - the link closed at the test's end
                return

        threading.Thread(target=read, daemon=True).start()
        assert _wait(lambda: self.replies == ["welcome"]), self.replies

    def send_vector(self, round_id: int) -> None:
        data = bytes(3 << 20)  # 3 chunks
        self.link.send(OutBlob(round_id, pb.MASKED_VECTOR, data, protocol_header=b"signed"))
        self.link.send(pb.SiloMessage(abort=pb.AbortNotice(round_id=round_id, detail="after")))

    def tell(self, message: pb.CoordinatorMessage) -> None:
        self.coordinator.outbox.put(message)

    def kinds(self) -> list[str]:
        return self.coordinator.kinds()

    def close(self) -> None:
        self.coordinator.outbox.put(None)
        self.link.close()
        self.running.stop()


@pytest.fixture
def link(tmp_path: Path) -> Iterator[_Link]:
    setup = _Link(tmp_path)
    yield setup
    setup.close()


ALL_SENT = ["hello", "blob_header", "blob_chunk", "blob_chunk", "blob_chunk", "abort"]


def test_a_flood_of_grants_for_other_rounds_neither_releases_the_chunks_nor_reaches_the_runner(
    link: _Link,
) -> None:
    link.send_vector(4)
    assert _wait(lambda: "blob_header" in link.kinds()), link.kinds()
    for n in range(2000):  # bounded
        grant = pb.UploadGrant(round_id=n % 4, kind=pb.BlobKind.ValueType(n % 4))
        link.tell(pb.CoordinatorMessage(upload_grant=grant))
    link.tell(pb.CoordinatorMessage(secagg=pb.SecAggFrame(round_id=4)))  # a marker after them
    assert _wait(lambda: link.replies == ["welcome", "secagg"]), link.replies[-3:]
    assert link.kinds() == ["hello", "blob_header"]
    link.tell(pb.CoordinatorMessage(upload_grant=pb.UploadGrant(round_id=4)))
    assert _wait(lambda: link.kinds() == ALL_SENT), link.kinds()
    assert link.replies == ["welcome", "secagg"]


def test_an_abort_naming_a_round_never_offered_does_not_give_up_later_uploads(
    link: _Link,
) -> None:
    """An AbortNotice for round 2^64-1 (never offered; the runner ignores it) made the link
    count every round up to it as over: each later masked vector was given up at its header,
    grant or not, for the rest of the stream."""
    link.tell(pb.CoordinatorMessage(abort=pb.AbortNotice(round_id=UINT64_MAX, detail="junk")))
    assert _wait(lambda: link.replies == ["welcome", "abort"]), link.replies
    link.send_vector(4)
    assert _wait(lambda: "blob_header" in link.kinds()), link.kinds()
    link.tell(pb.CoordinatorMessage(upload_grant=pb.UploadGrant(round_id=4)))
    assert _wait(lambda: link.kinds() == ALL_SENT, QUIET_S * 4), link.kinds()


def test_a_link_that_announced_wire_1_0_does_not_wait_for_grants(tmp_path: Path) -> None:
    """protos: a silo that announced 1.1 or later waits for grants; the coordinator grants only
    to those (Hub.admit), yet welcomes every silo with upload_grants = true and the link obeys
    the Welcome alone: a link announcing 1.0 waited for a grant that never comes."""
    setup = _Link(tmp_path, wire_version="1.0")
    try:
        setup.send_vector(4)
        assert _wait(lambda: setup.kinds() == ALL_SENT, QUIET_S * 4), setup.kinds()
    finally:
        setup.close()


def test_the_coordinator_promises_grants_only_to_silos_it_grants(tmp_path: Path) -> None:
    h = make_harness(
        tmp_path, ("a", "b", "c"), min_silos=3, aggregation="secagg", secagg={"clip_l2": 10.0}
    )
    old, new = h.silo("a"), h.silo("b")
    new.wire_version = "1.1"
    for silo in (old, new):
        stream = silo.connect()
        assert h.hub.welcome(stream).upload_grants == stream.upload_grants, silo.wire_version


class _WelcomingAgain(_ScriptedCoordinator):
    """Sends Welcome `times` times on the stream, then idles."""

    def __init__(self, times: int) -> None:
        super().__init__(grants=True)
        for _ in range(times - 1):
            self.outbox.put(pb.CoordinatorMessage(welcome=pb.Welcome(upload_grants=True)))


def test_a_coordinator_that_repeats_welcome_does_not_make_the_silo_start_a_thread_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = provision(tmp_path / "fed", "grants", ["a"])
    coordinator = _WelcomingAgain(times=50)
    running, _ = serve_scripted(coordinator, fed, "a")
    try:
        before = {t.ident for t in threading.enumerate()}
        with runner(tmp_path, fed.silos["a"], running.port):
            assert _wait(lambda: caplog.text.count("sent Welcome again") == 49), caplog.text.count(
                "sent Welcome again"
            )
            renewals = [
                t for t in threading.enumerate() if t.name == "renewal" and t.ident not in before
            ]
            assert len(renewals) == 1
    finally:
        coordinator.outbox.put(None)
        running.stop()

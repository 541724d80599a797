"""The coordinator's hub in memory (tests/hub_harness.py): real admission, round machines, round
log and outbound queues; fake silos on the hub's own streams; a fake clock, so every deadline
passes because the test says so, not because the test waited for it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from coordinator.rounds.stall import Diagnosis, Proceed
from coordinator.runtime import driver as round_driver
from coordinator.runtime.hub import Hub
from coordinator.runtime.serve import Outcome
from coordinator.runtime.stream import SiloStream
from coordinator.transport.servicer import RefusalCode, Refused
from protos import federation_pb2 as pb
from protos.names import abort_name
from secagg.chunking import Reassembler, split
from secagg.coordinator import CoordinatorRound
from secagg.identity import SiloId
from silofed.tensors import state_to_bytes
from tests.fakes import FakeClock
from tests.hub_harness import (
    DRIVER_THREAD,
    WAIT_S,
    FakeSilo,
    HubHarness,
    RoundThread,
    SecureSilo,
    delta_of,
    make_harness,
    small_model,
)
from tests.test_hostile_silo_input import HOSTILE, KEPT, SUMMARY


def _offered(h: HubHarness, *silos: FakeSilo) -> int:
    """Drain `silos` until the next round's offer reached them all (with the model; the
    delivery markers fire on the way) and return its round id."""
    before = {s.name: len(s.offers()) for s in silos}

    def arrived() -> bool:
        for s in silos:
            s.drain()
        return all(len(s.offers()) > before[s.name] for s in silos)

    h.wait_until("the offer", arrived)
    round_ids = {s.offers()[-1].round_id for s in silos}
    assert len(round_ids) == 1, round_ids
    return round_ids.pop()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    # torch.allclose: torch.testing.assert_close costs seconds of imports on its first call.
    assert torch.allclose(actual, expected, rtol=0, atol=atol), (actual, expected)


def _in_phase(h: HubHarness, phase: str) -> None:
    h.wait_until(f"phase {phase}", lambda: h.phase() == phase)


# ---- plaintext round, status -------------------------------------------------------------------


def test_a_plaintext_round_completes_and_status_shows_it_while_it_runs(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=2)
    a, b = h.connect("a", "b")
    start = h.clock.now()
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        _in_phase(h, "train")
        status = h.hub.status()
        assert (status.current_round, status.phase) == (round_id, "train")
        assert status.phase_started_unix == start
        assert sorted(s.silo_id for s in status.silos) == [a.silo_id, b.silo_id]
        assert all(s.bytes_out > 0 and s.connected_since_unix == start for s in status.silos)
        a.report_and_upload(round_id, delta_of(a.model(), 1.0), num_examples=10)
        b.report_and_upload(round_id, delta_of(b.model(), 4.0), num_examples=30)
        driver.finish()
    a.drain()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed"
    assert detail.participants["finished"] == (a.silo_id, b.silo_id)
    assert detail.weight_sum == 40
    assert detail.global_metrics == {"eval_score": 1.0}
    # FedAvg: old + (10·1 + 30·4) / 40
    for name, old in before.items():
        _assert_close(h.hub.global_state[name], old + 3.25)
    result = a.results()[-1]
    assert result.status == pb.ROUND_STATUS_COMPLETED
    assert result.new_model_sha256.hex() == detail.model_out_sha256
    status = h.hub.status()
    assert (status.current_round, status.phase, status.rounds_completed) == (0, "", 1)
    assert all(s.bytes_in > 0 for s in status.silos)


# ---- a round that cannot be configured ---------------------------------------------------------


def test_a_secure_round_with_too_few_silos_for_its_threshold_is_recorded_as_aborted(
    tmp_path: Path,
) -> None:
    h = make_harness(
        tmp_path,
        ("a", "b", "c"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0, "threshold": 5},
        rounds_extra={"max_consecutive_aborts": 2, "abort_backoff_initial_s": 3.0},
    )
    silos = h.connect("a", "b", "c")
    # No offer goes out: the round returns at once, on this thread.
    round_driver.run_one_round(h.hub, 0)
    detail = h.hub.roundlog.round_detail(1)
    assert detail.status.value == "aborted"
    assert detail.abort_reason is not None
    assert detail.abort_reason.startswith("CANNOT_CONFIGURE: [secagg] threshold 5")
    assert detail.participants["invited"] == tuple(sorted(s.silo_id for s in silos))
    assert detail.extra["aborted_in_a_row"] == 1 and detail.extra["next_attempt_in_s"] == 3.0
    verdict = h.hub.verdict
    assert isinstance(verdict, Proceed) and (verdict.aborted_in_a_row, verdict.wait_s) == (1, 3.0)
    for s in silos:
        s.drain()
        assert s.offers() == []
        assert [r.status for r in s.results()] == [pb.ROUND_STATUS_ABORTED]
    assert h.hub.status().aborted_in_a_row == 1
    # The same cause again reaches max_consecutive_aborts: the stall verdict, in the log too.
    round_driver.run_one_round(h.hub, 0)
    assert isinstance(h.hub.verdict, Diagnosis)
    assert "stalled" in h.hub.roundlog.round_detail(2).extra


# ---- deadlines, dropouts and aborts ------------------------------------------------------------


def test_a_silo_that_misses_the_train_deadline_is_dropped_with_a_notice_and_a_row(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=1, train_s=60.0)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        _in_phase(h, "train")
        a.report_and_upload(round_id, delta_of(a.model(), 1.0))
        h.clock.advance(59.0)  # one second early: nobody is dropped
        h.ticks()
        assert h.phase() == "train" and b.drain() == []
        h.clock.advance(1.0)
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed"
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (b.silo_id, "train", "TIMEOUT")
    ]
    b.drain()
    assert [(n.round_id, abort_name(n.code)) for n in b.aborts()] == [(round_id, "TIMEOUT")]
    assert detail.participants["finished"] == (a.silo_id,)


def test_a_round_whose_silos_all_miss_the_offer_deadline_is_aborted(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=1, offer_s=30.0)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        h.wait_until("the offer", lambda: bool(a.stream and a.stream.queue._items))
        assert h.phase() == "offer"
        h.clock.advance(30.0)  # neither silo reads its stream
        driver.finish()
    detail = h.hub.roundlog.round_detail(1)
    assert detail.status.value == "aborted"
    assert sorted((d.silo_id, d.phase, d.reason) for d in detail.dropouts) == [
        (a.silo_id, "offer", "TIMEOUT"),
        (b.silo_id, "offer", "TIMEOUT"),
    ]
    assert detail.extra["cause"] and detail.extra["aborted_in_a_row"] == 1
    a.drain()
    assert [abort_name(n.code) for n in a.aborts()] == ["TIMEOUT"]
    assert [r.status for r in a.results()] == [pb.ROUND_STATUS_ABORTED]
    assert a.results()[0].abort_reason == detail.abort_reason
    assert h.hub.completed_rounds() == 0


def test_a_silo_that_aborts_is_dropped_and_its_refusal_kept_for_the_diagnosis(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, ("a",), min_silos=1)
    (a,) = h.connect("a")
    with h.round_thread() as driver:
        round_id = _offered(h, a)
        a.send(
            abort=pb.AbortNotice(
                round_id=round_id, code=pb.ABORT_REASON_DECLINED, detail="not today"
            )
        )
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.phase, d.reason) for d in detail.dropouts] == [("train", "INVALID")]
    assert detail.status.value == "aborted"
    assert h.hub.verdict.cause  # the stall watch names the cause of the abort


def test_a_second_hello_is_a_protocol_violation_that_drops_the_silo(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=1)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        a.send(hello=pb.Hello(silo_id=a.silo_id))
        b.report_and_upload(round_id, delta_of(b.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(a.silo_id, "INVALID")]
    a.drain()
    assert "hello sent twice" in a.aborts()[-1].detail


def test_an_update_that_does_not_fit_the_model_is_refused_whole(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=1)
    a, b = h.connect("a", "b")
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        a.report_and_upload(round_id, {"weight": torch.zeros(3)})
        b.report_and_upload(round_id, delta_of(b.model(), 2.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(a.silo_id, "INVALID")]
    assert detail.participants["finished"] == (b.silo_id,)
    for name, old in before.items():
        _assert_close(h.hub.global_state[name], old + 2.0)


# ---- uploads -----------------------------------------------------------------------------------


def test_a_stalled_plaintext_upload_is_dropped_after_upload_progress_s(tmp_path: Path) -> None:
    h = make_harness(
        tmp_path, ("a", "b"), min_silos=1, train_s=600.0, deadlines={"upload_progress_s": 20.0}
    )
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        header = a.report_and_upload(round_id, delta_of(a.model(), 1.0), chunks=0)
        assert header.chunk_count >= 1
        h.ticks()  # the progress watch sees the new upload: its 20 s start now
        h.clock.advance(19.0)
        h.ticks()
        assert a.drain() == []  # still uploading
        h.clock.advance(1.0)
        h.wait_until("a dropped", lambda: bool(h.hub.roundlog.round_detail(round_id).dropouts))
        b.report_and_upload(round_id, delta_of(b.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (a.silo_id, "train", "INVALID")
    ]
    a.drain()
    assert "upload stalled: no chunk for 20.0 s" in a.aborts()[-1].detail
    assert detail.status.value == "completed"


# ---- chunks off the hub's lock -------------------------------------------------------------------


class _HeldAdd:
    """Makes one upload's `Reassembler.add` wait, once entered, until `release` is set: a chunk
    "being copied" for as long as the test needs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, upload: Reassembler) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real = upload.add

        def add(index: int, data: bytes) -> None:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the chunk"
            real(index, data)

        monkeypatch.setattr(upload, "add", add)


def _chunk_thread(hub: Hub, stream: SiloStream, round_id: int, data: bytes) -> threading.Thread:
    """The chunks of `data` sent on `stream` from a thread of their own (its reader's)."""

    def send() -> None:
        for index, piece in enumerate(split(data)):
            chunk = pb.BlobChunk(
                round_id=round_id, kind=pb.PLAINTEXT_UPDATE, index=index, data=piece
            )
            hub.on_message(stream, pb.SiloMessage(blob_chunk=chunk))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_chunk_is_copied_and_hashed_without_the_hub_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a's chunk is being added, the lock is free: the driver ticks and b's whole upload
    is taken; a's completes afterwards and both are aggregated."""
    h = make_harness(tmp_path, ("a", "b"), min_silos=2)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        delta = delta_of(a.model(), 1.0)
        a.report_and_upload(round_id, delta, chunks=0)
        assert a.stream is not None and a.stream.upload is not None
        held = _HeldAdd(monkeypatch, a.stream.upload)
        reader = _chunk_thread(h.hub, a.stream, round_id, state_to_bytes(delta))
        assert held.entered.wait(WAIT_S)
        try:
            assert h.hub.lock.acquire(timeout=1.0), "a chunk being copied holds the hub lock"
            h.hub.lock.release()
            h.ticks(3)  # the driver's tick is not queued behind the copy
            b.report_and_upload(round_id, delta_of(b.model(), 3.0))
            assert reader.is_alive() and h.phase() == "train"  # a's update is still arriving
        finally:
            held.release.set()
        reader.join(WAIT_S)
        assert not reader.is_alive()
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert detail.participants["finished"] == (a.silo_id, b.silo_id)


def test_an_upload_ended_while_a_chunk_is_copied_is_not_handed_to_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a reconnects while its old stream's last chunk is being added: the replacement waits for
    the copy (the stream's lock), ends the upload, and the completed blob is dropped."""
    h = make_harness(tmp_path, ("a", "b"), min_silos=1)
    a, b = h.connect("a", "b")
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        delta = delta_of(a.model(), 100.0)
        a.report_and_upload(round_id, delta, chunks=0)
        old = a.stream
        assert old is not None and old.upload is not None
        held = _HeldAdd(monkeypatch, old.upload)
        reader = _chunk_thread(h.hub, old, round_id, state_to_bytes(delta))
        assert held.entered.wait(WAIT_S)
        replacing = threading.Thread(target=a.connect, daemon=True)
        try:
            replacing.start()
            # Not `h.wait_until`: the replacement holds the hub lock while it waits for the copy.
            deadline = time.monotonic() + WAIT_S
            while not old.closed and time.monotonic() < deadline:
                time.sleep(0.005)
            assert old.closed and replacing.is_alive()  # ending the upload waits for the copy
        finally:
            held.release.set()
        for thread in (replacing, reader):
            thread.join(WAIT_S)
            assert not thread.is_alive()
        assert old.upload is None and old.upload_buffer is None
        b.report_and_upload(round_id, delta_of(b.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(a.silo_id, "DISCONNECTED")]
    assert detail.participants["finished"] == (b.silo_id,)
    for name, old_value in before.items():  # b's update alone: a's 100 never reached the round
        _assert_close(h.hub.global_state[name], old_value + 1.0)


# ---- streams -----------------------------------------------------------------------------------


def test_a_silo_that_reconnects_replaces_its_stream_and_loses_its_round_work(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, ("a", "b"), min_silos=1)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        old = a.stream
        assert old is not None
        a.connect()  # the same silo, a new stream
        assert old.closed and old.next_messages(0) is None  # its writer ends
        assert h.hub.sessions[a.silo_id] is a.stream
        b.report_and_upload(round_id, delta_of(b.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (a.silo_id, "train", "DISCONNECTED")
    ]
    # The old stream's end does not drop the new one.
    h.hub.on_disconnect(old, "stream ended")
    assert h.hub.sessions[a.silo_id] is a.stream
    assert [s.silo_id for s in h.hub.status().silos].count(a.silo_id) == 1


def test_a_certificate_for_another_silo_cannot_speak_for_it(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"))
    a, b = h.silo("a"), h.silo("b")
    with pytest.raises(Refused) as caught:
        h.hub.admit(a.cert_pem, pb.Hello(silo_id=b.silo_id, roster_digest=h.hub.roster.digest()))
    assert caught.value.code is RefusalCode.PERMISSION_DENIED
    assert h.hub.sessions == {}


def big_model() -> torch.nn.Module:
    """Over the outbound queue's slack (4 MiB): a second copy queued behind the first overflows."""
    torch.manual_seed(0)
    return torch.nn.Linear(1300, 1024, bias=False)


def test_a_silo_that_does_not_read_overflows_and_is_dropped_at_the_next_tick(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, ("a", "x"), min_silos=1, offer_s=30.0, model_factory=big_model)
    a, x = h.connect("a", "x")
    with h.round_thread() as driver:  # round 1: x never reads, the offer deadline drops it
        round_id = _offered(h, a)
        h.clock.advance(30.0)
        _in_phase(h, "train")
        a.report_and_upload(round_id, delta_of(a.model(), 0.0))
        driver.finish()
    assert x.stream is not None and x.stream.overflow is None
    with h.round_thread() as driver:  # round 2: its second model passes the queue's bound
        round_id = _offered(h, a)
        h.wait_until("x disconnected", lambda: x.silo_id not in h.hub.sessions)
        assert x.stream.overflow is not None and x.stream.closed
        _in_phase(h, "train")
        a.report_and_upload(round_id, delta_of(a.model(), 0.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (x.silo_id, "offer", "DISCONNECTED")
    ]
    assert detail.status.value == "completed"
    assert x.stream.queue.pending_bytes == 0  # what it queued is freed


# ---- secure rounds: buffered-upload slots --------------------------------------------------------


def _secure(tmp_path: Path, **deadlines: float) -> tuple[HubHarness, list[SecureSilo]]:
    h = make_harness(
        tmp_path,
        ("a", "b", "c"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0, "max_concurrent_uploads": 1},
        deadlines=deadlines or None,
    )
    silos = [s for s in h.connect("a", "b", "c") if isinstance(s, SecureSilo)]
    assert len(silos) == 3
    return h, silos


def _pump(silos: list[SecureSilo]) -> None:
    for s in silos:
        s.answer()


def _until_masked(h: HubHarness, silos: list[SecureSilo]) -> int:
    """Answer every frame until each silo holds its pairwise keys (the masked phase)."""

    def ready() -> bool:
        _pump(silos)
        return all(s.ready_to_upload() for s in silos) and h.phase() == "masked"

    h.wait_until("the masked phase", ready)
    return silos[0].offers()[-1].round_id


def _until_over(h: HubHarness, silos: list[SecureSilo], driver: RoundThread) -> None:
    def over() -> bool:
        _pump(silos)
        return driver.ended.is_set()

    h.wait_until("the round's end", over)


def _header_in_thread(silo: SecureSilo, round_id: int) -> threading.Thread:
    """A masked header sent from its own reader thread: the hub holds that reader until a
    buffered-upload slot frees."""
    thread = threading.Thread(target=silo.send_masked_header, args=(round_id,), daemon=True)
    thread.start()
    return thread


def _masked_inputs_1_2_3(h: HubHarness, silos: list[SecureSilo]) -> int:
    """Run the round to its masked phase and have the three silos mask inputs 1, 2 and 3
    (not sent yet); returns the round's id."""
    round_id = _until_masked(h, silos)
    for silo, value in zip(silos, (1.0, 2.0, 3.0), strict=True):
        silo.masked_upload(value)
    return round_id


def _assert_completed_with_the_mean_of_1_2_3(
    h: HubHarness,
    round_id: int,
    silos: list[SecureSilo],
    before: dict[str, torch.Tensor],
) -> None:
    """The round completed with every silo, and the model moved by the mean of their inputs
    1, 2 and 3 (uniform weighting)."""
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert detail.participants["finished"] == tuple(sorted(s.silo_id for s in silos))
    for name, old in before.items():
        _assert_close(h.hub.global_state[name], old + 2.0, atol=1e-3)


def test_a_second_masked_upload_waits_for_the_slot_and_reuses_the_first_buffer(
    tmp_path: Path,
) -> None:
    h, (a, b, c) = _secure(tmp_path)
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _masked_inputs_1_2_3(h, [a, b, c])
        a.send_masked_header(round_id)
        assert a.stream is not None and b.stream is not None
        assert a.stream.upload_slot
        buffer = a.stream.upload_buffer
        assert buffer is not None
        waiting = _header_in_thread(b, round_id)
        h.ticks(3)
        assert waiting.is_alive() and not b.stream.upload_slot  # held: one slot, a has it
        a.send_masked_chunks(round_id)  # a's vector is added: slot and buffer free
        assert not a.stream.upload_slot and a.stream.upload_buffer is None
        waiting.join(WAIT_S)
        assert not waiting.is_alive()
        assert b.stream.upload_slot and b.stream.upload_buffer is buffer  # the same array
        b.send_masked_chunks(round_id)
        c.send_masked_header(round_id)
        assert c.stream is not None and c.stream.upload_buffer is buffer
        c.send_masked_chunks(round_id)
        _until_over(h, [a, b, c], driver)
    _assert_completed_with_the_mean_of_1_2_3(h, round_id, [a, b, c], before)


def _granting(tmp_path: Path) -> tuple[HubHarness, list[SecureSilo]]:
    """`_secure` (one upload slot) with silos of wire 1.1, which wait for upload grants."""
    h, silos = _secure(tmp_path)
    for silo in silos:
        silo.wire_version = "1.1"
        silo.connect()
    return h, silos


def test_a_silo_of_wire_1_1_waits_at_home_for_its_grant_and_is_granted_when_the_slot_frees(
    tmp_path: Path,
) -> None:
    h, (a, b, c) = _granting(tmp_path)
    assert a.stream is not None and a.stream.upload_grants
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _masked_inputs_1_2_3(h, [a, b, c])
        a.send_masked_header(round_id)
        a.drain()
        assert [(g.round_id, g.kind) for g in a.grants()] == [(round_id, pb.MASKED_VECTOR)]
        buffer = a.stream.upload_buffer
        b.send_masked_header(round_id)  # returns at once: nothing blocks b's reader
        assert b.stream is not None and not b.stream.upload_slot
        assert b.stream.awaiting_grant is not None and list(h.hub.slots.waiting) == [b.stream]
        b.drain()
        assert b.grants() == []  # no grant while a holds the only slot
        a.send_masked_chunks(round_id)  # a's vector is added: its slot goes to b
        b.drain()
        assert [g.round_id for g in b.grants()] == [round_id]
        assert b.stream.upload_slot and b.stream.upload_buffer is buffer  # the same array
        assert b.stream.awaiting_grant is None and not h.hub.slots.waiting
        b.send_masked_chunks(round_id)
        c.send_masked_header(round_id)
        c.drain()
        assert [g.round_id for g in c.grants()] == [round_id]
        c.send_masked_chunks(round_id)
        _until_over(h, [a, b, c], driver)
    _assert_completed_with_the_mean_of_1_2_3(h, round_id, [a, b, c], before)


def test_a_waiting_silo_that_disconnects_leaves_the_line_and_chunks_before_a_grant_are_ignored(
    tmp_path: Path,
) -> None:
    h, (a, b, c) = _granting(tmp_path)
    with h.round_thread() as driver:
        round_id = _masked_inputs_1_2_3(h, [a, b, c])
        a.send_masked_header(round_id)
        b.send_masked_header(round_id)
        c.send_masked_header(round_id)
        assert b.stream is not None and c.stream is not None
        assert list(h.hub.slots.waiting) == [b.stream, c.stream]
        h.hub.on_disconnect(b.stream, "test: b is gone")
        assert list(h.hub.slots.waiting) == [c.stream] and b.stream.awaiting_grant is None
        c.send_masked_chunks(round_id)  # not granted: ignored, nothing buffered for c
        assert c.stream.upload is None and c.stream.upload_buffer is None
        a.send_masked_chunks(round_id)
        c.drain()
        assert [g.round_id for g in c.grants()] == [round_id]  # its turn, after b left
        assert c.stream.upload is not None and c.stream.upload.next_index == 0  # from chunk 0
        c.send_masked_chunks(round_id)  # sent as a silo sends them: after the grant
        assert c.stream.upload is None and not c.stream.upload_slot  # whole, and added
        c.drain()
        assert c.aborts() == []  # not refused
        assert not h.hub.slots.waiting
        assert driver.is_alive()  # b's loss leaves 2 of 3: the round cannot finish; stopped


def test_the_unmask_runs_on_the_driver_thread_not_on_a_silo_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, (a, b, c) = _secure(tmp_path)
    threads: list[str] = []
    real = CoordinatorRound.finish

    def finish(rnd: CoordinatorRound) -> list[tuple[SiloId, bytes]]:
        threads.append(threading.current_thread().name)
        return real(rnd)

    monkeypatch.setattr(CoordinatorRound, "finish", finish)
    with h.round_thread() as driver:
        round_id = _masked_inputs_1_2_3(h, [a, b, c])
        for silo in (a, b, c):
            silo.send_masked_header(round_id)
            silo.send_masked_chunks(round_id)
        _until_over(h, [a, b, c], driver)  # the silos answer on this (the test's) thread
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert threads == [DRIVER_THREAD]


def test_a_stalled_masked_upload_frees_its_slot_after_upload_progress_s(tmp_path: Path) -> None:
    h, (a, b, c) = _secure(tmp_path, upload_progress_s=20.0, train_s=600.0)
    with h.round_thread() as driver:
        round_id = _until_masked(h, [a, b, c])
        for silo in (a, b, c):
            silo.masked_upload(1.0)
        a.send_masked_header(round_id)  # and no chunk
        waiting = _header_in_thread(b, round_id)
        h.clock.advance(19.0)
        h.ticks(3)
        assert waiting.is_alive()
        h.clock.advance(1.0)  # no chunk for upload_progress_s: a is dropped, its slot freed
        waiting.join(WAIT_S)
        assert not waiting.is_alive()
        assert b.stream is not None and b.stream.upload_slot
        b.send_masked_chunks(round_id)
        c.send_masked_header(round_id)
        c.send_masked_chunks(round_id)
        _until_over(h, [a, b, c], driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (a.silo_id, "masked", "INVALID")
    ]
    assert "upload stalled: no chunk for 20.0 s" in a.aborts()[-1].detail


def test_a_secure_silo_that_disconnects_in_the_masked_phase_aborts_the_round(
    tmp_path: Path,
) -> None:
    """Threshold 3 of 3: the round cannot finish without c; nothing is aggregated."""
    h, (a, b, c) = _secure(tmp_path)
    before = {k: v.clone() for k, v in h.hub.global_state.items()}
    with h.round_thread() as driver:
        round_id = _until_masked(h, [a, b, c])
        status = h.hub.status()
        assert (status.current_round, status.phase) == (round_id, "masked")
        for s in (a, b):
            s.masked_upload(1.0)
            s.send_masked_header(round_id)
            s.send_masked_chunks(round_id)
        assert c.stream is not None
        h.hub.on_disconnect(c.stream, "stream ended")
        _until_over(h, [a, b], driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "aborted"
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (c.silo_id, "masked", "DISCONNECTED")
    ]
    assert detail.participants["U2"] == tuple(sorted(s.silo_id for s in (a, b, c)))
    assert h.hub.completed_rounds() == 0 and h.hub.status().current_round == 0
    for name, old in before.items():
        assert torch.equal(h.hub.global_state[name], old)
    a.drain()
    assert [r.status for r in a.results()] == [pb.ROUND_STATUS_ABORTED]
    assert a.results()[-1].abort_reason == detail.abort_reason


@pytest.mark.parametrize(
    ("aggregation", "phase", "ended"),
    [("plaintext-insecure", "train", ["offer"]), ("secagg", "advertise", ["advertise"])],
)
def test_a_coordinator_that_stops_mid_round_cancels_it_and_records_it_aborted(
    tmp_path: Path, aggregation: str, phase: str, ended: list[str]
) -> None:
    secure = aggregation == "secagg"
    h = make_harness(
        tmp_path,
        ("a", "b", "c"),
        min_silos=3,
        aggregation=aggregation,
        secagg={"clip_l2": 10.0} if secure else None,
    )
    silos = h.connect("a", "b", "c")
    with h.round_thread() as driver:
        round_id = _offered(h, *silos)  # the models are read; no silo answers
        _in_phase(h, phase)
        assert h.hub.status().current_round == round_id
        h.hub.stopping.set()
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "aborted" and detail.dropouts == ()
    assert (detail.abort_reason or "").startswith("the coordinator is stopping")
    assert [p.phase for p in detail.phases] == ended
    assert h.hub.status().current_round == 0
    for s in silos:
        s.drain()
        assert [r.status for r in s.results()] == [pb.ROUND_STATUS_ABORTED]


# ---- the driver loop on the advancing fake clock (one thread, nothing sleeps) --------------------


def test_no_silo_within_start_timeout_ends_the_run_without_sleeping(tmp_path: Path) -> None:
    clock = FakeClock(now=time.time())
    h = make_harness(tmp_path, ("a",), clock=clock, rounds_extra={"start_timeout_s": 120.0})
    started = time.monotonic()
    assert h.hub.run_rounds() is Outcome.NO_SILOS
    assert time.monotonic() - started < 1.0  # 120 s of waiting passed on the fake clock only
    assert clock.monotonic() >= 120.0
    assert h.hub.roundlog.last_round_id() == 0


def test_rounds_that_cannot_be_configured_back_off_then_stall_the_run(tmp_path: Path) -> None:
    clock = FakeClock(now=time.time())
    h = make_harness(
        tmp_path,
        ("a", "b", "c"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0, "threshold": 5},
        rounds_extra={
            "max_consecutive_aborts": 3,
            "abort_backoff_initial_s": 2.0,
            "abort_backoff_max_s": 60.0,
        },
        clock=clock,
    )
    h.connect("a", "b", "c")
    assert h.hub.run_rounds() is Outcome.STALLED
    assert clock.monotonic() >= 2.0 + 4.0  # the two backoffs before the third attempt
    rows = [h.hub.roundlog.round_detail(r) for r in (1, 2, 3)]
    assert all(r.status.value == "aborted" for r in rows)
    assert [r.extra.get("aborted_in_a_row") for r in rows[:2]] == [1, 2]
    assert [r.extra.get("next_attempt_in_s") for r in rows[:2]] == [2.0, 4.0]
    stalled = rows[2].extra["stalled"]
    assert isinstance(stalled, dict) and "CANNOT_CONFIGURE" in json.dumps(stalled)


# ---- the total bound of an upload slot ---------------------------------------------------------


def mid_model() -> torch.nn.Module:
    """An update of three 1 MiB chunks."""
    torch.manual_seed(0)
    return torch.nn.Linear(640, 1024, bias=False)


def test_a_trickling_upload_is_dropped_at_its_total_bound(tmp_path: Path) -> None:
    h = make_harness(
        tmp_path,
        ("a",),
        train_s=600.0,
        deadlines={"upload_progress_s": 10.0},
        model_factory=mid_model,
    )
    (a,) = h.connect("a")
    with h.round_thread() as driver:
        round_id = _offered(h, a)
        header = a.report_and_upload(round_id, delta_of(a.model(), 0.0), chunks=0)
        assert header.chunk_count == 3
        h.ticks()  # the watch sees the new upload: its total bound starts now
        # Allowed: 10 s + 2.5 MiB at 1 MiB/s = 12.5 s in all, however often chunks arrive.
        h.clock.advance(9.0)
        a.send_chunks(round_id, 0, 1)
        h.ticks()
        assert a.stream is not None and a.stream.upload is not None  # still uploading
        h.clock.advance(4.0)  # 13 s in all; 4 s since the last chunk
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.phase, d.reason) for d in detail.dropouts] == [("train", "INVALID")]
    a.drain()
    assert "upload too slow: 13.0 s" in a.aborts()[-1].detail


# ---- the final evaluation ----------------------------------------------------------------------


def test_the_final_evaluation_records_answers_refusals_and_silence(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b", "c"), min_silos=3, offer_s=30.0, train_s=60.0)
    a, b, c = h.connect("a", "b", "c")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b, c)
        for s in (a, b, c):
            s.report_and_upload(round_id, delta_of(s.model(), 0.5))
        driver.finish()
    evaluation = threading.Thread(
        target=h.hub.run_final_evaluation, name=DRIVER_THREAD, daemon=True
    )
    evaluation.start()
    try:
        asked = _offered(h, a, b, c)
        assert asked == round_id and a.offers()[-1].aggregation == pb.AGGREGATION_EVALUATE
        a.send(train_report=pb.TrainReport(round_id=round_id, metrics={"eval_score": 0.75}))
        b.send(abort=pb.AbortNotice(round_id=round_id, code=pb.ABORT_REASON_NOT_THE_FINAL_MODEL))
        h.ticks()
        assert evaluation.is_alive()  # c has not answered, the deadline has not passed
        h.clock.advance(90.0)
        evaluation.join(WAIT_S)
        assert not evaluation.is_alive()
    finally:
        h.hub.stopping.set()
        evaluation.join(WAIT_S)
    record = h.hub.roundlog.final_evaluation(round_id)
    assert record is not None
    assert record.asked == tuple(sorted(s.silo_id for s in (a, b, c)))
    assert record.answered == (a.silo_id,)
    assert dict(record.refusals) == {b.silo_id: "NOT_THE_FINAL_MODEL"}
    assert dict(record.global_metrics) == {"eval_score": 0.75}


# ---- resume --------------------------------------------------------------------------------------


def test_a_restarted_hub_marks_the_round_left_running_as_interrupted(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a",))
    # What a crash leaves: a round started in the log and never finished.
    h.hub.roundlog.start_round(
        1,
        started_at=h.clock.now(),
        aggregation="plaintext-insecure",
        config_digest="00" * 32,
        model_in_sha256="00" * 32,
        invited=[h.silo("a").silo_id],
        rollback_of=None,
    )
    h.hub.roundlog.close()
    clock = FakeClock(now=h.clock.now() + 5.0)
    restarted = Hub(h.config, model_factory=small_model, clock=clock)
    try:
        detail = restarted.roundlog.round_detail(1)
        assert detail.status.value == "interrupted"
        assert detail.ended_at == clock.now()
        assert restarted.roundlog.last_round_id() == 1  # the next round is 2
    finally:
        restarted.roundlog.close()


# ---- what a masked upload may not be -----------------------------------------------------------


def _secure_four(tmp_path: Path) -> tuple[HubHarness, list[SecureSilo], SecureSilo]:
    """Four silos connected, three invited (`silos_per_round`): a, b, c take part, d not."""
    h = make_harness(
        tmp_path,
        ("a", "b", "c", "d"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0, "max_concurrent_uploads": 1},
        rounds_extra={"silos_per_round": 3},
    )
    a, b, c, d = (s for s in h.connect("a", "b", "c", "d") if isinstance(s, SecureSilo))
    return h, [a, b, c], d


def test_a_silo_that_is_not_invited_cannot_take_the_upload_slot(tmp_path: Path) -> None:
    h, (a, b, c), d = _secure_four(tmp_path)
    with h.round_thread() as driver:
        round_id = _until_masked(h, [a, b, c])
        assert d.offers() == []
        for s in (a, b, c):
            s.masked_upload(1.0)
        # d copies a's header: it is not in the round, so it gets no slot and waits for none.
        d.upload = a.upload
        d.send_masked_header(round_id)
        assert d.stream is not None and not d.stream.upload_slot
        assert d.stream.upload_buffer is None
        for s in (a, b, c):  # one slot: each takes it in turn, none waits
            s.send_masked_header(round_id)
            assert s.stream is not None and s.stream.upload_slot
            s.send_masked_chunks(round_id)
        d.send_masked_chunks(round_id)  # ignored
        _until_over(h, [a, b, c], driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert detail.dropouts == ()
    assert d.silo_id in h.hub.sessions  # refused, not dropped: it was in no round


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"protocol_header": b""}, r"masked vector header without its protocol_header"),
        ({"round_id": 9}, r"masked vector for round 9 during round 1"),
        (
            {"total_bytes": 8},
            r"bad masked vector header: a masked vector has \d+ bytes, the header says 8",
        ),
    ],
)
def test_a_masked_header_that_does_not_fit_the_round_drops_its_silo(
    tmp_path: Path, change: dict[str, object], says: str
) -> None:
    h, silos = _secure(tmp_path)
    a = silos[0]
    with h.round_thread() as driver:
        round_id = _until_masked(h, silos)
        upload = a.masked_upload(1.0)
        data = upload.vector.tobytes()
        header = pb.BlobHeader(
            round_id=round_id,
            kind=pb.MASKED_VECTOR,
            total_bytes=len(data),
            sha256=hashlib.sha256(data).digest(),
            chunk_count=1,
            protocol_header=upload.header,
        )
        for name, value in change.items():
            setattr(header, name, value)
        a.send(blob_header=header)
        h.wait_until("a dropped", lambda: bool(h.hub.roundlog.round_detail(round_id).dropouts))
        assert a.stream is not None and not a.stream.upload_slot  # given back, or never taken
        h.hub.stopping.set()
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.phase, d.reason) for d in detail.dropouts] == [
        (a.silo_id, "masked", "INVALID")
    ]
    a.drain()
    assert re.search(says, a.aborts()[0].detail), a.aborts()[0].detail


# ---- what a plaintext update may not be --------------------------------------------------------


def test_a_report_for_another_round_is_ignored_and_the_silo_stays(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a",), train_s=60.0)
    (a,) = h.connect("a")
    with h.round_thread() as driver:
        round_id = _offered(h, a)
        _in_phase(h, "train")
        a.report_and_upload(round_id + 5, delta_of(a.model(), 1.0))  # stray: ignored
        h.ticks()
        assert h.phase() == "train" and a.drain() == []
        a.report_and_upload(round_id, delta_of(a.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed" and detail.dropouts == ()


def test_an_update_blob_that_is_not_the_reported_one_drops_the_silo(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"))
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        _in_phase(h, "train")
        a.send(
            train_report=pb.TrainReport(round_id=round_id, num_examples=3, update_sha256=b"x" * 32)
        )
        a.send(
            blob_header=pb.BlobHeader(
                round_id=round_id, kind=pb.PLAINTEXT_UPDATE, total_bytes=4, sha256=b"y" * 32,
                chunk_count=1,
            )
        )  # fmt: skip
        b.report_and_upload(round_id, delta_of(b.model(), 1.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(a.silo_id, "INVALID")]
    a.drain()
    assert "update blob does not match its train report" in a.aborts()[-1].detail


def test_an_update_chunk_out_of_order_drops_the_silo(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ("a", "b"), model_factory=mid_model)
    a, b = h.connect("a", "b")
    with h.round_thread() as driver:
        round_id = _offered(h, a, b)
        _in_phase(h, "train")
        a.report_and_upload(round_id, delta_of(a.model(), 0.0), chunks=0)
        a.send_chunks(round_id, 1, 2)  # chunk 1 before chunk 0
        b.report_and_upload(round_id, delta_of(b.model(), 0.0))
        driver.finish()
    detail = h.hub.roundlog.round_detail(round_id)
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(a.silo_id, "INVALID")]
    a.drain()
    assert "bad update chunk" in a.aborts()[-1].detail


# ---- hostile input through the hub (in memory; the raw-bytes case stays end to end) -------------


@pytest.mark.parametrize("last", range(len(HOSTILE)))
def test_hostile_metrics_are_cut_to_the_valid_ones_before_they_are_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, last: int
) -> None:
    """x is invited to a secure round and never advertises a key: it sends every hostile
    report, `HOSTILE[last]` last; the round log keeps that report's valid metrics only."""
    caplog.set_level(logging.INFO, logger="silofed")
    h = make_harness(
        tmp_path,
        ("a", "b", "c", "x"),
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 10.0},
        offer_s=30.0,
    )
    a, b, c, x = (s for s in h.connect("a", "b", "c", "x") if isinstance(s, SecureSilo))
    with h.round_thread() as driver:
        round_id = _offered(h, x)
        for i in [*range(last + 1, len(HOSTILE)), *range(last + 1)]:
            x.send(train_report=pb.TrainReport(round_id=round_id, metrics=HOSTILE[i]))
        assert x.stream is not None and not x.stream.closed  # no protocol rule broken

        def advertised() -> bool:
            _pump([a, b, c])
            return all(s.session is not None for s in (a, b, c))

        h.wait_until("a, b and c advertised", advertised)
        h.clock.advance(30.0)  # x's key never comes: dropped at the offer deadline
        _until_masked(h, [a, b, c])
        for s in (a, b, c):
            s.masked_upload(0.5)
            s.send_masked_header(round_id)
            s.send_masked_chunks(round_id)
        _until_over(h, [a, b, c], driver)
    detail = h.hub.roundlog.round_detail(round_id)
    assert detail.status.value == "completed", detail.abort_reason
    assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(x.silo_id, "TIMEOUT")]
    stored = {str(s.silo_id): dict(s.metrics) for s in detail.silos}
    assert stored[x.silo_id] == KEPT[last]
    assert any(r.msg == "%s: report for round %d: %s" for r in caplog.records)


def test_frames_for_a_wrong_round_are_ignored_in_a_few_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silofed")
    n = 5_000
    h = make_harness(tmp_path, ("a", "x"), min_silos=1)
    a, x = h.connect("a", "x")
    with h.round_thread() as driver:
        round_id = _offered(h, a, x)
        frame = pb.SecAggFrame(round_id=987_654_321, payload=b"\x01" * 64)
        for _ in range(n):
            x.send(secagg=frame)
        h.clock.advance(11.0)  # past the log's interval: the next message flushes the count
        a.report_and_upload(round_id, delta_of(a.model(), 0.0))
        x.report_and_upload(round_id, delta_of(x.model(), 0.0))
        driver.finish()
    assert h.hub.roundlog.round_detail(round_id).dropouts == ()  # x broke no rule
    lines = [r for r in caplog.records if r.msg.startswith("ignoring a secagg frame from")]
    summaries = [
        r.args
        for r in caplog.records
        if r.msg == SUMMARY and isinstance(r.args, tuple) and r.args[2] == "stray secagg frame"
    ]
    assert len(lines) == 1 and len(summaries) == 1
    assert int(str(summaries[0][1]).replace(",", "")) == n - 1


# ---- connection churn ----------------------------------------------------------------------------


def test_a_silo_reconnecting_in_a_loop_writes_a_few_lines_a_minute_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review item of the hostile-silo work: connect, replace and disconnect lines were written
    per reconnect. 200 reconnects in 20 s (fake clock) write at most CHURN_LINES of each kind
    for that silo, and the next line after the minute carries the count of the rest; another
    silo's connect line is not held back by it."""
    from coordinator.runtime.hub import CHURN_LINES

    caplog.set_level(logging.INFO, logger="silofed")
    h = make_harness(tmp_path, ("a", "b"))
    a, b = h.silo("a"), h.silo("b")
    for _ in range(200):
        stream = a.connect()
        h.hub.on_disconnect(stream, "stream ended")
        h.clock.advance(0.1)
    lines = [r.getMessage() for r in caplog.records]
    for kind in ("silo connected: ", "silo disconnected: "):
        mine = [m for m in lines if m.startswith(kind + a.silo_id)]
        assert 1 <= len(mine) <= CHURN_LINES, mine
    b.connect()
    assert any(m.startswith(f"silo connected: {b.silo_id}") for m in
               (r.getMessage() for r in caplog.records))  # fmt: skip
    h.clock.advance(60.0)
    a.connect()
    lines = [r.getMessage() for r in caplog.records]
    last = [m for m in lines if m.startswith(f"silo connected: {a.silo_id}")][-1]
    assert re.search(r"\(and 19\d more like it in the last \d+ s\)$", last), last
    # The disconnects' count has no later line to ride on: it is written on its own.
    assert any(re.search(r"19\d more like it \(disconnected\)", m) for m in lines), lines[-3:]

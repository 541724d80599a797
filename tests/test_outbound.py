"""The bounded outbound queue (coordinator/runtime/outbound.py): one model plus slack, then
overflow."""

from __future__ import annotations

import queue

import pytest

from coordinator.runtime.outbound import OutboundQueue, Overflow

MODEL = 8 << 20
SLACK = 1 << 20


def test_a_reader_keeps_one_model_and_frames_queued() -> None:
    q: OutboundQueue[str] = OutboundQueue(SLACK)
    assert q.put("offer", 1000)
    assert q.put("model", MODEL, blob_bytes=MODEL)
    assert q.pending_bytes == MODEL + 1000
    assert q.get(0.1) == "offer"
    assert q.get(0.1) == "model"
    assert q.pending_bytes == MODEL  # the model counts until its chunks are taken
    for _ in range(8):
        q.taken(1 << 20)
    assert q.pending_bytes == 0
    # The next round: the same again, never past the bound.
    assert q.put("offer", 1000) and q.put("model", MODEL, blob_bytes=MODEL)
    assert q.overflow is None


def test_a_second_model_behind_an_unsent_one_overflows_and_frees_the_queue() -> None:
    q: OutboundQueue[str | None] = OutboundQueue(SLACK)
    assert q.put("model 1", MODEL, blob_bytes=MODEL)
    assert q.get(0.1) == "model 1"
    q.taken(1 << 20)  # the stream took one chunk, then the silo stopped reading
    assert q.put("result", 200)
    assert not q.put("model 2", MODEL, blob_bytes=MODEL)
    overflow = q.overflow
    assert overflow == Overflow(2 * MODEL - (1 << 20) + 200, MODEL + SLACK, MODEL)
    assert "over the bound of 9.0 MiB (one model of 8.0 MiB plus 1.0 MiB)" in str(overflow)
    assert q.pending_bytes == 0
    assert not q.put("small", 1)  # for good
    q.put_last(None)  # the end marker still goes through, and alone: "result" was dropped
    assert q.get(0.1) is None
    with pytest.raises(queue.Empty):
        q.get(0.01)


def test_frames_alone_are_bounded_by_the_slack() -> None:
    q: OutboundQueue[int] = OutboundQueue(SLACK)
    sent = 0
    while q.put(sent, 64 << 10):
        sent += 1
        assert sent <= 16, "never overflowed"
    assert sent == 16  # 16 × 64 KiB = the 1 MiB slack


def test_bad_costs_are_refused() -> None:
    q: OutboundQueue[str] = OutboundQueue(SLACK)
    with pytest.raises(ValueError):
        q.put("x", -1)
    with pytest.raises(ValueError):
        q.put("x", 10, blob_bytes=11)

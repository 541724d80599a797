"""Malformed and hostile input from the coordinator (issue 8, acceptance 2): every case ends in a
clean refusal or abort, the silo process stays up, and all four silos then complete an honest
round whose unmasked mean matches their recorded updates within the quantisation bound.

The coordinator is tests.dishonest_coordinator's harness (the real coordinator certificate,
real `silo_agent run` processes a-d over mTLS on loopback). Cases that lock silos out on
vulnerable code (a crash on invalid JSON, a round id of 2^64 − 1) come last, so the cases before
them still say something on such code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protos import federation_pb2 as pb
from protos.names import abort_name
from secagg.chunking import MAX_CHUNK_BYTES, chunk_count_for
from secagg.config import RoundConfig, TensorSpec
from secagg.messages import MAGIC, Kind
from tests.dishonest_coordinator import (
    ADVERTISED,
    HONEST_TRAIN,
    LAYOUT,
    REAL_SILOS,
    Harness,
    Plan,
    canonical_json,
    model_bytes,
    progress_times,
    running_harness,
)

pytestmark = pytest.mark.e2e

# The names of the refusals' codes (`Received.refusal()`: of a secagg AbortNotice frame, or of
# the AbortReason of a gRPC AbortNotice; the numbers are equal).
TRAIN_PARAMS_REJECTED = abort_name(pb.ABORT_REASON_TRAIN_PARAMS_REJECTED)
LAYOUT_MISMATCH = abort_name(pb.ABORT_REASON_LAYOUT_MISMATCH)
MODEL_TOO_LARGE = abort_name(pb.ABORT_REASON_MODEL_TOO_LARGE)
ROUND_ID_JUMP = abort_name(pb.ABORT_REASON_ROUND_ID_JUMP)
CONFIG_REJECTED = abort_name(pb.ABORT_REASON_CONFIG_REJECTED)
ANSWER_TIMEOUT_S = 8.0
RSS_SLACK_BYTES = 64 * 1024 * 1024
DECLARED_MODEL_BYTES = 10 * 1024**3
CHUNKS_SENT = 96  # 96 MiB of the "10 GiB" model: more than the RSS slack, if buffered
STOP_WITHIN_S = 2.0
SLOW_TRAIN: Mapping[str, Any] = {"epochs": 60, "lr": 0.1, "step_sleep_s": 0.1}  # 6 s in all


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_harness(tmp_path_factory.mktemp("hostile")) as harness:
        yield harness


def _then_honest(h: Harness) -> None:
    """Every silo process is up and takes part in an honest round the harness completes."""
    h.assert_alive()
    h.honest_round(REAL_SILOS)


def _answers(
    h: Harness,
    rid: int,
    cfg: RoundConfig | bytes,
    model: bytes,
    offer_params: Mapping[str, Any] | str,
) -> dict[str, str | None]:
    """Offer round `rid` to every silo, collect each first answer, end the round."""
    since = h.marks(REAL_SILOS)
    h.offer(REAL_SILOS, cfg, model, round_id=rid, offer_params=offer_params)
    try:
        return h.answers(REAL_SILOS, rid, since, ANSWER_TIMEOUT_S)
    finally:
        h.end_round(REAL_SILOS, rid)


def _assert_all(answers: Mapping[str, str | None], reason: str, h: Harness) -> None:
    assert all(a == reason for a in answers.values()), (
        f"expected every silo to refuse with {reason}, got {answers}\n{h.logs()}"
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"epochs":2,"lr":0.1', id="invalid-json"),
        pytest.param(canonical_json({"lr": 0.1, "optimiser": {"momentum": 0.9}}), id="nested"),
        pytest.param(canonical_json({**HONEST_TRAIN, "seed": 7}), id="seed"),
    ],
)
def test_malformed_signed_training_parameters_are_refused(h: Harness, raw: bytes) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.config(rid, REAL_SILOS, model, signed_params=raw)
    _assert_all(_answers(h, rid, cfg, model, HONEST_TRAIN), TRAIN_PARAMS_REJECTED, h)
    _then_honest(h)


def test_a_layout_of_2_to_the_36_parameters_is_refused_at_the_offer(h: Harness) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    huge = tuple(
        TensorSpec(s.name, (1 << 20, 1 << 16), s.dtype) if s.name == "weight" else s for s in LAYOUT
    )
    cfg = h.honest_config(rid, REAL_SILOS, model, layout=huge)
    assert cfg.d > 1 << 36
    # A silo that advertises instead is stopped here (RoundResult aborted) before the shares
    # step, where vulnerable code allocates the 256 GiB vector.
    answers = _answers(h, rid, cfg, model, HONEST_TRAIN)
    _assert_all(answers, LAYOUT_MISMATCH, h)
    _then_honest(h)


def test_a_declared_10_gib_model_is_refused_before_buffering(h: Harness) -> None:
    h.honest_round(REAL_SILOS)  # the baseline of a silo that has done a round (its own warm-up)
    name = "a"
    sid, rid = h.silo_id(name), h.next_round_id()
    fake_sha = os.urandom(32)
    cfg = h.honest_config(rid, REAL_SILOS, model_bytes(rid), model_sha256=fake_sha)
    since = h.server.mark(sid)
    baseline = peak = h.rss(name)
    offer = pb.RoundOffer(
        round_id=rid,
        aggregation=pb.AGGREGATION_SECAGG,
        config=cfg.encode(),
        model_sha256=fake_sha,
        model_bytes=DECLARED_MODEL_BYTES,
        train_params_json=canonical_json(HONEST_TRAIN).decode(),
    )
    h.server.send(sid, pb.CoordinatorMessage(round_offer=offer))
    header = pb.BlobHeader(
        round_id=rid,
        kind=pb.GLOBAL_MODEL,
        total_bytes=DECLARED_MODEL_BYTES,
        sha256=fake_sha,
        chunk_count=chunk_count_for(DECLARED_MODEL_BYTES),
    )
    h.server.send(sid, pb.CoordinatorMessage(blob_header=header))
    block = os.urandom(MAX_CHUNK_BYTES)
    for index in range(CHUNKS_SENT):
        chunk = pb.BlobChunk(round_id=rid, kind=pb.GLOBAL_MODEL, index=index, data=block)
        h.server.send(sid, pb.CoordinatorMessage(blob_chunk=chunk))
    deadline, settled = time.monotonic() + 60.0, None
    while time.monotonic() < deadline:  # sample while gRPC delivers, then 1 s more
        peak = max(peak, h.rss(name))
        if settled is None and h.server.flush(sid, 0.0):
            settled = time.monotonic() + 1.0
        if settled is not None and time.monotonic() > settled:
            break
        time.sleep(0.05)
    answer = h.server.wait_for(
        sid, lambda r: r.round_id == rid and r.refusal() is not None, ANSWER_TIMEOUT_S, since=since
    )
    h.end_round([name], rid)
    grew = peak - baseline
    print(f"10 GiB offer: RSS baseline {baseline >> 20} MiB, peak {peak >> 20} MiB")
    assert answer is not None and answer.refusal() == MODEL_TOO_LARGE, (
        answer and answer.refusal(),
        h.logs(),
    )
    assert grew <= RSS_SLACK_BYTES, f"RSS grew by {grew >> 20} MiB while chunks arrived"
    _then_honest(h)


def test_a_million_epochs_are_refused(h: Harness) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    params = {**HONEST_TRAIN, "epochs": 10**6}
    cfg = h.config(rid, REAL_SILOS, model, signed_params=params)
    _assert_all(_answers(h, rid, cfg, model, params), TRAIN_PARAMS_REJECTED, h)
    _then_honest(h)


@pytest.mark.parametrize("how", ["round_result", "abort_notice"])
def test_training_stops_promptly_when_the_round_is_aborted(h: Harness, how: str) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid, REAL_SILOS, model, params=SLOW_TRAIN)
    h.note_round_id(rid)
    h.offer(REAL_SILOS, cfg, model, round_id=rid, offer_params=SLOW_TRAIN)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and not all(
        len(progress_times(h.record_dir(n), rid)) >= 3 for n in REAL_SILOS
    ):
        time.sleep(0.05)
    started = {n: len(progress_times(h.record_dir(n), rid)) for n in REAL_SILOS}
    assert all(v >= 3 for v in started.values()), (started, h.logs())
    aborted_at = time.time()
    for n in REAL_SILOS:
        if how == "round_result":
            h.server.round_result(
                h.silo_id(n), rid, "aborted", reason="the harness aborts the round"
            )
        else:
            h.server.abort(h.silo_id(n), rid, pb.ABORT_REASON_TIMEOUT, "the harness aborts it")
    time.sleep(STOP_WITHIN_S + 1.0)
    late = {}
    for n in REAL_SILOS:
        ticks = progress_times(h.record_dir(n), rid)
        late[n] = (len(ticks), round(ticks[-1] - aborted_at, 2))
    print(f"abort by {how}: (steps, last step - abort in s) per silo: {late}")
    assert all(after <= STOP_WITHIN_S for _, after in late.values()), (
        f"training went on after the abort: {late}"
    )
    assert all(steps < SLOW_TRAIN["epochs"] for steps, _ in late.values()), late
    _then_honest(h)


def test_an_offer_whose_round_id_is_not_the_signed_one_is_refused(h: Harness) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid + 1, REAL_SILOS, model)
    h.note_round_id(rid + 1)  # a vulnerable silo accepts the signed id
    _assert_all(_answers(h, rid, cfg, model, HONEST_TRAIN), CONFIG_REJECTED, h)
    _then_honest(h)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(lambda valid: os.urandom(300), id="random"),
        pytest.param(lambda valid: valid[: len(valid) // 2], id="truncated"),
        pytest.param(lambda valid: b"", id="empty"),
        pytest.param(lambda valid: valid + b"\x00", id="trailing-byte"),
    ],
)
def test_garbage_config_bytes_end_in_a_clean_refusal(h: Harness, garbage: Any) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    raw = garbage(h.honest_config(rid, REAL_SILOS, model).encode())
    answers = _answers(h, rid, raw, model, HONEST_TRAIN)
    assert all(a not in (None, ADVERTISED) for a in answers.values()), (answers, h.logs())
    _then_honest(h)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(os.urandom(200), id="random"),
        pytest.param(MAGIC + bytes([99]) + os.urandom(40), id="unknown-kind"),
        pytest.param(MAGIC + bytes([Kind.KEY_LIST]) + b"\xff" * 10, id="truncated-keylist"),
        pytest.param(MAGIC + bytes([Kind.KEY_LIST]) + b"\x00" * 40 + b"\xff" * 4, id="huge-count"),
    ],
)
def test_garbage_secagg_frames_end_in_a_clean_abort(h: Harness, payload: bytes) -> None:
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid, REAL_SILOS, model)
    h.note_round_id(rid)
    since = h.marks(REAL_SILOS)
    h.offer(REAL_SILOS, cfg, model, round_id=rid)
    first = h.answers(REAL_SILOS, rid, since, ANSWER_TIMEOUT_S)
    assert all(a == ADVERTISED for a in first.values()), (first, h.logs())
    after = h.marks(REAL_SILOS)
    for n in REAL_SILOS:
        h.server.send_frame(h.silo_id(n), rid + 1000, payload)  # no such round: ignored
        h.server.send_frame(h.silo_id(n), rid, payload)
    try:
        aborts = h.answers(REAL_SILOS, rid, after, ANSWER_TIMEOUT_S)
    finally:
        h.end_round(REAL_SILOS, rid)
    assert all(a not in (None, ADVERTISED) for a in aborts.values()), (aborts, h.logs())
    _then_honest(h)


def test_invalid_json_in_the_unsigned_offer_field_is_ignored(h: Harness) -> None:
    """Vulnerable code crashed the agent on this (JSONDecodeError); a secure round's training
    parameters are the signed ones, so the round completes."""
    rid = h.next_round_id()
    model = model_bytes(rid)
    cfg = h.honest_config(rid, REAL_SILOS, model)
    out = h.run(Plan(cfg, model, '{"epochs": 2, "lr": '))
    h.assert_alive()
    assert out.completed, (out.abort_reason, out.refusals, h.logs())
    _then_honest(h)


def test_round_id_2_to_the_64_minus_1_is_refused_without_locking_out(h: Harness) -> None:
    rid = 2**64 - 1
    model = model_bytes(h.next_round_id())
    cfg = h.honest_config(rid, REAL_SILOS, model)
    _assert_all(_answers(h, rid, cfg, model, HONEST_TRAIN), ROUND_ID_JUMP, h)
    _then_honest(h)  # the next round id is the harness's next, far below 2^64 − 1


def test_the_same_model_as_float64_is_refused_not_counted_as_a_new_model(h: Harness) -> None:
    """Review finding: the same values re-sent as float64 got a new tensor digest, reopening the
    differencing guard (the silo's load_state_dict converted them back silently). The received
    model must have the silo's own names, shapes and dtypes."""
    rid = h.next_round_id()
    same = {k: v.to(torch.float64) for k, v in st_load(model_bytes(rid)).items()}
    model = st_save(same)
    cfg = h.honest_config(rid, REAL_SILOS, model)
    _assert_all(_answers(h, rid, cfg, model, HONEST_TRAIN), LAYOUT_MISMATCH, h)
    _then_honest(h)

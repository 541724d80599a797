"""A hostile silo's update costs at most its own contribution (issue 10, acceptance 3 and 4).

Plaintext baseline (acceptance 3): a coordinator in this process (hub + real gRPC server over
mTLS), three honest silo agents as processes running the recording task, and a RAW client built
from protos/ (FederationStub over mTLS with an enrolled certificate) that plays a plaintext silo
and sends one poisoned update per round: 1e30 values, a NaN, an infinity, 3e38 twice, 2^64 − 1
examples, float64 / int64 / complex64 tensors, a wrong shape, a missing tensor, a norm above the
clip. Each is refused whole (the raw silo's AbortNotice names the check), every round completes
with the honest silos, and each new model equals FedAvg of the updates the honest silos recorded
within 1e-6, is finite, and moved by no more than `[plaintext] clip_l2`. Without a clip, two
rounds of 3e38 end in NON_FINITE_MODEL and the model is kept.

Secure aggregation (acceptance 4), at the protocol level: the in-memory harness of tests/secagg
(real crypto, real sessions) with a tampering silo that adds an unclipped vector or a crafted
weight element to its masked input (and signs the header that states it), then
`coordinator.rounds.secure_config.check_aggregate`: honest inputs at the clip always pass, an
unclipped
input beyond the bound is refused, one inside it passes (what docs/secagg-protocol.md §2.5 says
it can still do), an out-of-range weight element aborts cleanly with OVERFLOW_RULE and evidence
naming the silo that any silo verifies (secagg/blame.py). End to end, three honest agents and
one patched agent over mTLS: with its clipping skipped from round 2 on, the sabotaged rounds
abort (AGGREGATE_OUT_OF_BOUND), nothing is applied, and the coordinator stops with the stall
diagnosis (exit 4) naming the cause and what to do; with an out-of-range weight element (in
every round, or once), the first such round aborts with the patched silo blamed, and every later
round completes with the three honest silos, the patched one never invited again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from coordinator.rounds.secure_config import (
    AGGREGATE_OUT_OF_BOUND,
    ResultRefused,
    SecAggSettings,
    WeightingMode,
    aggregate_norm_bound,
    build_round_config,
    check_aggregate,
    layout_of,
)
from coordinator.runtime.serve import Outcome
from coordinator.storage.checkpoints import CheckpointStore
from coordinator.storage.roundlog import RoundLog
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.blame import verify_blame
from secagg.chunking import MAX_CHUNK_BYTES
from secagg.config import RoundConfig
from secagg.coordinator import CoordinatorRound, Phase
from secagg.errors import AbortReason
from secagg.messages import SIG_MASKED, encode_message, masked_header_of
from secagg.primitives import sha256_array
from secagg.silo import MaskedUpload, SiloSession, SubmissionRecord
from silo_agent.storage.silo_state import SiloStateStore
from silofed.tensors import state_to_bytes
from silofed.wire import WIRE_VERSION, upload_chunk_bytes
from tests.federation_helpers import (
    RECORDING_SPEC,
    RECORDING_TASK,
    Federation,
    coordinator_in_process,
    processes,
    provision,
    run_module,
    to_toml,
    write_coordinator_config,
    write_recording_silo_config,
    write_silo_config,
)
from tests.secagg.harness import MODEL_SHA, Round
from tests.secagg.pki import NOW, federation

pytestmark = pytest.mark.e2e

MAX_MESSAGE = 4 * 1024 * 1024
# The chunk size the coordinator names to a member announcing this build's wire version.
CHUNK = upload_chunk_bytes(str(WIRE_VERSION)) or MAX_CHUNK_BYTES

# ---- secure aggregation at the protocol level ----------------------------------------------


def _config(n: int, d: int, **settings: Any) -> RoundConfig:
    """The RoundConfig the coordinator builds (scale, threshold) for n silos and a d-vector."""
    fed = federation()
    return build_round_config(
        SecAggSettings(**{"clip_l2": 1.0, **settings}),
        federation_id=fed.roster.federation_id,
        roster_version=fed.roster.version,
        roster_digest=fed.roster.digest(),
        round_id=7,
        invited=[str(s.silo_id) for s in fed.silos[:n]],
        model_version=1,
        model_sha256=MODEL_SHA,
        layout=layout_of({"w": torch.zeros(d)}),
        deadlines_s=(5, 5, 30, 5, 5),
    )


def _add_to_upload(session: SiloSession, upload: MaskedUpload, extra: np.ndarray) -> MaskedUpload:
    """The masked upload of (this silo's input + extra): adding in the ring commutes with the
    masks, so this is what a silo that encodes `extra` on top of its input sends, with the
    header it signs for it (its element 0 and digest)."""
    vector = upload.vector
    np.add(vector, extra.astype(np.int64).view(np.uint64).astype(vector.dtype), out=vector)
    h = masked_header_of(upload.header)
    assert h is not None
    header = dataclasses.replace(
        h, vector_sha256=sha256_array(vector), weight_element=int(vector[0])
    )
    return MaskedUpload(
        encode_message(session.identity.seal(SIG_MASKED, encode_message(header))), vector
    )


def _run(
    config: RoundConfig,
    inputs: Mapping[str, np.ndarray],
    *,
    examples: Mapping[str, int] | None = None,
    tamper: Mapping[str, np.ndarray] | None = None,
) -> CoordinatorRound:
    """One in-memory round; silo `s` reports examples[s] (default 1) and adds tamper[s] (signed
    ring elements, length L: element 0 is the weight) to its masked input."""
    r = Round(federation(), config, dict(inputs))
    for sid, session in r.sessions.items():

        def submit(
            delta: np.ndarray,
            num_examples: int,
            real: Callable[[np.ndarray, int], MaskedUpload] = session.submit_update,
            sid: str = sid,
            session: SiloSession = session,
        ) -> MaskedUpload:
            upload = real(delta, (examples or {}).get(sid, num_examples))
            extra = (tamper or {}).get(sid)
            return upload if extra is None else _add_to_upload(session, upload, extra)

        session.submit_update = submit  # type: ignore[method-assign]
    return r.run()


def _encoded(config: RoundConfig, vector: np.ndarray, weight: int = 0) -> np.ndarray:
    """`vector` as ring elements at full weight (ŵ = 1), with `weight` in element 0."""
    out = np.zeros(config.length, dtype=np.int64)
    out[0] = weight
    out[1:] = np.rint(vector.astype(np.float64) * config.scale).astype(np.int64)
    return out


def _same_direction(config: RoundConfig, norm: float) -> dict[str, np.ndarray]:
    """Every silo's update is the same vector of the given norm: their mean is that long."""
    rng = np.random.default_rng(11)
    u = rng.standard_normal(config.d)
    u *= norm / np.linalg.norm(u)
    return {sid: u.astype(np.float32) for sid in config.invited}


SETTINGS: dict[str, dict[str, Any]] = {
    "uniform, 32-bit ring": {"weighting": WeightingMode.UNIFORM},
    "examples, 32-bit ring": {"weighting": WeightingMode.EXAMPLES, "weight_max": 100},
    "examples, 64-bit ring": {
        "weighting": WeightingMode.EXAMPLES,
        "weight_max": 100,
        "ring_bits": 64,
    },
    "DP noise": {"dp_noise_multiplier": 0.5, "dp_noise_divisor": 2},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_honest_inputs_at_the_clip_never_exceed_the_bound(name: str) -> None:
    config = _config(4, 5_000, **SETTINGS[name])
    inputs = _same_direction(config, norm=1.0 * 1.5)  # clipped to C = 1 by every silo
    examples = dict(zip(config.invited, (100, 37, 5, 64), strict=True))
    for _ in range(3):
        rnd = _run(config, inputs, examples=examples)
        assert rnd.phase is Phase.DONE and rnd.result is not None and not rnd.blamed
        g, w = rnd.result.aggregate, rnd.result.weight_sum
        bound = aggregate_norm_bound(config, w, 4)
        norm = check_aggregate(config, g, w, 4)  # raises if refused
        assert norm <= bound
        if config.dp is None:
            # Tight: the clipped mean is as long as C, and the bound barely above it.
            assert norm == pytest.approx(1.0, abs=1e-3)
            assert bound < 1.0 + 2e-3
        else:
            assert norm > 1.0  # the noise is part of what honest inputs produce


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_an_unclipped_input_beyond_the_bound_is_refused(ring_bits: int) -> None:
    # The figure: 12.5 per coordinate from one silo (honest updates: ~0.01).
    config = _config(4, 2_000, weighting=WeightingMode.UNIFORM, ring_bits=ring_bits)
    rng = np.random.default_rng(5)
    inputs = {s: (rng.standard_normal(config.d) * 0.01).astype(np.float32) for s in config.invited}
    evil = config.invited[2]
    rnd = _run(config, inputs, tamper={evil: _encoded(config, np.full(config.d, 12.5))})
    assert rnd.phase is Phase.DONE and rnd.result is not None  # the protocol cannot tell
    with pytest.raises(ResultRefused, match=rf"^{AGGREGATE_OUT_OF_BOUND}: norm \S+ > bound"):
        check_aggregate(config, rnd.result.aggregate, rnd.result.weight_sum, 4)


def test_inside_the_bound_an_unclipped_input_can_flip_the_honest_mean() -> None:
    """docs/secagg-protocol.md §2.5: one silo that knows (or guesses, e.g. from the last
    round's step) the honest direction a can turn the mean into −a, passing the check; one step
    further it is refused."""
    config = _config(4, 3_000, weighting=WeightingMode.UNIFORM, ring_bits=64)
    a = _same_direction(config, norm=0.9)[config.invited[0]].astype(np.float64)
    evil = config.invited[3]
    inputs = {s: a.astype(np.float32) for s in config.invited}
    inputs[evil] = np.zeros(config.d, dtype=np.float32)
    # mean = (3a + e)/4 = −a  ⇔  e = −7a: an input of norm 6.3 with C = 1.
    flip = _run(config, inputs, tamper={evil: _encoded(config, -7 * a)})
    assert flip.result is not None
    check_aggregate(config, flip.result.aggregate, flip.result.weight_sum, 4)
    np.testing.assert_allclose(flip.result.aggregate, -a, atol=1e-6)
    beyond = _run(config, inputs, tamper={evil: _encoded(config, -8 * a)})  # mean −1.25a
    assert beyond.result is not None
    with pytest.raises(ResultRefused, match=AGGREGATE_OUT_OF_BOUND):
        check_aggregate(config, beyond.result.aggregate, beyond.result.weight_sum, 4)


def _assert_blamed(rnd: CoordinatorRound, evil: str, weight: int) -> None:
    """The round aborted with OVERFLOW_RULE, nothing decoded, and its evidence names `evil`
    (only), with the weight it signed, to anyone holding the CA and the roster."""
    assert rnd.phase is Phase.ABORTED
    assert rnd.abort_reason is AbortReason.OVERFLOW_RULE
    assert rnd.result is None  # nothing decoded, nothing to apply
    assert set(rnd.blamed) == {evil}
    (evidence,) = rnd.blamed.values()
    verdict = verify_blame(evidence, federation().trust, NOW)
    assert (verdict.silo_id, verdict.weight) == (evil, weight)


def test_a_weight_element_that_would_shrink_the_sum_is_blamed() -> None:
    """A negative weight element would make W tiny, multiplying the honest mean by up to
    Σq_honest; each silo's weight is checked first, so the sender is named instead."""
    config = _config(4, 2_000, weighting=WeightingMode.EXAMPLES, weight_max=10)
    inputs = _same_direction(config, norm=0.5)
    examples = dict.fromkeys(config.invited, 10)  # q = S_w each
    evil = config.invited[1]
    shrink = np.zeros(config.length, dtype=np.int64)
    shrink[0] = -(4 * config.weight_scale - 1)  # W would be 1
    rnd = _run(config, inputs, examples=examples, tamper={evil: shrink})
    _assert_blamed(rnd, evil, config.weight_scale + int(shrink[0]))


@pytest.mark.parametrize(
    ("weighting", "weight_element"),
    [
        (WeightingMode.EXAMPLES, 2),  # q = 3·S_w > S_w (W would be 6·S_w > n·S_w)
        (WeightingMode.EXAMPLES, -4),  # q = −3·S_w < 0 (W would be 0)
        (WeightingMode.UNIFORM, 1),  # uniform: q must be exactly S_w
    ],
)
def test_a_weight_element_out_of_range_ends_in_a_clean_abort_naming_its_sender(
    weighting: WeightingMode, weight_element: int
) -> None:
    config = _config(4, 1_000, weighting=weighting, weight_max=10)
    inputs = _same_direction(config, norm=0.5)
    examples = dict.fromkeys(config.invited, 10)
    evil = config.invited[0]
    crafted = np.zeros(config.length, dtype=np.int64)
    crafted[0] = weight_element * config.weight_scale
    rnd = _run(config, inputs, examples=examples, tamper={evil: crafted})
    _assert_blamed(rnd, evil, (1 + weight_element) * config.weight_scale)


# ---- a raw plaintext silo -------------------------------------------------------------------


class RawSilo:
    """A hand-made silo: protos' FederationStub over mTLS with an enrolled certificate. Every
    wait is bounded; `close` ends the stream and the channel."""

    def __init__(self, fed: Federation, name: str, port: int) -> None:
        files = fed.silos[name]
        creds = grpc.ssl_channel_credentials(
            root_certificates=fed.ca_cert.read_bytes(),
            private_key=files.key.read_bytes(),
            certificate_chain=files.cert.read_bytes(),
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            creds,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.outbox: queue.Queue[pb.SiloMessage | None] = queue.Queue()
        self.inbox: queue.Queue[pb.CoordinatorMessage | BaseException] = queue.Queue()
        roster = fed.roster.read_text()
        from secagg.identity import Roster

        hello = pb.Hello(
            silo_id=f"spiffe://{fed.federation_id}/silo/{name}",
            roster_digest=Roster.from_json(roster).digest(),
            wire_version=str(WIRE_VERSION),
        )
        self.outbox.put(pb.SiloMessage(hello=hello))
        self.call = pb_grpc.FederationStub(self.channel).Connect(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[pb.SiloMessage]:
        while True:
            message = self.outbox.get()
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.inbox.put(message)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.inbox.put(exc)

    def next(self, kind: str, timeout_s: float) -> pb.CoordinatorMessage:
        """The next message of `kind` (others are skipped); AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind} from the coordinator within {timeout_s} s"
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise AssertionError(f"the stream ended while waiting for {kind}: {item!r}")
            if item.WhichOneof("kind") == kind:
                return item

    def send_update(self, round_id: int, num_examples: int, data: bytes) -> None:
        sha = hashlib.sha256(data).digest()
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        report = pb.TrainReport(
            round_id=round_id, num_examples=num_examples, metrics={}, update_sha256=sha
        )
        self.outbox.put(pb.SiloMessage(train_report=report))
        header = pb.BlobHeader(
            round_id=round_id,
            kind=pb.PLAINTEXT_UPDATE,
            total_bytes=len(data),
            sha256=sha,
            chunk_count=len(chunks),
        )
        self.outbox.put(pb.SiloMessage(blob_header=header))
        for index, chunk in enumerate(chunks):
            blob = pb.BlobChunk(
                round_id=round_id, kind=pb.PLAINTEXT_UPDATE, index=index, data=chunk
            )
            self.outbox.put(pb.SiloMessage(blob_chunk=blob))

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()
        self.channel.close()
        self.reader.join(5)


State = dict[str, torch.Tensor]


def _scaled(value: float) -> Callable[[State], tuple[State, int]]:
    return lambda model: ({k: torch.full_like(v, value) for k, v in model.items()}, 10)


def _with_one(value: float) -> Callable[[State], tuple[State, int]]:
    def build(model: State) -> tuple[State, int]:
        update = {k: torch.zeros_like(v) for k, v in model.items()}
        update["weight"].view(-1)[4] = value
        return update, 10

    return build


def _as(dtype: torch.dtype) -> Callable[[State], tuple[State, int]]:
    return lambda model: ({k: torch.zeros(v.shape, dtype=dtype) for k, v in model.items()}, 10)


def _small(model: State) -> State:
    return {k: torch.full_like(v, 1e-3) for k, v in model.items()}


CLIP = 2.0
WEIGHT_MAX = 1000
# One poisoned update per round: (what, build(model) -> (update, num_examples), the refusal).
POISONS: list[tuple[str, Callable[[State], tuple[State, int]], str]] = [
    ("1e30 values", _scaled(1e30), "L2 norm 4\\.58\\d*e\\+30 is above \\[plaintext\\] clip_l2 = 2"),
    ("a NaN", _with_one(float("nan")), "tensor 'weight' is not finite"),
    ("an infinity", _with_one(float("inf")), "tensor 'weight' is not finite"),
    ("3e38, first round", _scaled(3e38), "is above \\[plaintext\\] clip_l2"),
    ("3e38, second round", _scaled(3e38), "is above \\[plaintext\\] clip_l2"),
    ("2^64 - 1 examples", lambda m: (_small(m), 2**64 - 1), "must be at most 1000 \\("),
    ("float64 tensors", _as(torch.float64), "has dtype float64, the model's is float32"),
    ("int64 tensors", _as(torch.int64), "has dtype int64, the model's is float32"),
    ("complex64 tensors", _as(torch.complex64), "has dtype complex64, the model's is float32"),
    (
        "a wrong shape",
        lambda m: ({**_small(m), "weight": torch.zeros(3, 7)}, 10),
        "tensor 'weight' has shape \\(3, 7\\), model has \\(3, 6\\)",
    ),
    (
        "a missing tensor",
        lambda m: ({"weight": _small(m)["weight"]}, 10),
        "missing \\['bias'\\], unexpected \\[\\]$",
    ),
    ("a norm 1.25 x the clip", _scaled(2.5 / math.sqrt(21)), "L2 norm 2.5 is above"),
]
HONEST = {"a": 50, "b": 7, "c": 13}


def _plaintext_config(
    tmp: Path, fed: Federation, rounds: int, plaintext: Mapping[str, Any]
) -> Path:
    path = write_coordinator_config(
        tmp / "coordinator.toml",
        fed,
        state_dir=tmp / "coord",
        task_spec=RECORDING_SPEC,
        rounds=rounds,
        min_silos=len(fed.silos) - 1 or 1,
        start_silos=len(fed.silos),
        train_s=30.0,
        rounds_extra={"abort_backoff_initial_s": 0.1, "abort_backoff_max_s": 0.2},
    )
    if plaintext:
        path.write_text(path.read_text() + to_toml({"plaintext": dict(plaintext)}))
    return path


def _poison_rounds(
    raw: RawSilo,
    plan: list[Callable[[State], tuple[State, int]]],
    model: State,
    answers: dict[int, pb.CoordinatorMessage],
) -> None:
    """Play the raw silo: for each offer, send the next poisoned update and keep what the
    coordinator answers (its AbortNotice for the raw silo, else the round's result)."""
    for build in plan:
        offer = raw.next("round_offer", 60).round_offer
        update, examples = build(model)
        raw.send_update(offer.round_id, examples, state_to_bytes(update))
        while True:
            message = _next_answer(raw)
            round_id = (
                message.abort.round_id
                if message.WhichOneof("kind") == "abort"
                else message.round_result.round_id
            )
            if round_id == offer.round_id:
                answers[offer.round_id] = message
                break


def _next_answer(raw: RawSilo) -> pb.CoordinatorMessage:
    """The next AbortNotice or RoundResult (whichever comes first)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            item = raw.inbox.get(timeout=1)
        except queue.Empty:
            continue
        if isinstance(item, BaseException):
            raise AssertionError(f"the raw silo's stream ended: {item!r}")
        if item.WhichOneof("kind") in ("abort", "round_result"):
            return item
    raise AssertionError("no AbortNotice or RoundResult within 60 s")


def test_poisoned_plaintext_updates_are_refused_whole(tmp_path: Path) -> None:
    names = (*HONEST, "raw")
    fed = provision(tmp_path / "fed", "poison", names)
    cfg = _plaintext_config(
        tmp_path, fed, len(POISONS), {"clip_l2": CLIP, "weight_max": WEIGHT_MAX}
    )
    model = {k: v.detach().clone() for k, v in RECORDING_TASK.build_model().state_dict().items()}
    answers: dict[int, pb.CoordinatorMessage] = {}
    outcome: list[Outcome] = []
    with (
        coordinator_in_process(cfg) as coordinator,
        processes(tmp_path / "logs") as procs,
    ):
        for name, examples in HONEST.items():
            toml = write_recording_silo_config(
                tmp_path / f"{name}.toml",
                fed,
                name,
                port=coordinator.port,
                num_examples=examples,
                record_root=tmp_path / "sent",
            )
            procs.silo(name, toml)
        raw = RawSilo(fed, "raw", coordinator.port)
        try:
            done = coordinator.drive(lambda hub: outcome.append(hub.run_rounds()))
            _poison_rounds(raw, [build for _, build, _ in POISONS], model, answers)
        finally:
            raw.close()  # not asked in the final evaluation, which it would not answer
        assert done.wait(120), procs.logs()
        assert outcome == [Outcome.FINISHED], procs.logs()

    raw_id = "spiffe://poison/silo/raw"
    log = RoundLog.open_readonly(tmp_path / "coord" / "rounds.sqlite")
    store = CheckpointStore(tmp_path / "coord" / "checkpoints")
    try:
        old = model
        for round_id, (what, _, refusal) in enumerate(POISONS, start=1):
            answer = answers[round_id]
            assert answer.WhichOneof("kind") == "abort", (what, answer)
            assert answer.abort.code == pb.ABORT_REASON_INVALID, what
            assert re.search(refusal, answer.abort.detail), (
                what,
                answer.abort.detail,
            )
            detail = log.round_detail(round_id)
            assert detail.status.value == "completed", (what, detail.abort_reason)
            # The phase is the round's when the update was refused: "offer" while other silos
            # still download the model.
            assert [(d.silo_id, d.reason) for d in detail.dropouts] == [(raw_id, "INVALID")], what
            assert detail.dropouts[0].phase in ("offer", "train"), what
            finished = sorted(s.rsplit("/", 1)[-1] for s in detail.participants["finished"])
            assert finished == sorted(HONEST), what
            assert detail.weight_sum == sum(HONEST.values())
            assert detail.checkpoint is not None
            new = store.load(detail.checkpoint.path, detail.checkpoint.sha256)
            deltas = {n: torch.load(tmp_path / "sent" / n / f"round-{round_id}.pt") for n in HONEST}
            moved = 0.0
            for key, tensor in old.items():
                got = new[key].double()
                assert bool(torch.isfinite(got).all()), (what, key)
                mean = sum(HONEST[n] * deltas[n][key].double() for n in HONEST)
                expected = tensor.double() + mean / sum(HONEST.values())
                assert float((got - expected).abs().max()) <= 1e-6, (what, key)
                moved += float(((got - tensor.double()) ** 2).sum())
            assert math.sqrt(moved) <= CLIP, what
            old = new
    finally:
        log.close()


def test_without_a_clip_a_non_finite_model_is_refused_and_the_model_kept(tmp_path: Path) -> None:
    """No [plaintext] clip_l2: 3e38 passes the checks (finite, float32) and moves the model
    (the documented price of no clip); the second 3e38 would overflow float32: NON_FINITE_MODEL,
    the model and its checkpoint stay those of round 1, and the next round completes."""
    fed = provision(tmp_path / "fed", "nonfinite", ("raw",))
    cfg = _plaintext_config(tmp_path, fed, 2, {})
    model = {k: v.detach().clone() for k, v in RECORDING_TASK.build_model().state_dict().items()}
    plan = [_scaled(3e38), _scaled(3e38), lambda m: (_small(m), 10)]
    answers: dict[int, pb.CoordinatorMessage] = {}
    outcome: list[Outcome] = []
    with coordinator_in_process(cfg) as coordinator:
        raw = RawSilo(fed, "raw", coordinator.port)
        try:
            done = coordinator.drive(lambda hub: outcome.append(hub.run_rounds()))
            _poison_rounds(raw, plan, model, answers)
        finally:
            raw.close()
        assert done.wait(60)
        final = dict(coordinator.hub.global_state)
    assert outcome == [Outcome.FINISHED]
    assert [answers[r].round_result.status for r in (1, 2, 3)] == [
        pb.ROUND_STATUS_COMPLETED,
        pb.ROUND_STATUS_ABORTED,
        pb.ROUND_STATUS_COMPLETED,
    ]
    assert answers[2].round_result.abort_reason.startswith(
        "NON_FINITE_MODEL: tensor 'weight' of the new model is not finite in float32"
    )
    log = RoundLog.open_readonly(tmp_path / "coord" / "rounds.sqlite")
    store = CheckpointStore(tmp_path / "coord" / "checkpoints")
    try:
        r1, r2, r3 = (log.round_detail(r) for r in (1, 2, 3))
        assert r2.status.value == "aborted" and r2.checkpoint is None
        assert r2.extra["cause"] == "NON_FINITE_MODEL"
        assert r3.model_in_sha256 == r1.model_out_sha256  # round 2 applied nothing
        assert r3.checkpoint is not None
        last = store.load(r3.checkpoint.path, r3.checkpoint.sha256)
    finally:
        log.close()
    assert not (tmp_path / "coord" / "checkpoints" / "round-000002.safetensors").exists()
    for key, tensor in last.items():
        assert bool(torch.isfinite(tensor).all()), key
        assert torch.equal(final[key], tensor), key
        assert float(tensor.min()) > 2.9e38  # round 1's 3e38 and round 3's 1e-3 were applied


# ---- secure aggregation end to end: a patched silo agent -------------------------------------

D = 2_000
SECURE_CLIP = 1.0
# The coordinator's peak memory above its resident size when the rounds start (VmHWM, reset
# then): the bound tests/test_hostile_silo_input.py holds the coordinator to under attack.
MEMORY_BOUND_MB = 150


class HostileTask:
    """One flat parameter of D floats. Training adds a seeded N(0, 0.01²) step (norm ~0.45);
    with option `hostile` true, from round 2 on it adds 12.5 to every coordinate instead (the
    issue's figure), which only a patched agent sends unclipped; with `hostile = "once"`, in
    round 2 only."""

    name = "hostile"

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.register_parameter("w", torch.nn.Parameter(torch.zeros(D)))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silofed import TrainResult

        round_id = int(params["round"])
        hostile = data.get("hostile")
        if (hostile is True and round_id >= 2) or (hostile == "once" and round_id == 2):
            step = torch.full((D,), 12.5)
        else:
            gen = torch.Generator().manual_seed(100 * int(data["silo_index"]) + round_id)
            step = torch.randn(D, generator=gen) * 0.01
        with torch.no_grad():
            model.get_parameter("w").add_(step)
        return TrainResult(10, {"loss": 0.0})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {"w_norm": float(model.get_parameter("w").detach().norm())}


HOSTILE_TASK = HostileTask()
HOSTILE_SPEC = "tests.test_hostile_silo_updates:HOSTILE_TASK"


def with_bad_weight(
    session: SiloSession, config: RoundConfig, upload: MaskedUpload
) -> MaskedUpload:
    """`upload` as a modified agent sends it: 2·S_w added to its (masked) weight element, so
    the weight the coordinator decodes is q + 2·S_w > S_w, and the header re-signed with the
    silo's own key to state that element and the vector's new digest (a header that disagreed
    with the vector would only get the upload refused, and prove nothing)."""
    vector = upload.vector
    vector[0] = (int(vector[0]) + 2 * config.weight_scale) % (1 << config.ring_bits)
    header = masked_header_of(upload.header)
    assert header is not None
    header = dataclasses.replace(
        header, vector_sha256=sha256_array(vector), weight_element=int(vector[0])
    )
    signed = session.identity.seal(SIG_MASKED, encode_message(header))
    return MaskedUpload(encode_message(signed), vector)


def patched_agent(mode: str, config: str) -> int:
    """The real silo agent with one step replaced (run in its own process): `unclipped`:
    clipping is skipped (the clip factor is always 1); `weight`: every masked input it sends
    carries an out-of-range weight element (`with_bad_weight`, applied after masking);
    `weight-once`: only its second masked input does."""
    from secagg import encoding
    from silo_agent.cli import main

    if mode == "unclipped":

        def no_clip(delta: np.ndarray, clip_l2: float) -> float:
            return 1.0

        encoding.clip_factor = no_clip
    elif mode in ("weight", "weight-once"):
        real = SiloSession._mask
        sent = [0]

        def crafted(
            self: SiloSession, cfg: RoundConfig, delta: np.ndarray, num_examples: int
        ) -> MaskedUpload:
            upload = real(self, cfg, delta, num_examples)
            sent[0] += 1
            if mode == "weight-once" and sent[0] != 2:
                return upload
            return with_bad_weight(self, cfg, upload)

        SiloSession._mask = crafted  # type: ignore[method-assign]
    else:
        raise ValueError(mode)
    return main(["run", "--config", config])


PATCHED = "spiffe://sabotage/silo/patched"
PATCHED_AGENT_MODULE = "tests.test_hostile_silo_updates"  # runs patched_agent as __main__
HONEST_SECURE = ("a", "b", "c")


def _round_of(message: pb.SiloMessage) -> int | None:
    """The round a silo's message is about (None for hello and heartbeats)."""
    kind = message.WhichOneof("kind")
    if kind in ("hello", "heartbeat") or kind is None:
        return None
    inner = getattr(message, kind)
    return int(inner.round_id)


@dataclasses.dataclass
class _PatchedRun:
    outcome: list[Outcome]
    state: Path
    final: dict[str, torch.Tensor]
    sent_rounds: dict[str, set[int]]  # silo id -> the rounds its messages were about
    status: dict[str, Any]  # `silofed-coordinator status --json` after the rounds
    status_table: str  # the same, as the table
    peak_mb: float  # the coordinator's peak memory above its RSS when the rounds started
    # silo name -> its persisted submission records (silo_agent/storage/silo_state.py), after the
    # run
    records: dict[str, list[SubmissionRecord]]


def _run_with_a_patched_agent(
    tmp_path: Path,
    mode: str,
    *,
    rounds: int,
    hostile_task: bool | str,
    min_silos: int = 4,
    **rounds_extra: Any,
) -> _PatchedRun:
    """Three honest agents and one `patched_agent(mode)` ("patched"), secure aggregation with
    example weights, an in-process coordinator (all four connected before round 1); returns
    how `run_rounds` ended, the state dir, the final global model, what each silo sent, the
    operator's `status` afterwards and the coordinator's peak memory. Every silo process must
    still be running at the end."""
    names = (*HONEST_SECURE, "patched")
    fed = provision(tmp_path / "fed", "sabotage", names)
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "coordinator.toml",
        fed,
        state_dir=state,
        task_spec=HOSTILE_SPEC,
        rounds=rounds,
        min_silos=min_silos,
        start_silos=4,
        aggregation="secagg",
        secagg={"clip_l2": SECURE_CLIP, "weighting": "examples", "weight_max": 10},
        rounds_extra={"abort_backoff_initial_s": 0.2, "abort_backoff_max_s": 0.5, **rounds_extra},
    )
    sent_rounds: dict[str, set[int]] = {}
    lock = threading.Lock()

    def record(silo_id: str, message: pb.SiloMessage) -> None:
        round_id = _round_of(message)
        if round_id is not None:
            with lock:
                sent_rounds.setdefault(silo_id, set()).add(round_id)

    outcome: list[Outcome] = []
    with (
        coordinator_in_process(cfg, finished=False, on_receive=record) as coordinator,
        processes(tmp_path / "logs") as procs,
    ):
        for i, name in enumerate(names):
            patched = name == "patched"
            toml = write_silo_config(
                tmp_path / f"{name}.toml",
                fed.silos[name],
                port=coordinator.port,
                task_spec=HOSTILE_SPEC,
                options={"silo_index": i, "hostile": hostile_task if patched else False},
                allow_plaintext_insecure=False,
                allow_example_weighting=True,  # the coordinator runs example weighting
            )
            if patched:
                # `python -m` this file (the __main__ block below): forked from the tests' warm
                # launcher like the honest agents, so it is not the last to connect.
                procs.start("silo-patched", ["-m", PATCHED_AGENT_MODULE, mode, str(toml)])
            else:
                procs.silo(name, toml)
        _reset_peak()
        rss_kb = _memory_kb()["VmRSS"]
        done = coordinator.drive(lambda hub: outcome.append(hub.run_rounds()))
        assert done.wait(240), procs.logs()
        peak_mb = (_memory_kb()["VmHWM"] - rss_kb) / 1024
        final = {k: v.clone() for k, v in coordinator.hub.global_state.items()}
        for proc in procs.procs:  # no silo crashed, the patched one included
            assert proc.popen.poll() is None, procs.logs()
        # What the operator sees, through the real command, while the coordinator serves.
        who = (
            "--address", f"127.0.0.1:{coordinator.port}", "--ca-cert", str(fed.ca_cert),
            "--operator-dir", str(fed.root / "operators" / "operator"),
            "--server-name", "localhost",
        )  # fmt: skip
        shown = run_module("coordinator", "status", *who, "--json", timeout_s=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        table = run_module("coordinator", "status", *who, timeout_s=60)
        assert table.returncode == 0, table.stdout + table.stderr
        logs = procs.logs()
    assert outcome, logs
    records = {
        name: [
            r
            for recs in SiloStateStore(fed.silos[name].dir / "state").state.submission_log.values()
            for r in recs
        ]
        for name in names
    }
    return _PatchedRun(
        outcome, state, final, sent_rounds, json.loads(shown.stdout), table.stdout, peak_mb, records
    )


def _memory_kb() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> None:
    # Linux: "5" resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def test_a_persistent_unclipped_input_stops_the_federation_with_a_diagnosis(
    tmp_path: Path,
) -> None:
    """Nothing can prove whose input was too long (docs/secagg-protocol.md §2.5): rounds 2 and
    3 abort with AGGREGATE_OUT_OF_BOUND, nothing is applied, and the coordinator stops (exit 4)
    with the diagnosis naming the cause and what to do."""
    run = _run_with_a_patched_agent(
        tmp_path, "unclipped", rounds=4, hostile_task=True, max_consecutive_aborts=2
    )
    assert run.outcome == [Outcome.STALLED]
    state, final = run.state, run.final

    log = RoundLog.open_readonly(state / "rounds.sqlite")
    store = CheckpointStore(state / "checkpoints")
    try:
        r1, r2, r3 = (log.round_detail(r) for r in (1, 2, 3))
        assert [r.status.value for r in log.rounds()] == ["completed", "aborted", "aborted"]
        assert len(r1.participants["finished"]) == 4
        assert r1.checkpoint is not None
        after_r1 = store.load(r1.checkpoint.path, r1.checkpoint.sha256)
        for r in (r2, r3):
            assert r.abort_reason is not None
            assert re.search(
                rf"^{AGGREGATE_OUT_OF_BOUND}: norm \S+ > bound 1\.0000\d* \(clip_l2 1, 4 survivors",
                r.abort_reason,
            ), r.abort_reason
            assert "blamed" not in r.extra  # nobody can be named
            assert r.checkpoint is None and r.model_in_sha256 == r1.model_out_sha256
        stalled = r3.extra["stalled"]
        assert isinstance(stalled, dict)
        assert stalled["cause"] == AGGREGATE_OUT_OF_BOUND and stalled["rounds"] == [2, 3]
        assert "revoke" in str(stalled["options"])
    finally:
        log.close()
    assert run.status["excluded"] == []
    # Nothing of rounds 2 and 3 was applied: the model is round 1's, which moved by ≤ C.
    assert torch.equal(final["w"], after_r1["w"])
    assert float(after_r1["w"].double().norm()) <= SECURE_CLIP  # the initial model is zeros
    assert not list((state / "checkpoints").glob("round-00000[23].safetensors"))


def test_one_unclipped_input_costs_one_round_and_the_federation_goes_on(tmp_path: Path) -> None:
    """An unclipped input in round 2 only: that round is refused (AGGREGATE_OUT_OF_BOUND,
    nothing applied), the same model is retried with the same four silos at once (round 3) and
    completes, and so does every later round: no stall, no aggregate beyond the bound."""
    run = _run_with_a_patched_agent(
        tmp_path, "unclipped", rounds=3, hostile_task="once", max_consecutive_aborts=2
    )
    assert run.outcome == [Outcome.FINISHED]
    log = RoundLog.open_readonly(run.state / "rounds.sqlite")
    store = CheckpointStore(run.state / "checkpoints")
    try:
        details = [log.round_detail(r.round_id) for r in log.rounds()]
        assert [d.status.value for d in details] == [
            "completed",
            "aborted",
            "completed",
            "completed",
        ]
        r1, r2, r3, _ = details
        assert r2.abort_reason is not None and r2.abort_reason.startswith(AGGREGATE_OUT_OF_BOUND)
        assert r2.checkpoint is None and r3.model_in_sha256 == r2.model_in_sha256
        previous = r1.checkpoint
        for d in details[2:]:
            assert len(d.participants["finished"]) == 4, d.round_id
            assert d.checkpoint is not None and previous is not None
            new = store.load(d.checkpoint.path, d.checkpoint.sha256)["w"].double()
            old = store.load(previous.path, previous.sha256)["w"].double()
            assert float((new - old).norm()) <= SECURE_CLIP * (1 + 1e-3), d.round_id
            previous = d.checkpoint
    finally:
        log.close()
    assert bool(torch.isfinite(run.final["w"]).all())
    assert run.peak_mb <= MEMORY_BOUND_MB, run.peak_mb


@pytest.mark.parametrize(
    ("mode", "bad_round"),
    [("weight", 1), ("weight-once", 2)],
    ids=["in every round", "once, after a good round"],
)
def test_a_silo_sending_an_out_of_range_weight_is_blamed_and_excluded(
    tmp_path: Path, mode: str, bad_round: int
) -> None:
    """The first round with an out-of-range weight element aborts with OVERFLOW_RULE and names
    the patched silo under `blamed`; the coordinator goes on (one abort in a row stops it here,
    so the blamed round must not count), retries the same model with the three honest silos at
    once, which accept it on the proof, and completes every later round with exactly them. The
    patched silo is never offered a round again (it sends nothing about any later round), the
    model stays finite and moves by at most C a round, `status` lists the silo as excluded, and
    the coordinator's peak memory stays within MEMORY_BOUND_MB."""
    rounds = 4
    run = _run_with_a_patched_agent(
        tmp_path, mode, rounds=rounds, hostile_task=False, min_silos=3, max_consecutive_aborts=1
    )
    assert run.outcome == [Outcome.FINISHED]
    honest = sorted(f"spiffe://sabotage/silo/{n}" for n in HONEST_SECURE)

    log = RoundLog.open_readonly(run.state / "rounds.sqlite")
    store = CheckpointStore(run.state / "checkpoints")
    try:
        details = [log.round_detail(r.round_id) for r in log.rounds()]
        assert [d.round_id for d in details] == list(range(1, rounds + 2))
        assert [d.status.value for d in details] == [
            "aborted" if d.round_id == bad_round else "completed" for d in details
        ]
        for d in details[: bad_round - 1]:  # the patched silo's good rounds
            assert len(d.participants["finished"]) == 4
        bad, retry = details[bad_round - 1], details[bad_round]
        assert bad.abort_reason == "OVERFLOW_RULE in phase unmask", bad.abort_reason
        assert bad.extra["blamed"] == [PATCHED]
        assert bad.checkpoint is None
        assert PATCHED in bad.participants["U3"]  # its input was in the sum when it was named
        # The retry: the same model, the honest silos only (their guard needed the proof).
        previous = log.checkpoint(bad_round - 1)  # round 0: the initial model
        assert previous is not None and bad.model_in_sha256 == previous.sha256
        assert retry.model_in_sha256 == bad.model_in_sha256
        for d in details[bad_round:]:
            assert sorted(d.participants["invited"]) == honest, d.round_id
            assert sorted(d.participants["finished"]) == honest, d.round_id
            assert d.model_in_sha256 == previous.sha256, d.round_id
            assert d.checkpoint is not None
            new = store.load(d.checkpoint.path, d.checkpoint.sha256)["w"].double()
            old = store.load(previous.path, previous.sha256)["w"].double()
            assert bool(torch.isfinite(new).all()), d.round_id
            assert float((new - old).norm()) <= SECURE_CLIP * (1 + 1e-3), d.round_id
            previous = d.checkpoint
    finally:
        log.close()
    assert bool(torch.isfinite(run.final["w"]).all())
    # The patched silo's messages are about its rounds up to the blamed one, never a later one
    # (no offer, no final evaluation reached it); the honest silos took part in every round.
    assert max(run.sent_rounds[PATCHED]) == bad_round, run.sent_rounds[PATCHED]
    for name in honest:
        assert set(range(1, rounds + 2)) <= run.sent_rounds[name], name
    # Each honest silo verified the proof and recorded the exclusion for the blamed attempt
    # (its state file, persisted before it answered the retry's offer).
    for name in HONEST_SECURE:
        excluded = {r.round_id: r.excluded for r in run.records[name] if r.excluded}
        assert excluded == {bad_round: frozenset({PATCHED})}, (name, run.records[name])
    excluded = run.status["excluded"]
    assert [(e["silo_id"], e["round"]) for e in excluded] == [(PATCHED, bad_round)]
    assert PATCHED in {s["silo_id"] for s in run.status["silos"]}  # connected, yet excluded
    assert "excluded silos" in run.status_table and "silofed-coordinator revoke" in run.status_table
    print(f"{mode}: coordinator peak +{run.peak_mb:.1f} MB")
    assert run.peak_mb <= MEMORY_BOUND_MB, run.peak_mb


if __name__ == "__main__":  # `python -m tests.test_hostile_silo_updates <mode> <config>`
    sys.exit(patched_agent(sys.argv[1], sys.argv[2]))

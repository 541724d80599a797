"""Both round kinds behind `RoundKind`, in memory, with explicit times (a fake clock).

One table per kind: each row drives a real round (the plaintext kind with real FedAvg, the
secure kind with real `secagg.SiloSession`s exchanging real protocol messages) through one
transition of the interface (start, frame, upload, lost, tick, cancel, outcome, status) and
checks what the kind answers: the `Step` (events, frames, what it ignored), its `status()` and
its `outcome()`. Rounds are built by `coordinator.rounds.factory.build_round`, as the driver
builds them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.config import (
    CoordinatorConfig,
    Deadlines,
    PlaintextLimits,
    RoundsConfig,
    SecAggSettings,
    TlsConfig,
)
from coordinator.rounds.events import Step
from coordinator.rounds.factory import build_round
from coordinator.rounds.fedavg import PLAINTEXT
from coordinator.rounds.kind import (
    Aborted,
    CannotStart,
    Completed,
    Loss,
    MaskedVector,
    ModelDelivered,
    PlaintextUpdate,
    Reported,
    RoundKind,
    SecAggPayload,
)
from coordinator.rounds.phases import (
    Dropped,
    DropReason,
    PhaseEnded,
    RoundAborted,
    RoundId,
    RoundReady,
)
from coordinator.rounds.plaintext import PlaintextRound
from coordinator.rounds.secure import SecureKind
from coordinator.rounds.secure_config import SECAGG, quantisation_bound
from secagg.errors import AbortReason
from secagg.messages import SIG_MASKED, AbortNotice, encode_message, masked_header_of
from secagg.primitives import sha256_array
from secagg.silo import MaskedUpload, SiloPolicy, SiloSession, SiloStage
from silofed.tensors import state_to_bytes
from tests.secagg.harness import MODEL_SHA, round_floor
from tests.secagg.pki import NOW, federation

T0 = NOW.timestamp()  # the fake clock starts when the test certificates are valid
RID = RoundId(7)
DEADLINES = Deadlines(offer_s=10, train_s=20, share_keys_s=10, consistency_s=10, unmask_s=10)


def _state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float32),
        "b": torch.tensor([0.125, -0.5], dtype=torch.float32),
    }


def _config(
    aggregation: str, plaintext_clip: float | None = 100.0, **secagg: object
) -> CoordinatorConfig:
    p = Path("/nonexistent")
    settings = SecAggSettings(**{"clip_l2": 10.0, "n_colluders": 1, **secagg})  # type: ignore[arg-type]
    return CoordinatorConfig(
        source=p / "coordinator.toml",
        federation_id=federation().roster.federation_id,
        state_dir=p,
        listen="127.0.0.1:0",
        tls=TlsConfig(ca_cert=p, cert=p, key=p, roster=p, revoked=p),
        task_spec="tests.sized_task:TASK",
        rounds=RoundsConfig(count=1, min_silos=2, aggregation=aggregation),
        deadlines=DEADLINES,
        secagg=settings if aggregation == SECAGG else None,
        plaintext=PlaintextLimits(clip_l2=plaintext_clip, weight_max=1000),
    )


def _build(
    aggregation: str,
    invited: Sequence[str],
    state: dict[str, torch.Tensor] | None = None,
    plaintext_clip: float | None = 100.0,
    **secagg: object,
) -> RoundKind | CannotStart:
    return build_round(
        _config(aggregation, plaintext_clip, **secagg),
        federation().trust,
        _state() if state is None else state,
        RID,
        invited,
        model_sha256=MODEL_SHA,
        model_bytes=len(state_to_bytes(_state())),
        now=T0,
    )


def _kinds(step: Step) -> list[str]:
    return [type(e).__name__ for e in step.events]


# ==== the plaintext kind =======================================================================

SILOS = ("a", "b", "c")
EXAMPLES = {"a": 10, "b": 30, "c": 60}


def _delta(silo: str) -> dict[str, torch.Tensor]:
    k = SILOS.index(silo) + 1
    return {
        "w": torch.tensor([0.1 * k, -0.2, 0.3 / k, 1.0 - k], dtype=torch.float32),
        "b": torch.tensor([k / 7.0, 0.01], dtype=torch.float32),
    }


def _blob(update: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    data = state_to_bytes(update)
    return data, hashlib.sha256(data).digest()


class Plain:
    """A started plaintext round over SILOS (min_silos 2) and the silos' uploads."""

    def __init__(
        self,
        invited: Sequence[str] = SILOS,
        state: dict[str, torch.Tensor] | None = None,
        clip: float | None = 100.0,
    ) -> None:
        kind = _build(PLAINTEXT, invited, state, clip)
        assert isinstance(kind, PlaintextRound)
        self.kind = kind
        self.first = kind.start(invited, T0)

    def deliver(self, *silos: str, now: float = T0 + 1) -> Step:
        steps = [self.kind.frame(s, ModelDelivered(RID), now) for s in silos]
        return steps[-1]

    def report(self, silo: str, update: dict[str, torch.Tensor] | None = None) -> Step:
        _, sha = _blob(update if update is not None else _delta(silo))
        report = Reported(RID, EXAMPLES[silo], sha, {"eval_loss": float(len(silo)), "x": 1.0})
        return self.kind.frame(silo, report, T0 + 2)

    def upload(self, silo: str, update: dict[str, torch.Tensor] | None = None) -> Step:
        data, sha = _blob(update if update is not None else _delta(silo))
        return self.kind.upload(silo, PlaintextUpdate(RID, data, sha), T0 + 3)

    def train(self, *silos: str) -> Step:
        step = Step()
        for s in silos:
            self.report(s)
            step = self.upload(s)
        return step


def _fedavg(silos: Sequence[str]) -> dict[str, torch.Tensor]:
    """The expected model, computed independently: old + Σ n_i·Δ_i / Σ n_i in float64."""
    total = sum(EXAMPLES[s] for s in silos)
    out = {}
    for name, old in _state().items():
        acc = sum(_delta(s)[name].double() * EXAMPLES[s] for s in silos)
        out[name] = (acc / total + old.double()).to(old.dtype)
    return out


def p_start_enough() -> None:
    r = Plain()
    assert r.first == Step()
    st = r.kind.status()
    assert (st.round_id, st.phase, st.since, st.deadline) == (RID, "offer", T0, T0 + 10)
    assert st.waiting_for == frozenset(SILOS) and not st.over and st.uploads == {}
    assert r.kind.offer_config == b'{"aggregation": "plaintext-insecure"}'
    assert r.kind.train_params_json == "{}" and r.kind.aggregation == PLAINTEXT
    assert r.kind.outcome() is None


def p_start_too_few() -> None:
    r = Plain(invited=["a"])
    assert _kinds(r.first) == ["RoundAborted"] and r.kind.status().over
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and out.reason == "only 1 silos invited, need 2"


def p_frame_expected() -> None:
    r = Plain()
    assert r.deliver("a", "b") == Step()
    step = r.deliver("c", now=T0 + 4)
    assert list(step.events) == [PhaseEnded("offer", T0, T0 + 4, SILOS)]
    st = r.kind.status()
    assert (st.phase, st.since, st.deadline) == ("train", T0 + 4, T0 + 24)
    assert r.report("a") == Step()
    assert set(r.kind.status().uploads) == {"a"}


def p_frame_report_proves_delivery() -> None:
    r = Plain()
    r.deliver("a", "b")
    step = r.report("c")  # before c's delivery marker: the report proves the model arrived
    assert _kinds(step) == ["PhaseEnded"] and step.ignored == ()
    assert set(r.kind.status().uploads) == {"c"}


def p_frame_stray_round() -> None:
    r = Plain()
    r.deliver(*SILOS)
    step = r.kind.frame("a", Reported(RID + 1, 5, b"x" * 32), T0 + 2)
    assert step.events == () and [i.cause for i in step.ignored] == ["stray report"]
    assert r.kind.frame("a", ModelDelivered(RID + 1), T0 + 2) == Step()
    step = r.kind.frame("a", SecAggPayload(RID, b"\x00"), T0 + 2)
    assert [i.cause for i in step.ignored] == ["stray secagg frame"]
    assert r.kind.status().uploads == {}


def p_frame_wrong_phase() -> None:
    r = Plain()
    r.deliver(*SILOS)
    r.train("a")  # a has finished train: a second report is late
    step = r.report("a")
    assert [(i.silo_id, i.cause) for i in step.ignored] == [("a", "stray report")]
    step = r.kind.frame("z", Reported(RID, 5, b"x" * 32), T0 + 2)  # not invited
    assert [i.cause for i in step.ignored] == ["stray report"]


def p_frame_duplicate() -> None:
    r = Plain()
    r.deliver("a")
    assert r.deliver("a") == Step()  # nothing happens twice
    r.deliver("b", "c")
    r.report("b", {k: v * 0 for k, v in _delta("b").items()})
    r.report("b")  # a second report replaces the first: its digest is the one checked
    assert r.upload("b").events == ()
    assert r.kind.status().waiting_for == {"a", "c"}


def p_upload_accepted() -> None:
    r = Plain()
    r.deliver(*SILOS)
    r.report("a")
    spec = r.kind.status().uploads["a"]
    assert spec.sha256 == _blob(_delta("a"))[1] and spec.dtype is None
    assert spec.max_bytes == 2 * len(state_to_bytes(_state())) + (1 << 20)
    assert r.upload("a") == Step()
    assert r.kind.status().uploads == {} and r.kind.status().waiting_for == {"b", "c"}
    step = r.train("b", "c")
    assert _kinds(step) == ["PhaseEnded", "RoundReady"]


def p_upload_refused_whole() -> None:
    r = Plain()
    r.deliver(*SILOS)
    bad = _delta("b")
    bad["b"] = torch.tensor([1.0, float("nan")])
    r.report("b", bad)
    step = r.upload("b", bad)
    assert [(e.silo_id, e.phase, e.reason) for e in step.events if isinstance(e, Dropped)] == [
        ("b", "train", DropReason.INVALID)
    ]
    drop = step.events[0]
    assert isinstance(drop, Dropped) and "update refused" in drop.detail
    assert "not finite" in drop.detail
    r.train("a", "c")
    out = r.kind.outcome()
    # Nothing of b's update reached the accumulator: FedAvg over a and c, bit for bit.
    assert isinstance(out, Completed) and out.survivors == ("a", "c")
    assert all(torch.equal(out.new_state[k], v) for k, v in _fedavg(["a", "c"]).items())
    assert set(out.metrics) == {"a", "c"}  # metrics of accepted updates only


def p_upload_wrong_size() -> None:
    r = Plain()
    r.deliver(*SILOS)
    r.report("a")
    limit = r.kind.status().uploads["a"].max_bytes
    data = b"\x00" * (limit + 1)
    step = r.kind.upload("a", PlaintextUpdate(RID, data, _blob(_delta("a"))[1]), T0 + 3)
    assert isinstance(step.events[0], Dropped) and "exceeds the limit" in step.events[0].detail
    r.report("b")
    step = r.upload("b", {k: v + 1 for k, v in _delta("b").items()})  # not what b reported
    assert isinstance(step.events[0], Dropped)
    assert step.events[0].detail == "update blob does not match its train report"
    assert _kinds(step) == ["Dropped", "RoundAborted"]  # one silo left, min_silos 2


def p_upload_not_expected() -> None:
    r = Plain()
    r.deliver(*SILOS)
    step = r.upload("a")  # no report yet
    assert step.events == () and [i.cause for i in step.ignored] == ["stray blob"]
    vector = np.zeros(7, np.uint32)
    step = r.kind.upload("a", MaskedVector(RID, b"h", vector, b"s" * 32), T0 + 3)
    assert [(i.cause, i.warning) for i in step.ignored] == [("masked vector refused", True)]


def p_lost_mid_phase() -> None:
    r = Plain()
    r.deliver(*SILOS)
    step = r.kind.lost("a", Loss(DropReason.DISCONNECTED, "replaced"), T0 + 5)
    assert list(step.events) == [Dropped("a", "train", DropReason.DISCONNECTED, "stream closed")]
    assert r.kind.lost("a", Loss(DropReason.DISCONNECTED, "again"), T0 + 5) == Step()
    assert r.kind.lost("z", Loss(DropReason.DISCONNECTED, "not invited"), T0 + 5) == Step()
    assert r.kind.status().waiting_for == {"b", "c"} and not r.kind.status().over


def p_lost_below_threshold() -> None:
    r = Plain()
    r.deliver(*SILOS)
    r.kind.lost("a", Loss(DropReason.DISCONNECTED, "gone"), T0 + 5)
    loss = Loss(DropReason.INVALID, "silo aborted: MODEL_MISMATCH", refusal="MODEL_MISMATCH")
    step = r.kind.lost("b", loss, T0 + 6)
    assert _kinds(step) == ["Dropped", "RoundAborted"]
    assert step.events[0] == Dropped("b", "train", DropReason.INVALID, loss.detail)
    out = r.kind.outcome()
    assert isinstance(out, Aborted)
    assert out.reason == "only 1 silos left in phase train, need 2"
    assert out.refusals == {"b": "MODEL_MISMATCH"}


def p_tick() -> None:
    r = Plain()
    r.deliver("a", "b")
    assert r.kind.tick(T0 + 9.99) == Step()
    step = r.kind.tick(T0 + 10)
    assert list(step.events) == [
        Dropped("c", "offer", DropReason.TIMEOUT, "missed the offer deadline"),
        PhaseEnded("offer", T0, T0 + 10, ("a", "b")),
    ]
    assert r.kind.status().phase == "train" and r.kind.status().deadline == T0 + 30


def p_cancel() -> None:
    r = Plain()
    r.deliver(*SILOS)
    step = r.kind.cancel("the coordinator is stopping", T0 + 5)
    assert list(step.events) == [RoundAborted("the coordinator is stopping")]
    assert r.kind.cancel("again", T0 + 6) == Step()
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and out.reason == "the coordinator is stopping"
    assert r.upload("a").events == ()  # nothing is taken once over


def p_outcome_fedavg() -> None:
    r = Plain()
    r.deliver(*SILOS)
    r.train("a", "b")
    assert r.kind.outcome() is None
    step = r.train("c")
    assert step.events[-1] == RoundReady(SILOS)
    out = r.kind.outcome()
    assert isinstance(out, Completed) and out.survivors == SILOS and out.privacy is None
    assert out.weight_sum == 100.0
    assert all(torch.equal(out.new_state[k], v) for k, v in _fedavg(SILOS).items())
    assert out.metrics["c"] == {"eval_loss": 1.0, "x": 1.0}
    assert out.announce(b"\x00" * 32) == Step()
    assert r.kind.outcome() is out  # computed once


def p_outcome_non_finite() -> None:
    huge = {k: torch.full_like(v, 3e38) for k, v in _state().items()}
    r = Plain(invited=["a", "b"], state=huge, clip=None)  # old + mean is beyond float32
    r.deliver("a", "b")
    for s in ("a", "b"):
        r.report(s, huge)
        r.upload(s, huge)
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and out.reason.startswith("NON_FINITE_MODEL"), out


PLAINTEXT_TABLE: list[Callable[[], None]] = [
    p_start_enough,
    p_start_too_few,
    p_frame_expected,
    p_frame_report_proves_delivery,
    p_frame_stray_round,
    p_frame_wrong_phase,
    p_frame_duplicate,
    p_upload_accepted,
    p_upload_refused_whole,
    p_upload_wrong_size,
    p_upload_not_expected,
    p_lost_mid_phase,
    p_lost_below_threshold,
    p_tick,
    p_cancel,
    p_outcome_fedavg,
    p_outcome_non_finite,
]


@pytest.mark.parametrize("row", PLAINTEXT_TABLE, ids=lambda f: f.__name__[2:])
def test_plaintext_kind(row: Callable[[], None]) -> None:
    row()


# ==== the secure kind ==========================================================================

N = 5  # threshold 4 with n_colluders 1: one silo may drop


def _input(k: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return (rng.standard_normal(d) * 0.05).astype(np.float32)


def _cheat(silo: str, up: MaskedUpload) -> MaskedUpload:
    """A patched agent: adds 1 to the weight element after masking and signs it."""
    identity = next(s for s in federation().silos if s.silo_id == silo)
    y = up.vector.copy()
    y[0] = (int(y[0]) + 1) % (1 << (y.dtype.itemsize * 8))
    h = masked_header_of(up.header)
    assert h is not None
    h = dataclasses.replace(h, vector_sha256=sha256_array(y), weight_element=int(y[0]))
    return MaskedUpload(encode_message(identity.seal(SIG_MASKED, encode_message(h))), y)


class Secure:
    """A started secure round over N real SiloSessions; messages pass at once, except to and
    from `silent` silos. Masked uploads are sent by `upload` (or at once with `auto_upload`)."""

    def __init__(self, n: int = N, *, auto_upload: bool = True, **secagg: object) -> None:
        fed = federation()
        self.invited = sorted(str(s.silo_id) for s in fed.silos[:n])
        kind = _build(SECAGG, self.invited, None, 100.0, **secagg)
        assert isinstance(kind, SecureKind)
        self.kind = kind
        self.cfg = kind.driver.config
        self.auto_upload = auto_upload
        self.silent: set[str] = set()
        self.cheaters: set[str] = set()
        self.inputs = {s: _input(k, self.cfg.d) for k, s in enumerate(self.invited)}
        policy = SiloPolicy(last_round_id=0)
        self.sessions = {
            str(s.silo_id): SiloSession(
                s,
                fed.trust,
                round_floor(policy, n),
                random_bytes=os.urandom,
                rng=np.random.default_rng(k),
            )
            for k, s in enumerate(fed.silos[:n])
        }
        self.now = T0
        self.driver_ticks = True  # `route` plays the driver's tick after each step
        self.ticked: list[Step] = []  # the ticks that did something
        self.first = kind.start(self.invited, T0)

    def send(self, silo: str, payload: bytes, round_id: int = RID) -> Step:
        step = self.kind.frame(silo, SecAggPayload(round_id, payload), self.now)
        self.route(step)
        return step

    def route(self, step: Step) -> None:
        for silo, data in step.sends:
            if silo in self.silent:
                continue
            for reply in self.sessions[silo].handle(data, now=NOW):
                self.send(silo, reply)
            if self.auto_upload and self.sessions[silo].stage is SiloStage.KEYS_RECEIVED:
                self.upload(silo)
        # The driver ticks whenever the hub recorded a step (it wakes on each): the unmask
        # runs at a tick, once the last share needed has arrived.
        if self.driver_ticks:
            tick = self.kind.tick(self.now)
            if tick.sends or tick.events:
                self.ticked.append(tick)
                self.route(tick)

    def offer(self) -> Step:
        steps = [Step()]
        for silo, s in self.sessions.items():
            if silo not in self.silent:
                steps.append(self.send(silo, s.handle_offer(self.kind.offer_config, MODEL_SHA,
                                                            now=NOW)))  # fmt: skip
        return steps[-1]

    def masked(self, silo: str) -> MaskedUpload:
        up = self.sessions[silo].submit_update(self.inputs[silo], 1)
        return _cheat(silo, up) if silo in self.cheaters else up

    def upload(self, silo: str, up: MaskedUpload | None = None) -> Step:
        up = up or self.masked(silo)
        vector = MaskedVector(RID, up.header, up.vector, sha256_array(up.vector))
        step = self.kind.upload(silo, vector, self.now)
        self.route(step)
        return step

    def expected(self, survivors: Sequence[str]) -> dict[str, torch.Tensor]:
        mean = np.mean([self.inputs[s].astype(np.float64) for s in survivors], axis=0)
        flat = np.concatenate([v.numpy().ravel().astype(np.float64) for v in _state().values()])
        new, start = {}, 0
        for name, v in _state().items():
            part = (flat + mean)[start : start + v.numel()]
            new[name] = torch.from_numpy(part).reshape(v.shape)
            start += v.numel()
        return new


def _dropped(step: Step) -> list[tuple[str, str, DropReason]]:
    return [(e.silo_id, e.phase, e.reason) for e in step.events if isinstance(e, Dropped)]


def s_start_enough() -> None:
    r = Secure()
    assert r.first == Step()
    st = r.kind.status()
    assert (st.round_id, st.phase, st.since, st.deadline) == (RID, "advertise", T0, T0 + 10)
    assert st.waiting_for == frozenset(r.invited) and st.uploads == {} and not st.over
    assert r.kind.aggregation == SECAGG and r.kind.train_params_json == ""
    assert r.cfg.threshold == 4 and list(r.cfg.invited) == r.invited
    assert r.kind.outcome() is None


def s_start_cannot_configure() -> None:
    # The roster's default colluder bound (20 members: 6) needs more than 5 silos.
    got = _build(SECAGG, [str(s.silo_id) for s in federation().silos[:N]], n_colluders=None)
    assert isinstance(got, CannotStart)
    assert got.reason.startswith("CANNOT_CONFIGURE: [secagg] threshold")
    got = _build(SECAGG, [str(s.silo_id) for s in federation().silos[:2]])
    assert isinstance(got, CannotStart) and "threshold" in got.reason


def s_frame_expected() -> None:
    r = Secure(auto_upload=False)
    step = r.offer()
    # The last advertisement closes the phase: keys go to every silo, share_keys begins.
    assert [e.phase for e in step.events if isinstance(e, PhaseEnded)] == ["advertise"]
    assert r.kind.status().phase == "masked"  # share keys went through at once
    spec = r.kind.status().uploads[r.invited[0]]
    assert (spec.length, spec.dtype) == (r.cfg.length, np.dtype(np.uint32))
    assert spec.exact_bytes == spec.max_bytes == r.cfg.length * 4


def s_frame_stray_round() -> None:
    r = Secure()
    silo = r.invited[0]
    m1 = r.sessions[silo].handle_offer(r.kind.offer_config, MODEL_SHA, now=NOW)
    step = r.send(silo, m1, round_id=RID + 1)
    assert step.sends == () and [i.cause for i in step.ignored] == ["stray secagg frame"]
    assert silo in r.kind.status().waiting_for


def s_frame_wrong_phase_and_duplicate() -> None:
    r = Secure(auto_upload=False)
    silo = r.invited[0]
    m1 = r.sessions[silo].handle_offer(r.kind.offer_config, MODEL_SHA, now=NOW)
    r.send(silo, m1)
    assert r.send(silo, m1) == Step()  # a duplicate advertisement: refused, nothing happens
    for other in r.invited[1:]:
        r.send(other, r.sessions[other].handle_offer(r.kind.offer_config, MODEL_SHA, now=NOW))
    assert r.kind.status().phase == "masked"
    assert r.send(silo, m1) == Step()  # an advertisement in the masked phase: refused
    assert r.kind.status().waiting_for == frozenset(r.invited)
    assert r.kind.frame(silo, ModelDelivered(RID), r.now) == Step()
    assert r.kind.frame(silo, Reported(RID, 1, b"", {"eval_acc": 0.5}), r.now) == Step()


def s_frame_refusal_and_malformed() -> None:
    r = Secure(auto_upload=False)
    a, b = r.invited[:2]
    refusal = encode_message(AbortNotice(b"", AbortReason.CONFIG_REJECTED))
    step = r.send(a, refusal)
    assert _dropped(step) == [(a, "advertise", DropReason.INVALID)]
    assert step.events[0] == Dropped(
        a, "advertise", DropReason.INVALID, "silo aborted: CONFIG_REJECTED"
    )
    assert r.send(b, b"\xff\x00") == Step()  # undecodable: refused, b stays until the deadline
    assert b in r.kind.status().waiting_for
    for other in r.invited[2:]:
        r.send(other, r.sessions[other].handle_offer(r.kind.offer_config, MODEL_SHA, now=NOW))
    r.now = T0 + 10
    step = r.kind.tick(r.now)
    assert _dropped(step) == [(b, "advertise", DropReason.INVALID)]
    out = r.kind.outcome()  # 3 advertisements < t = 4
    assert isinstance(out, Aborted) and out.reason == "THRESHOLD_VIOLATION in phase advertise"
    assert out.refusals == {a: "CONFIG_REJECTED"}
    assert r.send(b, refusal) == Step() and r.kind.outcome() is out  # over: nothing changes


def s_upload_accepted() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    silo = r.invited[0]
    assert r.upload(silo) == Step()
    st = r.kind.status()
    assert silo not in st.uploads and silo not in st.waiting_for and len(st.uploads) == N - 1
    step = r.upload(silo, r.masked(r.invited[1]))  # someone else's vector, or a second one
    assert [(i.cause, i.warning) for i in step.ignored] == [("masked vector refused", True)]


def s_upload_refused_whole() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    silo = r.invited[0]
    up = r.masked(silo)
    tampered = up.vector.copy()
    tampered[1] ^= 1  # not the vector its signed header describes: the round refuses it
    step = r.kind.upload(silo, MaskedVector(RID, up.header, tampered, b"x" * 32), r.now)
    assert step.events == ()  # refused, not dropped: it is dropped at the deadline, as INVALID
    assert silo in r.kind.status().uploads
    for other in r.invited[1:]:
        r.upload(other)
    r.now = T0 + 20
    step = r.kind.tick(r.now)
    assert _dropped(step) == [(silo, "masked", DropReason.INVALID)]
    r.route(step)
    out = r.kind.outcome()
    assert isinstance(out, Completed) and silo not in out.survivors


def s_upload_without_header() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    a = r.invited[0]
    up = r.masked(a)
    step = r.kind.upload(a, MaskedVector(RID, b"", up.vector, b"x" * 32), r.now)
    assert list(step.events) == [
        Dropped(a, "masked", DropReason.INVALID, "masked vector header without its protocol_header")
    ]


def s_upload_wrong_size() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    a, b, c = r.invited[:3]
    up = r.masked(a)
    step = r.kind.upload(a, MaskedVector(RID, up.header, up.vector[:-1], b"x" * 32), r.now)
    assert _dropped(step) == [(a, "masked", DropReason.INVALID)]
    assert "bad masked vector header" in step.events[0].detail  # type: ignore[union-attr]
    up = r.masked(b)
    step = r.kind.upload(b, MaskedVector(RID + 1, up.header, up.vector, b"x" * 32), r.now)
    assert _dropped(step) == [(b, "masked", DropReason.INVALID)]
    step = r.kind.upload(c, PlaintextUpdate(RID, b"", b""), r.now)
    assert [i.cause for i in step.ignored] == ["stray blob"]


def s_lost_mid_phase() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    a = r.invited[0]
    r.silent.add(a)
    step = r.kind.lost(a, Loss(DropReason.DISCONNECTED, "stream closed"), r.now)
    assert _dropped(step) == [(a, "masked", DropReason.DISCONNECTED)]
    assert r.kind.lost("outsider", Loss(DropReason.DISCONNECTED, "x"), r.now) == Step()
    for other in r.invited[1:]:
        r.upload(other)
    out = r.kind.outcome()
    assert isinstance(out, Completed) and a not in out.survivors


def s_lost_below_threshold() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    a, b = r.invited[:2]
    r.silent |= {a, b}
    r.kind.lost(a, Loss(DropReason.DISCONNECTED, "gone"), r.now)
    loss = Loss(DropReason.INVALID, "silo aborted: TIMEOUT", refusal="TIMEOUT")
    r.kind.lost(b, loss, r.now)
    for other in r.invited[2:]:
        step = r.upload(other)
    # The masked phase closes with 3 < t = 4 vectors: the round aborts.
    assert [e.phase for e in step.events if isinstance(e, PhaseEnded)] == ["masked"]
    assert r.kind.status().over and r.kind.status().phase == "aborted"
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and "in phase masked" in out.reason
    assert out.refusals == {b: "TIMEOUT"} and out.blamed == {}


def s_tick() -> None:
    r = Secure(auto_upload=False)
    a = r.invited[0]
    r.silent.add(a)
    r.offer()
    assert r.kind.tick(T0 + 9.5) == Step()
    r.now = T0 + 10
    step = r.kind.tick(r.now)
    r.route(step)
    assert _dropped(step) == [(a, "advertise", DropReason.TIMEOUT)]
    assert [e.phase for e in step.events if isinstance(e, PhaseEnded)] == ["advertise"]
    assert step.events[-1] == PhaseEnded("advertise", T0, T0 + 10, tuple(r.invited[1:]), "U1")
    assert r.kind.status().phase == "masked"


def s_cancel() -> None:
    r = Secure(auto_upload=False)
    r.offer()
    step = r.kind.cancel("the coordinator is stopping", T0 + 5)
    assert list(step.events) == [PhaseEnded("masked", T0, T0 + 5, (), "U3")]
    assert r.kind.cancel("again", T0 + 6) == Step()
    assert r.upload(r.invited[0]).sends == ()
    out = r.kind.outcome()
    assert isinstance(out, Aborted)
    assert out.reason == "the coordinator is stopping (in phase masked)"
    assert r.kind.status().over and r.kind.status().uploads == {}


def s_outcome_fedavg() -> None:
    r = Secure()
    a = r.invited[-1]
    r.kind.frame(a, Reported(RID, 1, b"", {"eval_acc": 0.75}), r.now)
    r.kind.frame("outsider", Reported(RID, 1, b"", {"eval_acc": 0.0}), r.now)
    r.offer()
    out = r.kind.outcome()
    assert isinstance(out, Completed), out
    assert out.survivors == tuple(r.invited) and out.weight_sum == N
    assert out.metrics == {a: {"eval_acc": 0.75}} and out.privacy is None
    bound = quantisation_bound(r.cfg, [1] * N)
    for name, want in r.expected(r.invited).items():
        got = out.new_state[name].double()
        ulp = float(got.abs().max()) * 2.0**-23  # float32 storage of the new model
        assert float((got - want).abs().max()) <= bound + ulp
    assert r.kind.driver.round.result is not None and r.kind.driver.round.result.aggregate.size == 0
    sends = out.announce(b"\x01" * 32).sends
    assert sorted(s for s, _ in sends) == r.invited
    for silo, data in sends:
        r.sessions[silo].handle(data, now=NOW)
        assert r.sessions[silo].stage is SiloStage.COMPLETED


def s_unmask_at_the_tick() -> None:
    r = Secure()
    r.driver_ticks = False  # the test is the driver
    r.offer()
    # Every share has arrived; no frame unmasked: the round waits for the driver's tick.
    st = r.kind.status()
    assert (st.phase, st.over) == ("unmask", False) and r.kind.outcome() is None
    assert r.kind.driver.round.result is None
    step = r.kind.tick(r.now)
    assert step.events == (PhaseEnded("unmask", T0, T0, tuple(r.invited), "U5"),)
    assert r.kind.status().over and r.kind.tick(r.now) == Step()
    out = r.kind.outcome()
    assert isinstance(out, Completed) and out.survivors == tuple(r.invited)


def s_outcome_privacy() -> None:
    r = Secure(dp_noise_multiplier=0.5)
    r.offer()
    out = r.kind.outcome()
    assert isinstance(out, Completed) and out.privacy is not None, out
    p = out.privacy
    assert (p.mechanism, p.noise_multiplier, p.clip_norm) == (
        "distributed discrete Gaussian",
        0.5,
        10.0,
    )
    honest = p.details["honest_survivors"]
    assert p.epsilon > 0 and 0 < p.delta < 1 and isinstance(honest, int) and honest >= 1


def s_outcome_blame() -> None:
    r = Secure()
    cheater = r.invited[1]
    r.cheaters.add(cheater)
    r.offer()
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and out.reason.startswith("OVERFLOW_RULE")
    assert list(out.blamed) == [cheater] and out.blamed[cheater]


def s_outcome_out_of_bound() -> None:
    r = Secure()
    r.offer()
    # As if the silos had been told a clip far below their inputs' norm and not applied it:
    # the decoded aggregate is above what clipped inputs can produce.
    r.kind._config = dataclasses.replace(r.cfg, clip_l2=1e-6)
    out = r.kind.outcome()
    assert isinstance(out, Aborted) and out.reason.startswith("AGGREGATE_OUT_OF_BOUND"), out
    assert r.kind.driver.round.result is not None and r.kind.driver.round.result.aggregate.size == 0


SECURE_TABLE: list[Callable[[], None]] = [
    s_start_enough,
    s_start_cannot_configure,
    s_frame_expected,
    s_frame_stray_round,
    s_frame_wrong_phase_and_duplicate,
    s_frame_refusal_and_malformed,
    s_upload_accepted,
    s_upload_refused_whole,
    s_upload_without_header,
    s_upload_wrong_size,
    s_lost_mid_phase,
    s_lost_below_threshold,
    s_tick,
    s_cancel,
    s_outcome_fedavg,
    s_unmask_at_the_tick,
    s_outcome_blame,
    s_outcome_out_of_bound,
]


@pytest.fixture(scope="module")
def dp_accounting_loaded() -> None:
    """The privacy accountant's library takes about a second to import, once per process: not
    a cost of the round that reports its figures."""
    importlib.import_module("dp_accounting.rdp.rdp_privacy_accountant")


@pytest.mark.parametrize("row", SECURE_TABLE, ids=lambda f: f.__name__[2:])
def test_secure_kind(row: Callable[[], None]) -> None:
    row()


def test_secure_kind_outcome_privacy(dp_accounting_loaded: None) -> None:
    """The outcome row of a DP round, apart: its fixture loads the accountant first."""
    s_outcome_privacy()


def _completed_plaintext() -> PlaintextRound:
    r = Plain()
    r.deliver(*SILOS)
    r.train(*SILOS)
    return r.kind


def _completed_secure() -> SecureKind:
    r = Secure()
    r.offer()
    return r.kind


@pytest.mark.parametrize("finished", [_completed_plaintext, _completed_secure])
def test_a_finished_round_is_freed_once_dropped_without_the_cycle_collector(
    finished: Callable[[], PlaintextRound | SecureKind],
) -> None:
    """The hub drops a round after its outcome: nothing may keep it (its accumulator, the old
    model) alive in a reference cycle until the cycle collector happens to run."""
    kind = finished()
    out = kind.outcome()
    assert isinstance(out, Completed), out
    ref = weakref.ref(kind)
    gc.disable()
    try:
        del kind
        assert ref() is None, gc.get_referrers(ref())
        del out
    finally:
        gc.enable()

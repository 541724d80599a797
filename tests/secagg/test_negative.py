"""One negative test per silo check of docs/secagg-protocol.md §5: each ends in ABORT-S with the
stated reason, the session in ABORTED with its secrets erased and an AbortNotice to send."""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable

import numpy as np
import pytest

from secagg.config import DdgNoise, GraphKind, TensorSpec
from secagg.errors import AbortReason, ConfigError, MalformedMessage, ProtocolAbort
from secagg.messages import (
    AbortNotice,
    Advertise,
    Consistency,
    ConsistencySet,
    KeyList,
    Message,
    ShareKeys,
    SharesForYou,
    SignedEnvelope,
    SurvivorList,
    decode_as,
    decode_message,
    encode_message,
)
from secagg.silo import (
    JournalEntry,
    RoundAccepted,
    SiloPolicy,
    SiloSession,
    SiloStage,
    SubmissionRecord,
)
from secagg.trust import SiloIdentity
from tests.secagg.harness import MODEL_SHA, Round, exact_inputs, make_config, round_floor
from tests.secagg.pki import NOW, federation

N, D = 5, 64


def _session(
    policy: SiloPolicy | None = None,
    k: int = 0,
    journal: list[JournalEntry] | None = None,
    n: int = N,
) -> SiloSession:
    fed = federation()
    return SiloSession(
        fed.silos[k],
        fed.trust,
        round_floor(policy or SiloPolicy(last_round_id=0), n),
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
        journal=None if journal is None else journal.append,
    )


def _offer_abort(
    reason: AbortReason,
    policy: SiloPolicy | None = None,
    model: bytes = MODEL_SHA,
    n: int = N,
    d: int = D,
    model_digest: bytes | None = None,
    **over: object,
) -> ProtocolAbort:
    """The offer is refused with `reason`: no Advertise was produced, an AbortNotice was."""
    cfg = make_config(federation(), n, d, **over)
    s = _session(policy, n=n)
    with pytest.raises(ProtocolAbort) as exc:
        s.handle_offer(cfg.encode(), model, now=NOW, model_digest=model_digest)
    assert exc.value.reason is reason, exc.value
    assert s.stage is SiloStage.ABORTED and s._c_sk is None
    assert s._m1 == b"" and s.config is None  # no Advertise was built
    assert s.abort_notice is not None
    notice = decode_message(s.abort_notice)
    assert isinstance(notice, AbortNotice) and notice.reason is reason
    return exc.value


def _offer_ok(policy: SiloPolicy | None = None, n: int = N, **over: object) -> SiloSession:
    cfg = make_config(federation(), n, D, **over)
    s = _session(policy, n=n)
    m1 = s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    assert s.stage is SiloStage.ADVERTISED
    assert isinstance(decode_as(decode_as(m1, SignedEnvelope).payload, Advertise), Advertise)
    return s


# --- phase 0 ---------------------------------------------------------------------------------


def test_0_1_roster_mismatch() -> None:
    _offer_abort(AbortReason.ROSTER_MISMATCH, roster_version=2)


def test_0_2_stale_round() -> None:
    _offer_abort(AbortReason.STALE_ROUND, SiloPolicy(last_round_id=7), round_id=7)


def test_0_3_not_invited() -> None:
    fed = federation()
    invited = tuple(sorted(s.silo_id for s in fed.silos[1:6]))
    _offer_abort(AbortReason.ROSTER_MISMATCH, invited=invited)


def test_0_3_invited_silo_not_on_roster() -> None:
    fed = federation()
    invited = tuple(sorted([*(s.silo_id for s in fed.silos[:4]), fed.outsider.silo_id]))
    _offer_abort(AbortReason.ROSTER_MISMATCH, invited=invited)


def test_0_4_ring_width_refused_by_policy() -> None:
    _offer_abort(
        AbortReason.CONFIG_REJECTED, SiloPolicy(0, accepted_ring_bits=frozenset({32})), ring_bits=64
    )


def test_0_4_overflow_violating_config() -> None:
    _offer_abort(AbortReason.OVERFLOW_RULE, scale=2.0**25, clip_l2=100.0)


def test_0_5_threshold_below_hard_floor() -> None:
    _offer_abort(AbortReason.THRESHOLD_VIOLATION, threshold=2)


def test_0_5_colluders_above_policy() -> None:
    _offer_abort(AbortReason.CONFIG_REJECTED, SiloPolicy(0, n_colluders_max=0), n_colluders=1)


def test_0_5_dp_divisor_above_honest_bound() -> None:
    _offer_abort(AbortReason.CONFIG_REJECTED, dp=DdgNoise(1.0, 4), scale=2.0**8, clip_l2=1.0)


def test_0_5_policy_requires_dp_noise() -> None:
    _offer_abort(AbortReason.CONFIG_REJECTED, SiloPolicy(0, min_noise_multiplier=1.0))


def test_deadlines_must_be_one_per_phase() -> None:
    """A config with too few deadlines would leave a silo without its own timeouts."""
    cfg = make_config(federation(), N, D)
    with pytest.raises(ConfigError, match="deadlines_s must be 5"):
        dataclasses.replace(cfg, deadlines_s=(60, 60))
    with pytest.raises(ConfigError, match="deadlines_s must be 5"):
        dataclasses.replace(cfg, deadlines_s=(60, 0, 60, 60, 60))
    # the same bytes built by a dishonest coordinator: refused at decode, before anything
    good = cfg.encode()
    short = good.replace(
        struct.pack(">I", 5) + b"".join(struct.pack(">I", d) for d in cfg.deadlines_s),
        struct.pack(">I", 2) + struct.pack(">II", 60, 60),
    )
    assert short != good
    s = _session()
    with pytest.raises(ProtocolAbort) as exc:
        s.handle_offer(short, MODEL_SHA, now=NOW)
    assert exc.value.reason is AbortReason.CONFIG_REJECTED


def test_0_6_model_hash_mismatch() -> None:
    _offer_abort(AbortReason.MODEL_HASH_MISMATCH, model=bytes(32))


def test_0_7_second_masked_input_for_same_model() -> None:
    log = {MODEL_SHA: (SubmissionRecord(MODEL_SHA, 3, b"x" * 32),)}
    _offer_abort(
        AbortReason.REPLAY, SiloPolicy(0, max_masked_inputs_per_model=1, submission_log=log)
    )


def test_0_7_default_allows_three_inputs_per_model_then_replay() -> None:
    recs = tuple(SubmissionRecord(MODEL_SHA, r, bytes([r]) * 32) for r in (3, 4, 5))
    _offer_ok(SiloPolicy(0, submission_log={MODEL_SHA: recs[:2]}))
    exc = _offer_abort(AbortReason.REPLAY, SiloPolicy(0, submission_log={MODEL_SHA: recs}))
    assert "max_masked_inputs_per_model = 3" in exc.detail


def test_0_7_submission_log_keys_on_the_tensor_digest_not_the_file() -> None:
    tensors, other = b"T" * 32, b"U" * 32
    log = {tensors: (SubmissionRecord(tensors, 3, b"x" * 32),)}
    policy = SiloPolicy(0, max_masked_inputs_per_model=1, submission_log=log)
    # the same tensors re-serialised: a new file hash (the config's), the same tensor digest
    _offer_abort(AbortReason.REPLAY, policy, model_digest=tensors)
    s = _session(policy)
    s.handle_offer(make_config(federation(), N, D).encode(), MODEL_SHA, now=NOW, model_digest=other)
    assert s.stage is SiloStage.ADVERTISED


def test_0_7_records_keyed_by_the_file_hash_still_count() -> None:
    # a log written before tensor digests existed keys its records by the model file's SHA-256
    log = {MODEL_SHA: (SubmissionRecord(MODEL_SHA, 3, b"x" * 32),)}
    policy = SiloPolicy(0, max_masked_inputs_per_model=1, submission_log=log)
    _offer_abort(AbortReason.REPLAY, policy, model_digest=b"T" * 32)


# --- phase 0: the silo's own policy on what the coordinator declares ---------------------------


def test_0_2_round_id_jump_is_refused_and_not_persisted() -> None:
    for last, round_id in ((7, 7 + 10_001), (0, 2**64 - 1)):
        journal: list[JournalEntry] = []
        cfg = make_config(federation(), N, D, round_id=round_id)
        s = _session(SiloPolicy(last), journal=journal)
        with pytest.raises(ProtocolAbort) as exc:
            s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
        assert exc.value.reason is AbortReason.ROUND_ID_JUMP
        assert "[secagg] max_round_step" in exc.value.detail
        assert s._m1 == b"" and journal == []  # never journalled as accepted
    journal = []
    s = _session(SiloPolicy(7, max_round_step=5), journal=journal)
    s.handle_offer(make_config(federation(), N, D, round_id=12).encode(), MODEL_SHA, now=NOW)
    assert s.stage is SiloStage.ADVERTISED and journal == [RoundAccepted(12)]
    _offer_abort(AbortReason.ROUND_ID_JUMP, SiloPolicy(7, max_round_step=5), round_id=13)


def test_0_5_colluders_below_default_floor() -> None:
    # n = 5: the floor is 1; n_colluders = 0 would let two colluders unmask a victim
    exc = _offer_abort(AbortReason.COLLUSION_BELOW_POLICY, n_colluders=0, threshold=3)
    assert "n_colluders 0 is below this silo's floor 1" in exc.detail
    assert "[secagg] n_colluders_min" in exc.detail
    _offer_abort(AbortReason.COLLUSION_BELOW_POLICY, n=4, n_colluders=0, threshold=3)


def test_0_5_the_default_floor_follows_the_roster_not_the_round() -> None:
    """The federation pins 20 members, so the default floor is ⌊19/3⌋ = 6 however few silos a
    round invites: inviting 4 of 20 with n_colluders = 1 (t = 3) would let two colluders split
    the survivor views and unmask a victim in one session."""
    fed = federation()
    cfg = make_config(fed, 4, D, n_colluders=1, threshold=3)
    s = SiloSession(
        fed.silos[0],
        fed.trust,
        SiloPolicy(0),
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
    )
    with pytest.raises(ProtocolAbort) as exc:
        s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    assert exc.value.reason is AbortReason.COLLUSION_BELOW_POLICY
    assert "floor 6 for a federation of 20 members" in exc.value.detail


def test_0_5_colluders_floor_by_policy_and_default_for_three() -> None:
    _offer_ok(n=3, n_colluders=0, threshold=3)  # default floor ⌊(3 − 1)/3⌋ = 0
    _offer_abort(
        AbortReason.COLLUSION_BELOW_POLICY, SiloPolicy(0, n_colluders_min=2), n_colluders=1
    )
    _offer_ok(SiloPolicy(0, n_colluders_min=0), n_colluders=0, threshold=3)


def test_0_5_threshold_below_the_minimum_for_invited_is_refused_at_the_offer() -> None:
    # n = 5, n_colluders = 1: t must be >= ⌊(5 + 1)/2⌋ + 1 = 4; 3 passed the offer before
    exc = _offer_abort(AbortReason.THRESHOLD_VIOLATION, threshold=3)
    assert "outside [4, 5]" in exc.detail


def test_0_5_sparse_graph_with_share_threshold_one_is_refused() -> None:
    # the attack: k = 2, t_k = 1 makes every Shamir share the secret itself
    exc = _offer_abort(
        AbortReason.THRESHOLD_VIOLATION, n=10, graph=GraphKind.HARARY, graph_k=2, graph_t_k=1
    )
    assert "graph_t_k 1 is outside" in exc.detail


@pytest.mark.parametrize(
    ("k", "t_k", "reason"),
    [
        (10, 6, AbortReason.CONFIG_REJECTED),  # k > n − 1
        (6, 5, AbortReason.THRESHOLD_VIOLATION),  # below ⌊(7 + 3)/2⌋ + 1 = 6
        (6, 8, AbortReason.THRESHOLD_VIOLATION),  # more than the k + 1 share holders
        (2, 3, AbortReason.THRESHOLD_VIOLATION),  # 3 of 3, but 3 colluders fit in it: floor 4
    ],
)
def test_0_5_sparse_graph_parameters_out_of_range(k: int, t_k: int, reason: AbortReason) -> None:
    _offer_abort(reason, n=10, graph=GraphKind.HARARY, graph_k=k, graph_t_k=t_k)


def test_0_5_sparse_graph_floor_follows_t_floor() -> None:
    policy = SiloPolicy(0, t_floor=7, allow_sparse_graph=True)
    _offer_abort(
        AbortReason.THRESHOLD_VIOLATION,
        policy,
        n=10,
        graph=GraphKind.HARARY,
        graph_k=6,
        graph_t_k=6,
    )
    _offer_ok(policy, n=10, graph=GraphKind.HARARY, graph_k=6, graph_t_k=7)


def test_0_5_valid_sparse_graph_is_accepted_only_when_allowed() -> None:
    sparse_ok = SiloPolicy(0, allow_sparse_graph=True)
    _offer_ok(sparse_ok, n=10, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6)
    _offer_ok(sparse_ok, n=10, graph=GraphKind.HARARY, graph_k=8, graph_t_k=7)
    # off by default: a coordinator that restarts rounds can grind the ring around a victim
    exc = _offer_abort(
        AbortReason.CONFIG_REJECTED, n=10, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6
    )
    assert "allow_sparse_graph" in exc.detail


def test_0_5_sparse_graph_degree_must_exceed_the_colluders() -> None:
    sparse_ok = SiloPolicy(0, allow_sparse_graph=True)
    # k = n_colluders = 4 with t_k = 5 meets the neighbourhood floor, yet a victim's whole
    # neighbourhood may be colluders
    exc = _offer_abort(
        AbortReason.THRESHOLD_VIOLATION,
        sparse_ok,
        n=13,
        graph=GraphKind.HARARY,
        graph_k=4,
        graph_t_k=5,
        n_colluders=4,
        threshold=9,
    )
    assert "graph_k 4 must exceed n_colluders 4" in exc.detail


def test_2_4_sparse_graph_rechecked_at_the_key_list() -> None:
    """The M2 check: the same rule for n = |U1| while the graph is still sparse. It can only
    differ from the offer's if the policy did, so the test tightens t_floor between M1 and M2
    (t = 7 still meets it, t_k = 6 does not): no ShareKeys may leave."""
    fed = federation()
    cfg = make_config(fed, 10, D, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6)
    target = cfg.invited[0]
    sparse_ok = SiloPolicy(0, allow_sparse_graph=True)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), default_policy=sparse_ok)

    def tighten(sid: str, data: bytes) -> bytes:
        s = r.sessions[sid]
        if sid == target and isinstance(decode_message(data), KeyList):
            s.policy = dataclasses.replace(s.policy, t_floor=7)
        return data

    r.tamper = tighten
    r.run()
    assert r.aborts[target].reason is AbortReason.THRESHOLD_VIOLATION
    assert "graph_t_k 6" in r.aborts[target].detail
    sent = [decode_message(m) for m in r.sent[target]]
    assert len(sent) == 1 and isinstance(sent[0], SignedEnvelope)  # the Advertise only
    assert isinstance(decode_as(sent[0].payload, Advertise), Advertise)
    others = [m for sid, msgs in r.sent.items() if sid != target for m in msgs]
    assert sum(_is_share_keys(m) for m in others) == 9  # the check, not the round, stopped it


def _is_share_keys(raw: bytes) -> bool:
    msg = decode_message(raw)
    if not isinstance(msg, SignedEnvelope):
        return False
    try:
        decode_as(msg.payload, ShareKeys)
    except MalformedMessage:
        return False
    return True


def test_0_4_layout_not_the_silos_model() -> None:
    own = make_config(federation(), N, D).layout_sha256()
    policy = SiloPolicy(0, expected_layout_sha256=own)
    _offer_ok(policy)
    exc = _offer_abort(AbortReason.LAYOUT_MISMATCH, policy, layout=(TensorSpec("w", (D + 1,)),))
    assert f"d = {D + 1}" in exc.detail


def test_0_4_layout_declaring_2_pow_36_parameters_is_refused_before_allocation() -> None:
    own = make_config(federation(), N, D).layout_sha256()
    huge = (TensorSpec("w", (1 << 18, 1 << 18)),)
    _offer_abort(
        AbortReason.LAYOUT_MISMATCH,
        SiloPolicy(0, expected_layout_sha256=own),
        layout=huge,
        scale=1.0,
        clip_l2=1.0,
    )


@pytest.mark.parametrize(
    ("params", "why"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b'{"epochs": 1}', "not in canonical form"),
        (b'{"b":1,"a":2}', "not in canonical form"),
        (b'{"opt":{"lr":1}}', "no nesting"),
        (b'{"lr":null}', "no null"),
        (b'{"seed":3}', "training randomness"),
        (b'{"round":3}', "round number"),
        (b'{"epochs":1000000}', "[train_limits] epochs"),
        (b"[]", "must be a JSON object"),
    ],
)
def test_0_8_train_params_rejected(params: bytes, why: str) -> None:
    policy = SiloPolicy(0, train_limits={"epochs": 100})
    exc = _offer_abort(AbortReason.TRAIN_PARAMS_REJECTED, policy, train_params=params)
    assert why in exc.detail


def test_0_8_valid_train_params_are_handed_to_the_driver() -> None:
    params = b'{"epochs":3,"lr":0.01,"optimizer":"sgd","shuffle":true}'
    s = _offer_ok(SiloPolicy(0, train_limits={"epochs": 100, "lr": 1.0}), train_params=params)
    assert s.train_params == {"epochs": 3, "lr": 0.01, "optimizer": "sgd", "shuffle": True}


def test_round_with_train_params_on_a_sparse_graph_completes() -> None:
    fed = federation()
    cfg = make_config(
        fed, 10, D, graph=GraphKind.HARARY, graph_k=6, graph_t_k=6, train_params=b'{"epochs":2}'
    )
    policy = SiloPolicy(
        0,
        train_limits={"epochs": 5},
        expected_layout_sha256=cfg.layout_sha256(),
        allow_sparse_graph=True,
    )
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), default_policy=policy)
    rnd = r.run()
    assert rnd.result is not None and not r.aborts
    assert all(s.train_params == {"epochs": 2} for s in r.sessions.values())
    assert all(len(nb) == 6 for nb in r.sessions[cfg.invited[0]]._nbrs.values())  # sparse


def test_malformed_config_is_rejected() -> None:
    s = _session()
    with pytest.raises(ProtocolAbort) as exc:
        s.handle_offer(b"\x01garbage", MODEL_SHA, now=NOW)
    assert exc.value.reason is AbortReason.CONFIG_REJECTED


# --- tampering with coordinator messages -----------------------------------------------------

Edit = Callable[[Message], Message]


def _run_tampered(
    kind: type, edit: Edit, target_k: int = 0, n: int = N, **over: object
) -> tuple[Round, str]:
    fed = federation()
    cfg = make_config(fed, n, D, **over)
    target = cfg.invited[target_k]

    def tamper(sid: str, data: bytes) -> bytes:
        msg = decode_message(data)
        if sid == target and isinstance(msg, kind):
            return encode_message(edit(msg))
        return data

    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), tamper=tamper)
    r.run()
    return r, target


def _expect(kind: type, edit: Edit, reason: AbortReason, **kw: object) -> Round:
    r, target = _run_tampered(kind, edit, **kw)
    assert target in r.aborts, f"no abort; stage {r.sessions[target].stage}"
    assert r.aborts[target].reason is reason
    s = r.sessions[target]
    assert s.stage is SiloStage.ABORTED and s._b_u is None and not s._shares
    return r


def _forge(identity: SiloIdentity, ad: Advertise) -> bytes:
    return encode_message(identity.seal(b"advertise", encode_message(ad)))


def _advert(raw: bytes) -> Advertise:
    return decode_as(decode_as(raw, SignedEnvelope).payload, Advertise)


def test_2_1_substituted_key_signed_by_non_roster_cert() -> None:
    outsider = federation().outsider

    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        ad = _advert(m.entries[1])
        fake = SiloIdentity(ad.silo_id, outsider.signing_key, outsider.cert_chain_der)  # type: ignore[arg-type]
        forged = _forge(fake, dataclasses.replace(ad, s_pk=os.urandom(32)))
        return dataclasses.replace(m, entries=(m.entries[0], forged, *m.entries[2:]))

    _expect(KeyList, edit, AbortReason.SIGNATURE_INVALID)


def test_2_1_replayed_key_list_from_earlier_round() -> None:
    fed = federation()
    old = make_config(fed, N, D, round_id=3)
    r_old = Round(fed, old, exact_inputs(old, np.random.default_rng(0)))
    captured: list[bytes] = []
    r_old.tamper = lambda sid, data: captured.append(data) or data  # type: ignore[func-returns-value]
    r_old.run()
    old_m2 = next(d for d in captured if isinstance(decode_message(d), KeyList))
    _expect(KeyList, lambda m: decode_message(old_m2), AbortReason.REPLAY)


def test_2_2_own_entry_altered() -> None:
    fed = federation()

    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        ad = _advert(m.entries[0])
        forged = _forge(fed.silos[0], dataclasses.replace(ad, c_pk=os.urandom(32)))
        return dataclasses.replace(m, entries=(forged, *m.entries[1:]))

    _expect(KeyList, edit, AbortReason.SET_INCONSISTENT)


def test_2_2_entries_not_sorted() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        return dataclasses.replace(m, entries=tuple(reversed(m.entries)))

    _expect(KeyList, edit, AbortReason.SET_INCONSISTENT)


def test_2_3_duplicate_keys_from_key_copy() -> None:
    fed = federation()

    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        mine, other = _advert(m.entries[0]), _advert(m.entries[1])
        # a colluding silo advertises a copy of the target's mask key
        copy = _forge(fed.silos[1], dataclasses.replace(other, s_pk=mine.s_pk))
        return dataclasses.replace(m, entries=(m.entries[0], copy, *m.entries[2:]))

    _expect(KeyList, edit, AbortReason.DUPLICATE_KEYS)


def test_2_7_low_order_x25519_key() -> None:
    fed = federation()

    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        other = _advert(m.entries[1])
        bad = _forge(fed.silos[1], dataclasses.replace(other, c_pk=bytes(32)))
        return dataclasses.replace(m, entries=(m.entries[0], bad, *m.entries[2:]))

    _expect(KeyList, edit, AbortReason.BAD_KEY)


def test_2_4_too_few_silos_for_threshold() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, KeyList)
        return dataclasses.replace(m, entries=m.entries[:3])  # n = 3 < t = 4

    _expect(KeyList, edit, AbortReason.THRESHOLD_VIOLATION, n=6)


def test_3_1_u2_below_threshold() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        return dataclasses.replace(m, u2=m.u2[:2], cts=m.cts[:1])

    _expect(SharesForYou, edit, AbortReason.THRESHOLD_VIOLATION)


def test_3_1_u2_not_subset_of_u1() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        return dataclasses.replace(m, u2=(*m.u2, 99))

    _expect(SharesForYou, edit, AbortReason.SET_INCONSISTENT)


def test_3_2_missing_ciphertext() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        return dataclasses.replace(m, cts=m.cts[1:])

    _expect(SharesForYou, edit, AbortReason.SET_INCONSISTENT)


def test_3_3_tampered_ciphertext() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        v, ct = m.cts[0]
        bad = ct[:-1] + bytes([ct[-1] ^ 1])
        return dataclasses.replace(m, cts=((v, bad), *m.cts[1:]))

    _expect(SharesForYou, edit, AbortReason.DECRYPT_FAILED)


def test_3_3_ciphertext_moved_to_another_sender() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        (v1, c1), (v2, c2) = m.cts[0], m.cts[1]
        return dataclasses.replace(m, cts=((v1, c2), (v2, c1), *m.cts[2:]))

    _expect(SharesForYou, edit, AbortReason.DECRYPT_FAILED)


def test_4_1_u3_not_subset_of_u2() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SurvivorList)
        return dataclasses.replace(m, u2=m.u2[1:], u3=m.u3)

    _expect(SurvivorList, edit, AbortReason.SET_INCONSISTENT)


def test_4_1_u3_has_outsider_index() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SurvivorList)
        return dataclasses.replace(m, u3=(*m.u3, 42))

    _expect(SurvivorList, edit, AbortReason.SET_INCONSISTENT)


def test_4_1_only_two_survivors() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SurvivorList)
        return dataclasses.replace(m, u3=m.u3[:2])

    _expect(SurvivorList, edit, AbortReason.THRESHOLD_VIOLATION, threshold=3, n=4)


def test_4_3_retry_with_different_survivors() -> None:
    fed = federation()
    cfg = make_config(fed, N, D)
    target = cfg.invited[0]
    earlier = SubmissionRecord(MODEL_SHA, 2, b"y" * 32, frozenset(cfg.invited[:3]))
    policy = SiloPolicy(0, max_masked_inputs_per_model=2, submission_log={MODEL_SHA: (earlier,)})
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), policies={target: policy})
    r.run()
    assert r.aborts[target].reason is AbortReason.CONSISTENCY_FAILED


def test_5_1_different_digest_in_one_signature() -> None:
    fed = federation()

    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet)
        env = decode_as(m.sigs[1], SignedEnvelope)
        c = decode_as(env.payload, Consistency)
        signer = next(s for s in fed.silos if s.cert_chain_der == env.cert_chain)
        other = signer.seal(
            b"consistency", encode_message(dataclasses.replace(c, digest=bytes(32)))
        )
        return dataclasses.replace(m, sigs=(m.sigs[0], encode_message(other), *m.sigs[2:]))

    _expect(ConsistencySet, edit, AbortReason.CONSISTENCY_FAILED)


def test_5_1_forged_consistency_signature() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet)
        env = decode_as(m.sigs[1], SignedEnvelope)
        bad = dataclasses.replace(env, signature=env.signature[:-2] + b"\x00\x00")
        return dataclasses.replace(m, sigs=(m.sigs[0], encode_message(bad), *m.sigs[2:]))

    _expect(ConsistencySet, edit, AbortReason.SIGNATURE_INVALID)


def test_5_1_too_few_signatures() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet)
        return dataclasses.replace(m, sigs=m.sigs[:2])

    _expect(ConsistencySet, edit, AbortReason.THRESHOLD_VIOLATION)


def test_5_1_envelopes_after_t_signers_are_not_read() -> None:
    # t valid signatures on the silo's own D settle 5.1; what follows them is never parsed or
    # verified, so junk there changes nothing (and costs no signature check).
    t = make_config(federation(), N, D).threshold

    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet) and len(m.sigs) > t
        return dataclasses.replace(m, sigs=(*m.sigs[:t], b"not an envelope", *m.sigs[t + 1 :]))

    r, target = _run_tampered(ConsistencySet, edit)
    assert target not in r.aborts
    assert r.sessions[target].stage is SiloStage.COMPLETED


def test_5_1_junk_before_the_t_th_signer_aborts() -> None:
    t = make_config(federation(), N, D).threshold

    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet)
        return dataclasses.replace(m, sigs=(*m.sigs[: t - 1], b"not an envelope", *m.sigs[t:]))

    _expect(ConsistencySet, edit, AbortReason.SIGNATURE_INVALID)


def test_5_1_repeated_signer() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, ConsistencySet)
        return dataclasses.replace(m, sigs=(m.sigs[0], *m.sigs[:-1]))

    _expect(ConsistencySet, edit, AbortReason.CONSISTENCY_FAILED)


def test_5_2_second_unmask_request() -> None:
    fed = federation()
    cfg = make_config(fed, N, D)
    target = cfg.invited[0]
    seen: list[bytes] = []

    def tamper(sid: str, data: bytes) -> bytes:
        if sid == target and isinstance(decode_message(data), ConsistencySet):
            seen.append(data)
        return data

    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), tamper=tamper)
    r.run()
    s = r.sessions[target]
    assert seen and s.stage is SiloStage.COMPLETED
    s.stage = SiloStage.UNMASKED  # as if M10 never came; the coordinator asks again
    with pytest.raises(ProtocolAbort) as exc:
        s.handle(seen[0], now=NOW)
    assert exc.value.reason is AbortReason.ALREADY_UNMASKED


def test_message_out_of_order_is_replay() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SharesForYou)
        return SurvivorList(m.session_id, m.u2, m.u2)

    _expect(SharesForYou, edit, AbortReason.REPLAY)


def test_message_for_another_session_is_replay() -> None:
    def edit(m: Message) -> Message:
        assert isinstance(m, SurvivorList)
        return dataclasses.replace(m, session_id=bytes(32))

    _expect(SurvivorList, edit, AbortReason.REPLAY)


def test_aborted_session_answers_nothing() -> None:
    s = _session()
    cfg = make_config(federation(), N, D)
    with pytest.raises(ProtocolAbort):
        s.handle_offer(cfg.encode(), bytes(32), now=NOW)
    assert s.handle(encode_message(KeyList(cfg.digest(), 7, ())), now=NOW) == []


def test_timeout_before_upload_aborts_after_upload_waits() -> None:
    s = _session()
    cfg = make_config(federation(), N, D)
    s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    with pytest.raises(ProtocolAbort) as exc:
        s.deadline_passed()
    assert exc.value.reason is AbortReason.TIMEOUT and s.stage is SiloStage.ABORTED
    r = Round(federation(), cfg, exact_inputs(cfg, np.random.default_rng(0)))
    from secagg.coordinator import Phase

    r.run(stop_at=Phase.CONSISTENCY)
    waiting = r.sessions[cfg.invited[0]]
    assert waiting.stage is SiloStage.MASKED_SENT
    waiting.deadline_passed()  # input committed: keep waiting for M6/M8
    assert waiting.stage is SiloStage.MASKED_SENT
    with pytest.raises(ProtocolAbort):
        waiting.deadline_passed(round_over=True)
    assert waiting.stage is SiloStage.ABORTED


def test_a_nan_noise_multiplier_is_not_a_config() -> None:
    """Review finding: NaN passed every `<` comparison of the DP checks."""
    cfg = make_config(federation(), N, D, dp=DdgNoise(1.0, 1), scale=2.0**8, clip_l2=1.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dataclasses.replace(cfg, dp=DdgNoise(float("nan"), 1))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dataclasses.replace(cfg, dp=DdgNoise(float("inf"), 1))

"""Coordinator-as-adversary (docs/secagg-protocol.md §7): key substitution, the alive/dead split
with colluding silos, and different models for different silos. No honest silo releases both share
types for one silo, none signs two digests, and the adversary never recovers an input."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest

from secagg import primitives, shamir
from secagg.coordinator import Phase
from secagg.errors import AbortReason, ProtocolAbort
from secagg.messages import (
    Consistency,
    ConsistencySet,
    KeyList,
    SignedEnvelope,
    SurvivorList,
    UnmaskShares,
    decode_as,
    encode_message,
)
from secagg.silo import SiloPolicy, SiloSession, SiloStage
from secagg.transcript import consistency_digest
from tests.secagg.harness import MODEL_SHA, Round, exact_inputs, make_config, round_floor
from tests.secagg.pki import NOW, federation


def test_mitm_key_substitution_with_ca_issued_cert_is_caught_by_roster_pin() -> None:
    """The operator also runs the CA: it issues a new cert for s01 and signs its own keys."""
    fed = federation()
    cfg = make_config(fed, 5, 16)
    fake_s01 = fed.issue("s01")  # same silo id, CA-valid, but not the pinned key

    def tamper(sid: str, data: bytes) -> bytes:
        try:
            m = decode_as(data, KeyList)
        except Exception:
            return data
        env = decode_as(m.entries[1], SignedEnvelope)
        forged = fake_s01.seal(b"advertise", env.payload)  # substituted signer, same keys
        return encode_message(
            dataclasses.replace(m, entries=(m.entries[0], encode_message(forged), *m.entries[2:]))
        )

    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), tamper=tamper)
    r.run()
    assert {s.reason for s in r.aborts.values()} == {AbortReason.SIGNATURE_INVALID}
    assert all(s.stage is SiloStage.ABORTED for s in r.sessions.values())


@pytest.mark.parametrize("camp_a_size", [2, 3, 4])
def test_alive_dead_split_with_colluders_never_yields_both_shares(camp_a_size: int) -> None:
    fed = federation()
    n = 8
    cfg = make_config(fed, n, 32)  # n_C = 2, t = 6
    assert cfg.threshold == 6
    inputs = exact_inputs(cfg, np.random.default_rng(1))
    r = Round(fed, cfg, inputs)
    rnd = r.run(stop_at=Phase.CONSISTENCY)  # honest up to M5; the adversary takes over at M6
    ids = list(cfg.invited)
    colluders, honest = ids[:2], ids[2:]
    target = honest[0]
    camp_a, camp_b = honest[:camp_a_size], honest[camp_a_size:]
    idx = {sid: r.sessions[sid].index for sid in ids}
    u2 = tuple(sorted(idx.values()))
    u3_alive, u3_dead = u2, tuple(i for i in u2 if i != idx[target])
    sid0 = rnd.session_id
    d_of = {
        u3: consistency_digest(sid0, cfg.digest(), MODEL_SHA, u2, u3) for u3 in (u3_alive, u3_dead)
    }
    signatures: dict[tuple[int, ...], list[bytes]] = {u3_alive: [], u3_dead: []}
    signed_by: dict[str, list[bytes]] = {}
    camps = [(camp_a, u3_alive), (camp_b, u3_dead)]
    for camp, u3 in camps:
        for sid in camp:
            s = r.sessions[sid]
            for reply in s.handle(encode_message(SurvivorList(sid0, u2, u3)), now=NOW):
                signatures[u3].append(reply)
                env = decode_as(reply, SignedEnvelope)
                signed_by.setdefault(sid, []).append(decode_as(env.payload, Consistency).digest)
    # colluders sign both digests with their real keys
    by_id = {s.silo_id: s for s in fed.silos}
    for c in colluders:
        for u3, digest in d_of.items():
            payload = encode_message(Consistency(sid0, idx[c], digest))
            signatures[u3].append(encode_message(by_id[c].seal(b"consistency", payload)))
    assert all(len(set(ds)) == 1 for ds in signed_by.values())  # never two digests
    released: dict[str, UnmaskShares] = {}
    for camp, u3 in camps:
        for sid in camp:
            s = r.sessions[sid]
            if s.stage is not SiloStage.SIGNED:
                continue
            try:
                out = s.handle(encode_message(ConsistencySet(sid0, tuple(signatures[u3]))), now=NOW)
            except ProtocolAbort as exc:
                assert exc.reason is AbortReason.THRESHOLD_VIOLATION
                continue
            released[sid] = decode_as(out[0], UnmaskShares)
    v = idx[target]
    b_shares = {m.index: dict(m.b_shares)[v] for m in released.values() if v in dict(m.b_shares)}
    s_shares = {m.index: dict(m.s_shares)[v] for m in released.values() if v in dict(m.s_shares)}
    assert not (set(b_shares) & set(s_shares))  # no honest silo released both for v
    # the colluders' own shares of v are the adversary's too
    for c in colluders:
        held = r.sessions[c]._shares.get(v)
        if held:
            s_shares[idx[c]], b_shares[idx[c]] = held
    t = cfg.threshold
    can_b, can_s = len(b_shares) >= t, len(s_shares) >= t
    assert not (can_b and can_s)
    if camp_a_size == 4:  # camp A + colluders reach t: the attack got as far as it can
        assert len(released) == 4 and can_b
    # try the attack for real: unmask the target's upload with whatever is reconstructible
    y = r.uploads[target].copy()
    if can_b:
        b_v = shamir.reconstruct(dict(list(b_shares.items())[:t]))
        primitives.add_mask(y, primitives.k_self(b_v, sid0, v), -1)
    x_true = np.rint(inputs[target].astype(np.float64) * cfg.scale).astype(np.int64)
    assert not np.array_equal(y[1:].view(np.int32).astype(np.int64), x_true)


def test_second_survivor_list_is_refused_so_only_one_digest_is_signed() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 8)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(2)))
    rnd = r.run(stop_at=Phase.CONSISTENCY)
    s = r.sessions[cfg.invited[0]]
    u2 = tuple(range(1, 5))
    first = s.handle(encode_message(SurvivorList(rnd.session_id, u2, u2)), now=NOW)
    assert len(first) == 1
    with pytest.raises(ProtocolAbort) as exc:
        s.handle(encode_message(SurvivorList(rnd.session_id, u2, u2[:3])), now=NOW)
    assert exc.value.reason is AbortReason.REPLAY
    assert s.stage is SiloStage.ABORTED


def test_different_models_for_different_silos_never_reach_masking() -> None:
    fed = federation()
    cfg_a = make_config(fed, 6, 16)
    cfg_b = dataclasses.replace(cfg_a, model_sha256=hashlib.sha256(b"poisoned").digest())
    sessions = {
        s.silo_id: SiloSession(
            s,
            fed.trust,
            round_floor(SiloPolicy(0), 6),
            random_bytes=os.urandom,
            rng=np.random.default_rng(0),
        )
        for s in fed.silos[:6]
    }
    m1 = {}
    for k, (sid, s) in enumerate(sorted(sessions.items())):
        cfg = cfg_a if k < 3 else cfg_b
        m1[sid] = (cfg, s.handle_offer(cfg.encode(), cfg.model_sha256, now=NOW))
    entries = tuple(env for _, (_, env) in sorted(m1.items()))
    for sid, s in sessions.items():
        cfg = m1[sid][0]
        # variant 1: one key list mixing both models; variant 2 would be one list per camp
        with pytest.raises(ProtocolAbort) as exc:
            s.handle(encode_message(KeyList(cfg.digest(), cfg.round_id, entries)), now=NOW)
        assert exc.value.reason is AbortReason.REPLAY
    camp = {sid: s for sid, s in sorted(sessions.items())[:3]}
    fresh = {
        sid: SiloSession(
            next(x for x in fed.silos if x.silo_id == sid),
            fed.trust,
            round_floor(SiloPolicy(0), 6),
            random_bytes=os.urandom,
            rng=np.random.default_rng(0),
        )
        for sid in camp
    }
    own = {sid: s.handle_offer(cfg_a.encode(), MODEL_SHA, now=NOW) for sid, s in fresh.items()}
    for s in fresh.values():
        with pytest.raises(ProtocolAbort) as exc:
            s.handle(
                encode_message(
                    KeyList(cfg_a.digest(), cfg_a.round_id, tuple(own[k] for k in sorted(own)))
                ),
                now=NOW,
            )
        assert exc.value.reason is AbortReason.THRESHOLD_VIOLATION  # camp of 3 < t = 4

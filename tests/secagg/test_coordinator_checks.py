"""The coordinator's own checks (docs/secagg-protocol.md §5 steps 1.2, 2.11, 3.8, 5.5): invalid
input from one silo is ignored and recorded, never added, never allowed to unmask a silo."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from secagg.coordinator import CoordinatorRound, Phase
from secagg.messages import (
    SIG_MASKED,
    Advertise,
    UnmaskShares,
    decode_as,
    encode_message,
    masked_header_of,
)
from secagg.silo import SiloPolicy
from secagg.trust import MAX_CERTIFICATE_BYTES
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import NOW, federation


def _advertise(cfg_digest: bytes, round_id: int, k: int) -> bytes:
    s = federation().silos[k]
    ad = Advertise(cfg_digest, round_id, s.silo_id, os.urandom(32), os.urandom(32))
    return encode_message(s.seal(b"advertise", encode_message(ad)))


def test_advertise_from_another_peer_or_twice_is_excluded() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 8)
    rnd = CoordinatorRound(cfg, fed.trust, now=NOW)
    m = _advertise(cfg.digest(), cfg.round_id, 0)
    assert rnd.handle(fed.silos[1].silo_id, m, now=NOW) == []  # names s00, sent by s01
    assert rnd.rejected[-1].silo_id == fed.silos[1].silo_id
    rnd.handle(fed.silos[0].silo_id, m, now=NOW)
    rnd.handle(fed.silos[0].silo_id, _advertise(cfg.digest(), cfg.round_id, 0), now=NOW)
    for k in (1, 2, 3):
        rnd.handle(fed.silos[k].silo_id, _advertise(cfg.digest(), cfg.round_id, k), now=NOW)
    assert fed.silos[0].silo_id not in rnd.participants["U1"]
    assert len(rnd.participants["U1"]) == 3


def test_an_advertise_carrying_an_oversized_chain_is_excluded_and_the_round_goes_on() -> None:
    """The envelope's signature does not cover its chain: a member that appends a large
    certificate to its Advertise would have the coordinator relay it to every silo in the
    KeyList (and one large enough would push the KeyList past gRPC's message limit)."""
    fed = federation()
    cfg = make_config(fed, 4, 8)
    rnd = CoordinatorRound(cfg, fed.trust, now=NOW)
    hostile = fed.silos[0]
    ad = Advertise(cfg.digest(), cfg.round_id, hostile.silo_id, os.urandom(32), os.urandom(32))
    env = hostile.seal(b"advertise", encode_message(ad))
    padded = dataclasses.replace(
        env, cert_chain=(*env.cert_chain, bytes(MAX_CERTIFICATE_BYTES + 1))
    )
    assert rnd.handle(hostile.silo_id, encode_message(padded), now=NOW) == []
    assert rnd.rejected[-1].silo_id == hostile.silo_id
    sends = []
    for k in (1, 2, 3):
        sends += rnd.handle(
            fed.silos[k].silo_id, _advertise(cfg.digest(), cfg.round_id, k), now=NOW
        )
    sends += rnd.deadline_passed(NOW)  # the hostile silo never answered validly
    assert rnd.phase is Phase.SHARE_KEYS
    assert rnd.participants["U1"] == tuple(s.silo_id for s in fed.silos[1:4])
    assert {to for to, _ in sends} == {s.silo_id for s in fed.silos[1:4]}  # the KeyList went out


def test_shared_keys_exclude_both_silos() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 8)
    rnd = CoordinatorRound(cfg, fed.trust, now=NOW)
    same = os.urandom(32)
    for k in range(5):
        s = fed.silos[k]
        c = same if k in (0, 1) else os.urandom(32)
        ad = Advertise(cfg.digest(), cfg.round_id, s.silo_id, c, os.urandom(32))
        rnd.handle(s.silo_id, encode_message(s.seal(b"advertise", encode_message(ad))), now=NOW)
    assert rnd.participants["U1"] == tuple(s.silo_id for s in fed.silos[2:5])


def test_masked_vector_with_wrong_hash_is_not_added() -> None:
    fed = federation()
    cfg = make_config(fed, 4, 100)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)))
    rnd = r.run(stop_at=Phase.MASKED)
    sid = cfg.invited[0]
    s = r.sessions[sid]
    for dest, data in r.pending:
        if dest == sid:
            s.handle(data, now=NOW)
    up = s.submit_update(exact_inputs(cfg, np.random.default_rng(1))[sid], 1)
    tampered = up.vector.copy()
    tampered[5] += 1
    assert rnd.add_masked_vector(sid, up.header, tampered) == []
    assert "hash" in rnd.rejected[-1].why
    # the header is signed: a wrong field re-signed by the silo itself, the genuine header
    # unsigned, and the genuine header signed by another silo are all refused
    h = masked_header_of(up.header)
    assert h is not None
    identity = next(x for x in fed.silos if x.silo_id == sid)
    other = next(x for x in fed.silos if x.silo_id == cfg.invited[1])
    payload = encode_message(h)
    wrong_index = dataclasses.replace(h, index=h.index % 4 + 1)
    for bad_header, why in (
        (encode_message(identity.seal(SIG_MASKED, encode_message(wrong_index))), "fields"),
        (payload, "unsigned"),
        (encode_message(other.seal(SIG_MASKED, payload)), "unsigned"),
        (encode_message(identity.seal(b"sharekeys", payload)), "unsigned"),
    ):
        rnd.add_masked_vector(sid, bad_header, up.vector)
        assert why in rnd.rejected[-1].why
    n_rejected = len(rnd.rejected)
    rnd.add_masked_vector(sid, up.header, up.vector)  # the genuine one is accepted
    assert len(rnd.rejected) == n_rejected


def test_unmask_listing_a_silo_in_both_lists_is_ignored() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 16, n_colluders=0, threshold=3)
    dropped = cfg.invited[4]
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        drop_at={dropped: "masked"},
        default_policy=SiloPolicy(0, n_colluders_min=0),  # t = 3 of 5 assumes no colluder
    )
    evil = cfg.invited[0]
    rnd = r.run(stop_at=Phase.UNMASK)
    sends = list(r.pending)
    for dest, data in sends:
        out = r.sessions[dest].handle(data, now=NOW)
        m = decode_as(out[0], UnmaskShares)
        if dest == evil:  # claims the dropped silo 5 as both alive and dead
            m = dataclasses.replace(m, b_shares=(*m.b_shares, (5, m.s_shares[0][1])))
        rnd.handle(dest, encode_message(m), now=NOW)
    assert any("both" in x.why for x in rnd.rejected)
    assert rnd.unmask_ready
    rnd.finish()  # the driver's unmask
    assert rnd.phase is Phase.DONE  # the honest four were enough (t = 3)
    assert rnd.result is not None and len(rnd.result.survivors) == 4

"""The blame step: a silo that sends an out-of-range weight element is named with evidence every
silo checks, honest silos can never be named, and the same-model retry without the named silo
goes ahead (with the evidence) while nothing else about the retry rule loosens."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg import shamir
from secagg.blame import InvalidBlame, decoded_weight, make_blame, verify_blame
from secagg.config import RoundConfig, Weighting
from secagg.coordinator import CoordinatorRound, Phase
from secagg.errors import AbortReason, MalformedMessage, ProtocolAbort
from secagg.identity import SiloId
from secagg.messages import (
    SIG_MASKED,
    SIG_SHAREKEYS,
    Blame,
    MaskedHeader,
    ShareKeys,
    SignedEnvelope,
    UnmaskShares,
    decode_as,
    decode_message,
    encode_message,
    masked_header_of,
)
from secagg.primitives import commit_b, k_self, prg, sha256_array
from secagg.silo import (
    ExclusionRecorded,
    JournalEntry,
    MaskedInputRecorded,
    MaskedUpload,
    SiloPolicy,
    SiloSession,
    SiloStage,
    SubmissionRecord,
    SurvivorsRecorded,
)
from secagg.trust import SiloIdentity
from silo_agent.storage.silo_state import STATE_FILENAME, SiloStateStore
from tests.secagg.harness import MODEL_SHA, Round, exact_inputs, make_config, round_floor
from tests.secagg.pki import NOW, federation

N, D = 5, 32
TENSORS = b"T" * 32  # the drivers' digest of the model's tensors
S_W = 1 << 16  # the configs' weight scale


def _identity(sid: str) -> SiloIdentity:
    return next(s for s in federation().silos if s.silo_id == sid)


def _signed_header(identity: SiloIdentity, header: MaskedHeader) -> bytes:
    return encode_message(identity.seal(SIG_MASKED, encode_message(header)))


def _cheat(
    sid: str, add: int, *, sign_new_weight: bool = True
) -> Callable[[MaskedUpload], MaskedUpload]:
    """A patched agent: adds `add` to element 0 after masking and signs a header for the vector
    it sends (with the new element 0, or, `sign_new_weight=False`, with the old one)."""

    def corrupt(up: MaskedUpload) -> MaskedUpload:
        y = up.vector.copy()
        bits = y.dtype.itemsize * 8
        old = int(y[0])
        y[0] = (old + add) % (1 << bits)
        h = masked_header_of(up.header)
        assert h is not None
        weight = int(y[0]) if sign_new_weight else old
        h = dataclasses.replace(h, vector_sha256=sha256_array(y), weight_element=weight)
        return MaskedUpload(_signed_header(_identity(sid), h), y)

    return corrupt


def _share_keys_envelope(r: Round, sid: str) -> bytes:
    for raw in r.sent[sid]:
        msg = decode_message(raw)
        if isinstance(msg, SignedEnvelope):
            try:
                decode_as(msg.payload, ShareKeys)
            except MalformedMessage:
                continue
            return raw
    raise AssertionError(f"{sid} sent no ShareKeys")


def _revealed_b(r: Round, sid: str) -> bytes:
    """sid's self-mask seed, reconstructed from the b-shares the silos released at unmasking
    (what the coordinator learns), checked against sid's own commitment."""
    v = r.sessions[sid].index
    shares: dict[int, bytes] = {}
    for msgs in r.sent.values():
        for raw in msgs:
            m = decode_message(raw)
            if isinstance(m, UnmaskShares) and v in dict(m.b_shares):
                shares[m.index] = dict(m.b_shares)[v]
    t = r.config.threshold
    assert len(shares) >= t
    b = shamir.reconstruct(dict(sorted(shares.items())[:t]))
    sk = decode_as(decode_as(_share_keys_envelope(r, sid), SignedEnvelope).payload, ShareKeys)
    assert commit_b(sk.session_id, v, b) == sk.commit_b
    return b


def _round(
    cfg: RoundConfig, cheats: dict[str, int] | None = None, seed: int = 0, **kw: object
) -> Round:
    r = Round(
        federation(),
        cfg,
        exact_inputs(cfg, np.random.default_rng(seed)),
        corrupt_upload={sid: _cheat(sid, add) for sid, add in (cheats or {}).items()},
        seed=seed,
        **kw,  # type: ignore[arg-type]
    )
    r.run()
    return r


# --- (a) the cheater is named, with evidence that verifies -----------------------------------


@pytest.mark.parametrize(
    ("weighting", "bits", "add"),
    [
        (Weighting.UNIFORM, 32, 1),
        (Weighting.UNIFORM, 64, -1),
        (Weighting.EXAMPLES, 32, 1 << 20),
        # q = -S_w/2: the weight sum 3.5·S_w alone would have passed the W check
        (Weighting.EXAMPLES, 64, -(3 * S_W // 2)),
    ],
)
def test_an_out_of_range_weight_aborts_the_round_and_names_its_sender(
    weighting: Weighting, bits: int, add: int
) -> None:
    fed = federation()
    cfg = make_config(fed, N, D, weighting=weighting, ring_bits=bits, weight_max=1)
    cheater = cfg.invited[2]
    r = _round(cfg, {cheater: add})
    rnd = r.coordinator
    assert rnd.phase is Phase.ABORTED and rnd.abort_reason is AbortReason.OVERFLOW_RULE
    assert set(rnd.blamed) == {cheater}
    evidence = rnd.blamed[SiloId(cheater)]
    verdict = verify_blame(evidence, fed.trust, NOW)
    assert verdict.silo_id == cheater and verdict.session_id == rnd.session_id
    assert verdict.weight == S_W + add  # honest q = S_w (one example, W_max = 1)
    # built from exactly what the cheater sent: its signed header and its signed ShareKeys
    blame = decode_as(evidence, Blame)
    assert blame.header_envelope == r.headers[cheater]
    assert blame.share_keys_envelope == _share_keys_envelope(r, cheater)
    assert blame.b_secret == _revealed_b(r, cheater)
    # every silo in U3 was told OVERFLOW_RULE
    for sid in cfg.invited:
        assert r.sessions[sid].abort_reason is AbortReason.OVERFLOW_RULE


def test_two_cheaters_are_both_named() -> None:
    fed = federation()
    cfg = make_config(fed, 7, D)
    cheaters = {cfg.invited[1]: 5, cfg.invited[5]: -S_W}
    rnd = _round(cfg, cheaters).coordinator
    assert rnd.abort_reason is AbortReason.OVERFLOW_RULE
    assert set(rnd.blamed) == set(cheaters)
    for sid, evidence in rnd.blamed.items():
        assert verify_blame(evidence, fed.trust, NOW).silo_id == sid


@pytest.mark.parametrize("seed", range(6))
def test_honest_rounds_are_never_blamed(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fed = federation()
    n = int(rng.integers(4, 9))
    weighting = Weighting.EXAMPLES if seed % 2 else Weighting.UNIFORM
    cfg = make_config(
        fed,
        n,
        int(rng.integers(1, 200)),
        ring_bits=int(rng.choice([32, 64])),
        weighting=weighting,
        weight_max=100,
        round_id=30 + seed,
    )
    examples = {sid: int(rng.integers(0, 250)) for sid in cfg.invited}
    examples[cfg.invited[0]] = 100  # W >= 1: at least one silo has a positive weight
    drop = {cfg.invited[-1]: "masked"} if seed >= 3 else {}
    r = _round(cfg, seed=seed, examples=examples, drop_at=drop)
    rnd = r.coordinator
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert rnd.blamed == {}
    assert rnd.result is not None
    survivors = len(rnd.result.survivors)
    if weighting is Weighting.UNIFORM:
        assert rnd.result.weight_sum == survivors * S_W
    else:  # each q = SR(S_w·min(n, 100)/100): within one of the exact weight
        exact = sum(S_W * min(examples[s], 100) / 100 for s in rnd.result.survivors)
        assert abs(rnd.result.weight_sum - exact) <= survivors


def test_every_weight_zero_aborts_without_blame() -> None:
    # honest silos with no examples: W = 0 fails the W check, and no silo is to blame
    cfg = make_config(federation(), N, D, weighting=Weighting.EXAMPLES, weight_max=10)
    rnd = _round(cfg, examples=dict.fromkeys(cfg.invited, 0)).coordinator
    assert rnd.abort_reason is AbortReason.OVERFLOW_RULE
    assert rnd.blamed == {}


# --- (b) evidence against an honest silo, or tampered evidence, is refused --------------------


def _blamed_round(round_id: int = 7) -> tuple[Round, str, str]:
    cfg = make_config(federation(), N, D, round_id=round_id)
    cheater, honest = cfg.invited[3], cfg.invited[1]
    r = _round(cfg, {cheater: 7})
    assert set(r.coordinator.blamed) == {cheater}
    return r, cheater, honest


def _resealed(raw: bytes, payload: bytes) -> bytes:
    """The envelope `raw` with another payload and its old signature and certificate."""
    env = decode_as(raw, SignedEnvelope)
    return encode_message(dataclasses.replace(env, payload=payload))


def test_evidence_against_an_honest_silo_cannot_be_built() -> None:
    fed = federation()
    r, cheater, honest = _blamed_round()
    header, share_keys, b = (
        r.headers[honest],
        _share_keys_envelope(r, honest),
        _revealed_b(r, honest),
    )
    # its genuine signed header and its genuine b: the weight is in range
    with pytest.raises(InvalidBlame, match="in range"):
        verify_blame(make_blame(honest, header, share_keys, b), fed.trust, NOW)
    # an out-of-range weight element in its header: the signature no longer holds
    h = decode_as(decode_as(header, SignedEnvelope).payload, MaskedHeader)
    forged = dataclasses.replace(h, weight_element=(h.weight_element + 9) % (1 << 32))
    forged_header = _resealed(header, encode_message(forged))
    with pytest.raises(InvalidBlame, match="masked envelope is not signed by"):
        verify_blame(make_blame(honest, forged_header, share_keys, b), fed.trust, NOW)
    # the forged header signed by another silo, still naming the honest one
    other = _signed_header(_identity(cheater), forged)
    with pytest.raises(InvalidBlame, match="masked envelope is not signed by"):
        verify_blame(make_blame(honest, other, share_keys, b), fed.trust, NOW)
    # a b that makes its genuine element 0 decode out of range: not the b it committed to
    bad_b = next(
        x
        for x in (os.urandom(32) for _ in range(50))
        if decoded_weight(h.weight_element, x, h.session_id, h.index, 32) != S_W
    )
    with pytest.raises(InvalidBlame, match="commitment"):
        verify_blame(make_blame(honest, header, share_keys, bad_b), fed.trust, NOW)


def test_tampered_cheater_evidence_is_refused() -> None:
    fed = federation()
    r, cheater, honest = _blamed_round()
    good = decode_as(r.coordinator.blamed[SiloId(cheater)], Blame)
    assert verify_blame(encode_message(good), fed.trust, NOW).silo_id == cheater  # the control

    def refused(why: str, **change: Any) -> None:
        with pytest.raises(InvalidBlame, match=why):
            verify_blame(encode_message(dataclasses.replace(good, **change)), fed.trust, NOW)

    h = decode_as(decode_as(good.header_envelope, SignedEnvelope).payload, MaskedHeader)
    tampered = _resealed(
        good.header_envelope,
        encode_message(dataclasses.replace(h, weight_element=h.weight_element + 1)),
    )
    refused("masked envelope is not signed by", header_envelope=tampered)
    refused("commitment", b_secret=os.urandom(32))
    refused("commitment", b_secret=good.b_secret[:31])
    refused("not signed by", silo_id=honest)  # the signer is not the silo named
    # the honest silo's ShareKeys (another index) with the cheater's header
    refused(
        "sharekeys envelope is not signed by", share_keys_envelope=_share_keys_envelope(r, honest)
    )
    refused("does not decode", header_envelope=b"junk")
    with pytest.raises(InvalidBlame, match="does not decode"):
        verify_blame(good.header_envelope, fed.trust, NOW)  # not a Blame at all


def test_header_and_share_keys_from_different_sessions_are_refused() -> None:
    fed = federation()
    r1, cheater, _ = _blamed_round(round_id=7)
    r2, cheater2, _ = _blamed_round(round_id=8)
    assert cheater == cheater2
    e1 = decode_as(r1.coordinator.blamed[SiloId(cheater)], Blame)
    e2 = decode_as(r2.coordinator.blamed[SiloId(cheater)], Blame)
    for e in (e1, e2):  # each verifies on its own
        verify_blame(encode_message(e), fed.trust, NOW)
    mixed = dataclasses.replace(e1, share_keys_envelope=e2.share_keys_envelope)
    with pytest.raises(InvalidBlame, match="different sessions"):
        verify_blame(encode_message(mixed), fed.trust, NOW)
    with pytest.raises(InvalidBlame, match="commitment"):  # session 1's b, session 2's commitment
        verify_blame(encode_message(dataclasses.replace(e2, b_secret=e1.b_secret)), fed.trust, NOW)


# --- (c) element 0 must be the signed weight element ------------------------------------------


def test_a_vector_whose_element_0_is_not_the_signed_one_is_refused_at_upload() -> None:
    cfg = make_config(federation(), N, D)
    liar = cfg.invited[0]
    r = Round(
        federation(),
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        corrupt_upload={liar: _cheat(liar, 3, sign_new_weight=False)},
    )
    rnd = r.run()
    assert any(x.silo_id == liar and "element 0" in x.why for x in rnd.rejected)
    assert liar not in rnd.participants["U3"]
    assert rnd.phase is Phase.DONE and rnd.blamed == {}  # the other four sum as usual
    assert rnd.result is not None and rnd.result.weight_sum == 4 * S_W


# --- (d) the retry rule after a blamed abort --------------------------------------------------


def _records(r: Round, sid: str) -> tuple[SubmissionRecord, ...]:
    recs: dict[bytes, SubmissionRecord] = {}
    for e in r.journal[sid]:
        if isinstance(e, MaskedInputRecorded | SurvivorsRecorded | ExclusionRecorded):
            recs[e.record.session_id] = e.record
    return tuple(recs.values())


def _retry(a: Round, n: int, blame: tuple[bytes, ...]) -> Round:
    """The same model, a later round over the first `n` silos, the silos remembering `a`."""
    fed = federation()
    cfg = make_config(fed, n, D, round_id=a.config.round_id + 1)
    policies = {
        sid: SiloPolicy(a.config.round_id, submission_log={TENSORS: _records(a, sid)})
        for sid in cfg.invited
    }
    return _round(
        cfg,
        seed=1,
        policies=policies,
        blame=blame,
        model_digests=dict.fromkeys(cfg.invited, TENSORS),
    )


def _blamed_attempt() -> tuple[Round, str]:
    cfg = make_config(federation(), N, D, round_id=20)
    cheater = cfg.invited[N - 1]  # the retry over the first N - 1 silos leaves it out
    a = _round(cfg, {cheater: 1 << 20}, model_digests=dict.fromkeys(cfg.invited, TENSORS))
    assert set(a.coordinator.blamed) == {cheater}
    for sid in cfg.invited[: N - 1]:  # the honest silos had signed U3 (with the cheater)
        (rec,) = _records(a, sid)
        assert rec.survivors == frozenset(cfg.invited)
    return a, cheater


def test_a_retry_without_the_blamed_silo_completes_with_the_evidence() -> None:
    a, cheater = _blamed_attempt()
    b = _retry(a, N - 1, tuple(a.coordinator.blamed.values()))
    assert b.coordinator.phase is Phase.DONE, (b.coordinator.abort_reason, b.aborts)
    assert b.coordinator.result is not None
    assert set(b.coordinator.result.survivors) == set(a.config.invited) - {cheater}
    for sid in b.config.invited:
        (excl,) = [e for e in b.journal[sid] if isinstance(e, ExclusionRecorded)]
        assert excl.record.session_id == a.coordinator.session_id
        assert excl.record.excluded == {cheater}
        assert b.sessions[sid].blame_excluded == {cheater}
        assert b.sessions[sid].blame_ignored == 0


def test_a_retry_without_the_blamed_silo_is_refused_without_the_evidence() -> None:
    a, cheater = _blamed_attempt()
    honest = a.config.invited[0]
    forged = make_blame(
        honest, a.headers[honest], _share_keys_envelope(a, honest), _revealed_b(a, honest)
    )
    for blame in ((), (forged,), (b"junk",)):
        b = _retry(a, N - 1, blame)
        assert b.coordinator.phase is Phase.ABORTED
        assert {sid: e.reason for sid, e in b.aborts.items()} == dict.fromkeys(
            b.config.invited, AbortReason.CONSISTENCY_FAILED
        )
        assert all(s.blame_ignored == len(blame) for s in b.sessions.values())
        assert not any(isinstance(e, ExclusionRecorded) for j in b.journal.values() for e in j)


def test_the_evidence_does_not_let_the_blamed_silo_back_in() -> None:
    a, cheater = _blamed_attempt()
    b = _retry(a, N, tuple(a.coordinator.blamed.values()))  # the cheater invited again
    assert b.coordinator.phase is Phase.ABORTED
    for sid in a.config.invited[: N - 1]:
        assert b.aborts[sid].reason is AbortReason.CONSISTENCY_FAILED


def test_evidence_about_a_session_the_silo_was_not_in_is_ignored() -> None:
    a, cheater = _blamed_attempt()
    fed = federation()
    outsider = fed.silos[N]  # never took part in a
    journal: list[JournalEntry] = []
    s = SiloSession(
        outsider,
        fed.trust,
        round_floor(SiloPolicy(0), N),
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
        journal=journal.append,
    )
    cfg = make_config(fed, N + 1, D, round_id=21)
    s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW, blame=tuple(a.coordinator.blamed.values()))
    assert s.stage is SiloStage.ADVERTISED
    assert s.blame_ignored == 1 and s.blame_excluded == frozenset()
    assert not any(isinstance(e, ExclusionRecorded) for e in journal)


def test_the_exclusion_survives_a_restart(tmp_path: Path) -> None:
    fed = federation()
    digests = dict.fromkeys(make_config(fed, N, D).invited, TENSORS)
    a, cheater = _blamed_attempt()
    honest = a.config.invited[: N - 1]
    dirs = {sid: tmp_path / "kept" / sid.rsplit("/", 1)[-1] for sid in honest}
    # the honest silos' state as the agent persists it: round a's journal, through the store
    for sid in honest:
        store = SiloStateStore(dirs[sid])
        for e in a.journal[sid]:
            store.journal(e)

    def attempt(round_id: int, blame: tuple[bytes, ...], where: dict[str, Path]) -> Round:
        cfg = make_config(fed, N - 1, D, round_id=round_id)
        pols = {sid: SiloStateStore(where[sid]).state.policy(SiloPolicy(0)) for sid in honest}
        r = Round(
            fed,
            cfg,
            exact_inputs(cfg, np.random.default_rng(round_id)),
            policies=pols,
            blame=blame,
            model_digests=digests,
        )
        for sid, s in r.sessions.items():
            s._journal = SiloStateStore(where[sid]).journal  # the agent passes store.journal
        r.run()
        return r

    b = attempt(21, tuple(a.coordinator.blamed.values()), dirs)
    assert b.coordinator.phase is Phase.DONE
    stripped = {sid: tmp_path / "stripped" / d.name for sid, d in dirs.items()}
    for sid in honest:
        obj = json.loads((dirs[sid] / STATE_FILENAME).read_text())
        by_session = {x["session_id"]: x for x in obj["submissions"]}
        assert by_session[a.coordinator.session_id.hex()]["excluded"] == [cheater]
        assert by_session[b.coordinator.session_id.hex()]["excluded"] == []
        for x in obj["submissions"]:
            x.pop("excluded")  # as a file written before exclusions existed
        stripped[sid].mkdir(parents=True)
        (stripped[sid] / STATE_FILENAME).write_text(json.dumps(obj))
    # a restarted silo, no evidence this time: the persisted exclusion still lets it in
    c = attempt(22, (), dirs)
    assert c.coordinator.phase is Phase.DONE, c.aborts
    # the control: the same state without the exclusion refuses the same retry
    d = attempt(22, (), stripped)
    assert d.coordinator.phase is Phase.ABORTED
    assert {sid: e.reason for sid, e in d.aborts.items()} == dict.fromkeys(
        honest, AbortReason.CONSISTENCY_FAILED
    )


# --- (e) element 0 carries the self-mask only; dropouts still unmask exactly ------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_a_dropout_after_m4_still_unmasks_the_exact_sum(bits: int) -> None:
    fed = federation()
    cfg = make_config(fed, 6, 300, ring_bits=bits, round_id=40)
    inputs = exact_inputs(cfg, np.random.default_rng(5))
    gone = cfg.invited[2]
    r = Round(fed, cfg, inputs, drop_at={gone: "masked"})  # shared keys, never uploaded
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert rnd.result is not None and rnd.result.ring_sum is not None
    survivors = [s for s in cfg.invited if s != gone]
    assert list(rnd.result.survivors) == survivors
    expected = sum(np.rint(inputs[s] * cfg.scale).astype(np.int64) for s in survivors)
    assert np.array_equal(rnd.result.ring_sum[1:].astype(np.int64), expected)
    assert int(rnd.result.ring_sum[0]) == len(survivors) * S_W
    # each upload: element 0 minus the self-mask is the weight; the rest is still masked
    for sid in survivors:
        v, y = r.sessions[sid].index, r.uploads[sid]
        self_mask = prg(k_self(_revealed_b(r, sid), rnd.session_id, v), cfg.length, bits)
        unmasked = y - self_mask
        assert int(unmasked[0]) == S_W
        own = np.rint(inputs[sid].astype(np.float64) * cfg.scale).astype(np.int64)
        assert not np.array_equal(unmasked[1:].astype(np.int64), own.astype(unmasked.dtype))


def test_precomputed_masks_leave_element_0_alone() -> None:
    cfg = make_config(federation(), N, D, weighting=Weighting.EXAMPLES, weight_max=4)
    inputs = exact_inputs(cfg, np.random.default_rng(3))
    r = Round(federation(), cfg, inputs, examples=dict.fromkeys(cfg.invited, 3))
    rnd = r.run(stop_at=Phase.MASKED)
    for dest, data in r.pending:
        r.sessions[dest].handle(data, now=NOW)
    sid = cfg.invited[1]
    s = r.sessions[sid]
    s.precompute_masks()  # as the agent does while training
    up = s.submit_update(inputs[sid], 3)
    h = masked_header_of(up.header)
    assert h is not None and h.weight_element == int(up.vector[0]) and not h.uniform
    assert rnd.add_masked_vector(sid, up.header, up.vector) == []
    assert not rnd.rejected


# --- (f) example weighting is the silo's choice -----------------------------------------------


def test_a_silo_may_refuse_example_weighted_rounds() -> None:
    fed = federation()
    examples = make_config(fed, N, D, weighting=Weighting.EXAMPLES, weight_max=10)
    uniform = make_config(fed, N, D)

    def offer(cfg: RoundConfig, allow: bool) -> SiloSession:
        s = SiloSession(
            fed.silos[0],
            fed.trust,
            round_floor(SiloPolicy(0, allow_example_weighting=allow), N),
            random_bytes=os.urandom,
            rng=np.random.default_rng(0),
        )
        s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
        return s

    with pytest.raises(ProtocolAbort) as exc:
        offer(examples, False)
    assert exc.value.reason is AbortReason.CONFIG_REJECTED
    assert "allow_example_weighting" in str(exc.value)
    assert offer(uniform, False).stage is SiloStage.ADVERTISED
    assert offer(examples, True).stage is SiloStage.ADVERTISED
    assert not SiloPolicy(0).allow_example_weighting  # the default: refuse


# --- messages -------------------------------------------------------------------------------


def test_blame_and_signed_header_messages_round_trip() -> None:
    b = Blame("spiffe://test/silo/s01", b"h" * 10, b"k" * 20, b"b" * 32)
    assert decode_message(encode_message(b)) == b
    h = MaskedHeader(b"\1" * 32, 2, 100, 64, b"\2" * 32, 2**64 - 1, S_W, True)
    raw = encode_message(h)
    assert decode_message(raw) == h
    signed = _signed_header(federation().silos[0], h)
    assert masked_header_of(signed) == h
    assert masked_header_of(raw) is None  # unsigned: not the frame
    env = federation().silos[0].seal(SIG_SHAREKEYS, encode_message(Blame("x", b"", b"", b"")))
    assert masked_header_of(encode_message(env)) is None  # an envelope of something else
    assert masked_header_of(b"junk") is None
    with pytest.raises(MalformedMessage, match="0 or 1"):
        decode_message(raw[:-1] + b"\x02")  # uniform is one canonical byte


def test_coordinator_refuses_a_header_for_another_weighting() -> None:
    fed = federation()
    cfg = make_config(fed, 4, D)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)))
    rnd: CoordinatorRound = r.run(stop_at=Phase.MASKED)
    sid = cfg.invited[0]
    for dest, data in r.pending:
        if dest == sid:
            r.sessions[sid].handle(data, now=NOW)
    up = r.sessions[sid].submit_update(r.inputs[sid], 1)
    h = masked_header_of(up.header)
    assert h is not None
    for bad in (
        dataclasses.replace(h, uniform=False),
        dataclasses.replace(h, weight_scale=S_W * 2),
    ):
        rnd.add_masked_vector(sid, _signed_header(_identity(sid), bad), up.vector)
        assert "fields" in rnd.rejected[-1].why
    n = len(rnd.rejected)
    rnd.add_masked_vector(sid, up.header, up.vector)
    assert len(rnd.rejected) == n  # the genuine header is accepted


def test_two_cheaters_in_a_row_are_both_left_out_of_the_next_retry() -> None:
    # C1 cheats in attempt A; C2 behaves in A and cheats in the retry B. The honest silos'
    # record of A still held C2: the proof against C2 (from B) must exclude it there too, or
    # the third attempt, without both, is refused and the model is stuck.
    fed = federation()
    n = 8
    cfg = make_config(fed, n, D, round_id=20)
    c1, c2 = cfg.invited[n - 1], cfg.invited[n - 2]
    a = _round(cfg, {c1: 1 << 20}, model_digests=dict.fromkeys(cfg.invited, TENSORS))
    assert a.coordinator.abort_reason is AbortReason.OVERFLOW_RULE
    assert set(a.coordinator.blamed) == {c1}

    def attempt(
        prev: Any, k: int, rid: int, cheats: dict[str, int], blame: tuple[bytes, ...]
    ) -> Any:
        c = make_config(fed, k, D, round_id=rid)
        pols = {
            s: SiloPolicy(prev.config.round_id, submission_log={TENSORS: _records(prev, s)})
            for s in c.invited
        }
        return _round(
            c, cheats, seed=rid, policies=pols, blame=blame,
            model_digests=dict.fromkeys(c.invited, TENSORS),
        )  # fmt: skip

    first = tuple(a.coordinator.blamed.values())
    b = attempt(a, n - 1, 21, {c2: 1 << 20}, first)
    assert set(b.coordinator.blamed) == {c2}
    c = attempt(b, n - 2, 22, {}, first + tuple(b.coordinator.blamed.values()))
    assert c.coordinator.phase is Phase.DONE, c.aborts
    assert not ({c1, c2} & set(c.coordinator.result.survivors))


def test_one_wrong_b_share_among_the_first_t_does_not_end_the_round() -> None:
    # A hostile survivor releases a corrupted b-share for an honest silo and its unmask
    # message is among the first t. The coordinator must neither blame the honest silo (its
    # seed is checked against the commitment before any weight is decoded) nor abort while
    # another share is still to come: a leave-one-out subset reconstructs, and the sum is exact.
    fed = federation()
    cfg = make_config(fed, N, D, round_id=20)
    hostile, victim = cfg.invited[0], cfg.invited[1]

    class WrongShare(Round):
        def _to_coord(self, sid: str, replies: list[bytes]) -> list[tuple[str, bytes]]:
            out = []
            for raw in replies:
                m = decode_message(raw)
                if sid == hostile and isinstance(m, UnmaskShares):
                    v = self.sessions[victim].index
                    bad = tuple(
                        (i, bytes([sh[0] ^ 1]) + sh[1:] if i == v else sh) for i, sh in m.b_shares
                    )
                    raw = encode_message(dataclasses.replace(m, b_shares=bad))
                out.append(raw)
            return super()._to_coord(sid, out)

    class Finishing(CoordinatorRound):
        """Records the state each driver `finish` leaves the round in."""

        after: list[tuple[Phase, bool]]

        def finish(self) -> list[tuple[SiloId, bytes]]:
            sends = super().finish()
            self.after = [*getattr(self, "after", []), (self.phase, self.unmask_ready)]
            return sends

    inputs = exact_inputs(cfg, np.random.default_rng(0))
    r = WrongShare(fed, cfg, inputs, model_digests=dict.fromkeys(cfg.invited, TENSORS))
    r.coordinator = Finishing(cfg, fed.trust, now=NOW, keep_ring_sum=True)
    rnd = r.run()
    assert cfg.threshold < N
    assert rnd.phase is Phase.DONE, rnd.abort_reason
    # The first unmask met the wrong share and went back to waiting (UNMASK, not ready); the
    # next silo's shares made it ready again, and the driver's second `finish` completed it.
    assert isinstance(rnd, Finishing) and rnd.after == [(Phase.UNMASK, False), (Phase.DONE, False)]
    assert rnd.blamed == {}
    assert rnd.result is not None and rnd.result.ring_sum is not None
    expected = sum(np.rint(inputs[s] * cfg.scale).astype(np.int64) for s in cfg.invited)
    assert np.array_equal(rnd.result.ring_sum[1:].astype(np.int64), expected)
    assert int(rnd.result.ring_sum[0]) == N * S_W

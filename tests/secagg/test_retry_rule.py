"""The differencing guard across rounds: masked inputs are counted per model digest (the tensors,
not the file), and a second input for the same model is signed only with the U3 recorded for
the earlier ones (records whose U3 the silo never learnt do not block)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from secagg.coordinator import Phase
from secagg.errors import AbortReason, MalformedMessage
from secagg.messages import (
    AbortNotice,
    Consistency,
    SignedEnvelope,
    SurvivorList,
    decode_as,
    decode_message,
    encode_message,
)
from secagg.silo import (
    MaskedInputRecorded,
    SiloPolicy,
    SubmissionRecord,
    SurvivorsRecorded,
)
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import federation

N, D = 5, 32
TENSORS = b"T" * 32  # the driver's digest of the model's tensors


def _round(earlier: tuple[SubmissionRecord, ...], **policy: object) -> tuple[Round, str]:
    """A round on the model with digest TENSORS; the first silo remembers `earlier`."""
    fed = federation()
    cfg = make_config(fed, N, D, round_id=20)
    target = cfg.invited[0]
    pol = SiloPolicy(0, submission_log={TENSORS: earlier}, **policy)  # type: ignore[arg-type]
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        policies={target: pol},
        model_digests={sid: TENSORS for sid in cfg.invited},
    )
    r.run()
    return r, target


def _signed_consistency(r: Round, sid: str) -> bool:
    for raw in r.sent[sid]:
        msg = decode_message(raw)
        if isinstance(msg, SignedEnvelope):
            try:
                decode_as(msg.payload, Consistency)
            except MalformedMessage:
                continue
            return True
    return False


def _completed(r: Round, target: str) -> None:
    assert r.coordinator.phase is Phase.DONE and not r.aborts, r.aborts
    assert _signed_consistency(r, target)
    recorded = [e.record for e in r.journal[target] if isinstance(e, SurvivorsRecorded)]
    assert [rec.model_digest for rec in recorded] == [TENSORS]
    assert recorded[0].survivors == frozenset(r.config.invited)


def test_second_input_for_the_same_digest_with_no_known_u3_is_allowed() -> None:
    # the earlier session ended before its M6 reached this silo: its U3 is unknown
    r, target = _round((SubmissionRecord(TENSORS, 3, b"a" * 32, None),))
    _completed(r, target)
    (masked,) = [e for e in r.journal[target] if isinstance(e, MaskedInputRecorded)]
    assert masked.record.model_digest == TENSORS and masked.record.round_id == 20


def test_second_input_with_the_recorded_u3_is_allowed() -> None:
    invited = make_config(federation(), N, D).invited
    r, target = _round((SubmissionRecord(TENSORS, 3, b"a" * 32, frozenset(invited)),))
    _completed(r, target)


def test_second_input_with_a_different_u3_is_refused_before_signing() -> None:
    invited = make_config(federation(), N, D).invited
    earlier = SubmissionRecord(TENSORS, 3, b"a" * 32, frozenset(invited[:4]))
    r, target = _round((earlier,))
    assert r.aborts[target].reason is AbortReason.CONSISTENCY_FAILED
    assert not _signed_consistency(r, target)  # no signature over the new U3 left
    assert not any(isinstance(e, SurvivorsRecorded) for e in r.journal[target])


def test_a_record_with_unknown_u3_does_not_hide_one_with_a_different_u3() -> None:
    invited = make_config(federation(), N, D).invited
    r, target = _round(
        (
            SubmissionRecord(TENSORS, 3, b"a" * 32, None),
            SubmissionRecord(TENSORS, 4, b"b" * 32, frozenset(invited[1:])),
        )
    )
    assert r.aborts[target].reason is AbortReason.CONSISTENCY_FAILED


def test_limit_of_inputs_per_model_is_a_replay() -> None:
    invited = make_config(federation(), N, D).invited
    same = frozenset(invited)
    three = tuple(SubmissionRecord(TENSORS, k, bytes([k]) * 32, same) for k in (3, 4, 5))
    r, target = _round(three)
    assert r.aborts[target].reason is AbortReason.REPLAY
    sent = [decode_message(m) for m in r.sent[target]]
    assert len(sent) == 1 and isinstance(sent[0], AbortNotice)  # no Advertise
    r, target = _round(three[:1], max_masked_inputs_per_model=1)
    assert r.aborts[target].reason is AbortReason.REPLAY


def test_a_different_u3_under_another_digest_does_not_block() -> None:
    invited = make_config(federation(), N, D).invited
    fed = federation()
    cfg = make_config(fed, N, D, round_id=20)
    target = cfg.invited[0]
    other = {b"O" * 32: (SubmissionRecord(b"O" * 32, 3, b"a" * 32, frozenset(invited[:4])),)}
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        policies={target: SiloPolicy(0, submission_log=other)},
        model_digests={sid: TENSORS for sid in cfg.invited},
    )
    r.run()
    _completed(r, target)


def _sent_types(r: Round, sid: str) -> list[str]:
    out = []
    for raw in r.sent[sid]:
        msg = decode_message(raw)
        if isinstance(msg, SignedEnvelope):
            out.append("signed")
        else:
            out.append(type(msg).__name__)
    return out


def test_a_retry_with_other_members_is_refused_before_any_share_leaves() -> None:
    # The earlier attempt's M6 never reached this silo: its U2 (the members it had shared its
    # secrets with) is what a retry must have as U1.
    invited = make_config(federation(), N, D).invited
    r, target = _round((SubmissionRecord(TENSORS, 3, b"a" * 32, None, frozenset(invited[:4])),))
    assert r.aborts[target].reason is AbortReason.CONSISTENCY_FAILED
    assert "missing []" in str(r.aborts[target]) and invited[4] in str(r.aborts[target])
    # only the Advertise (before U1 was known) left: no ShareKeys, no input (the harness
    # records the replies of `handle`; the driver sends the session's abort notice itself)
    assert _sent_types(r, target) == ["signed"]
    assert target not in r.uploads
    r, target = _round((SubmissionRecord(TENSORS, 3, b"a" * 32, None, frozenset(invited)),))
    _completed(r, target)


def test_same_members_but_a_smaller_u3_is_refused_at_signing() -> None:
    fed = federation()
    cfg = make_config(fed, N, D, round_id=20)
    target, quitter = cfg.invited[0], cfg.invited[4]
    earlier = SubmissionRecord(
        TENSORS, 3, b"a" * 32, frozenset(cfg.invited), frozenset(cfg.invited)
    )
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        drop_at={quitter: "masked"},  # shares keys, never uploads: U3 = U1 minus one
        policies={target: SiloPolicy(0, submission_log={TENSORS: (earlier,)})},
        model_digests={sid: TENSORS for sid in cfg.invited},
    )
    r.run()
    assert r.aborts[target].reason is AbortReason.CONSISTENCY_FAILED
    assert not _signed_consistency(r, target)


def test_two_sums_differing_by_one_silo_cannot_both_be_formed() -> None:
    """The differencing attack end to end in memory: session A over five silos completes; the
    coordinator then runs session B for the same model without silo v. Every silo that took
    part in A refuses B's membership before sharing anything, so no share of B is released."""
    fed = federation()
    cfg_a = make_config(fed, N, D, round_id=20)
    digests = {sid: TENSORS for sid in cfg_a.invited}
    a = Round(fed, cfg_a, exact_inputs(cfg_a, np.random.default_rng(1)), model_digests=digests)
    a.run()
    assert a.coordinator.phase is Phase.DONE
    logs = {
        sid: tuple(e.record for e in a.journal[sid] if isinstance(e, SurvivorsRecorded))
        for sid in cfg_a.invited
    }
    assert all(len(recs) == 1 for recs in logs.values())
    # B: four of A's five silos (v = the fifth left out), same model, later round id
    cfg_b = make_config(fed, N - 1, D, round_id=21)
    policies = {sid: SiloPolicy(20, submission_log={TENSORS: logs[sid]}) for sid in cfg_b.invited}
    b = Round(
        fed,
        cfg_b,
        exact_inputs(cfg_b, np.random.default_rng(2)),
        policies=policies,
        model_digests=digests,
    )
    b.run()
    assert b.coordinator.phase is Phase.ABORTED
    assert {sid: e.reason for sid, e in b.aborts.items()} == {
        sid: AbortReason.CONSISTENCY_FAILED for sid in cfg_b.invited
    }
    for sid in cfg_b.invited:  # nothing but the Advertise left any silo
        assert _sent_types(b, sid) == ["signed"]


def _records(r: Round, sid: str) -> tuple[SubmissionRecord, ...]:
    recs: dict[bytes, SubmissionRecord] = {}
    for e in r.journal[sid]:
        if isinstance(e, MaskedInputRecorded | SurvivorsRecorded):
            recs[e.record.session_id] = e.record
    return tuple(recs.values())


def test_a_forged_survivor_list_does_not_open_a_retry_over_another_set() -> None:
    # 13 silos, 4 colluders, t = 9: signers a (5 honest) + colluders; h uploads; the three p
    # share keys in A but never upload, so they hold no record for the model.
    fed = federation()
    cfg_a = make_config(fed, 13, 8, round_id=20)
    ids = list(cfg_a.invited)
    a, h, p, c = ids[0:5], ids[5], ids[6:9], ids[9:13]
    fake_u3 = sorted([a[0], h, *p, *c], key=str.encode)  # 9 = t silos, not A's U3
    index = {s: i + 1 for i, s in enumerate(ids)}

    def forge(rcpt: str, data: bytes) -> bytes:
        msg = decode_message(data)
        if rcpt == h and isinstance(msg, SurvivorList):
            return encode_message(replace(msg, u3=tuple(index[s] for s in fake_u3)))
        return data

    digests = {s: TENSORS for s in ids}
    run_a = Round(
        fed,
        cfg_a,
        exact_inputs(cfg_a, np.random.default_rng(1)),
        drop_at={s: "masked" for s in p},
        tamper=forge,
        model_digests=digests,
    )
    run_a.run()
    assert run_a.coordinator.result is not None and h in run_a.coordinator.result.survivors
    u3_a = set(run_a.coordinator.result.survivors)
    # B: the same model over the forged set (t = 7); colluders ignore their own records
    cfg_b = make_config(fed, 13, 8, round_id=21, invited=tuple(fake_u3), threshold=7, n_colluders=4)
    policies = {s: SiloPolicy(20, submission_log={TENSORS: _records(run_a, s)}) for s in fake_u3}
    policies.update({s: SiloPolicy(20) for s in c})
    run_b = Round(
        fed,
        cfg_b,
        exact_inputs(cfg_b, np.random.default_rng(2)),
        policies=policies,
        model_digests=digests,
    )
    run_b.run()
    # B may complete over p and the colluders, but never with h's input: an honest silo that
    # uploaded in both unmasked sessions forces the same U3
    if run_b.coordinator.phase is Phase.DONE:
        assert run_b.coordinator.result is not None
        u3_b = set(run_b.coordinator.result.survivors)
        assert h not in u3_b or u3_b == u3_a
    assert h not in run_b.uploads

"""The silo's persisted secagg state: written by real SiloSessions' journals, read back from
disk by a fresh store (a restart), and then enforced by the next session (stale round, replay)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from secagg.errors import AbortReason, ProtocolAbort
from secagg.silo import (
    ExclusionRecorded,
    MaskedInputRecorded,
    SiloPolicy,
    SiloSession,
    SubmissionRecord,
    SurvivorsRecorded,
)
from silo_agent.storage.silo_state import (
    STATE_FILENAME,
    SiloSecAggState,
    SiloStateError,
    SiloStateStore,
)
from tests.secagg.harness import MODEL_SHA, Round, exact_inputs, make_config, round_floor
from tests.secagg.pki import NOW, federation


def _round_with_stores(tmp_path: Path, **cfg_over: object) -> tuple[Round, dict[str, Path]]:
    fed = federation()
    cfg = make_config(fed, 5, 64, **cfg_over)
    dirs = {sid: tmp_path / sid.rsplit("/", 1)[-1] for sid in cfg.invited}
    policies = {
        sid: SiloStateStore(d).state.policy(round_floor(SiloPolicy(0), 5))
        for sid, d in dirs.items()
    }
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(1)), policies=policies)
    stores = {sid: SiloStateStore(d) for sid, d in dirs.items()}
    for sid, s in r.sessions.items():
        s._journal = stores[sid].journal  # the adapter passes store.journal to the session
    r.run()
    return r, dirs


def test_round_is_persisted_and_enforced_after_restart(tmp_path: Path) -> None:
    r, dirs = _round_with_stores(tmp_path)
    assert not r.aborts
    for sid, d in dirs.items():
        path = d / STATE_FILENAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        st = SiloStateStore(d).state  # a fresh load, as after a restart
        assert st.last_round_id == r.config.round_id
        (rec,) = st.submission_log[r.config.model_sha256]  # no tensor digest: the file hash
        assert rec.round_id == r.config.round_id
        assert rec.session_id == r.sessions[sid].session_id
        assert rec.survivors is not None and sid in rec.survivors


@pytest.mark.parametrize(
    ("round_delta", "max_inputs", "reason"),
    [(0, 3, AbortReason.STALE_ROUND), (1, 1, AbortReason.REPLAY)],
)
def test_restarted_silo_refuses_stale_round_and_second_input(
    tmp_path: Path, round_delta: int, max_inputs: int, reason: AbortReason
) -> None:
    r, dirs = _round_with_stores(tmp_path)
    fed = federation()
    by_id = {str(s.silo_id): s for s in fed.silos}
    cfg = make_config(fed, 5, 64, round_id=r.config.round_id + round_delta)
    for sid, d in dirs.items():
        store = SiloStateStore(d)  # restart: state from disk only
        s = SiloSession(
            by_id[sid],
            fed.trust,
            store.state.policy(
                round_floor(SiloPolicy(0, max_masked_inputs_per_model=max_inputs), 5)
            ),
            random_bytes=os.urandom,
            rng=np.random.default_rng(0),
            journal=store.journal,
        )
        with pytest.raises(ProtocolAbort) as e:
            s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
        assert e.value.reason is reason


def test_fresh_silo_accepts_the_same_offer(tmp_path: Path) -> None:
    # The control: without the persisted state the same offer is accepted and journalled.
    fed = federation()
    store = SiloStateStore(tmp_path)
    cfg = make_config(fed, 5, 64)
    s = SiloSession(
        fed.silos[0],
        fed.trust,
        store.state.policy(round_floor(SiloPolicy(0), 5)),
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
        journal=store.journal,
    )
    s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    assert SiloStateStore(tmp_path).state.last_round_id == cfg.round_id


def test_malformed_state_names_the_file(tmp_path: Path) -> None:
    (tmp_path / STATE_FILENAME).write_text('{"format": 2, "last_round_id": -3}')
    with pytest.raises(SiloStateError, match=rf"{STATE_FILENAME}.*last_round_id must be"):
        SiloStateStore(tmp_path)
    (tmp_path / STATE_FILENAME).write_text('{"format": 4, "last_round_id": 1, "submissions": []}')
    with pytest.raises(SiloStateError, match=r"format must be one of \(1, 2, 3\), got 4"):
        SiloStateStore(tmp_path)
    digest = "ab" * 32
    for retired in (
        '["abcd"]',
        f'["{" ".join("ab" * 32)}"]',
        f'["{digest.upper()}"]',
        '"x"',
        "[1]",
    ):
        (tmp_path / STATE_FILENAME).write_text(
            f'{{"format": 3, "last_round_id": 1, "submissions": [], "retired_models": {retired}}}'
        )
        with pytest.raises(SiloStateError, match=r"retired_models must be a list of 64-digit"):
            SiloStateStore(tmp_path)
    # Format 3 without the key would re-open every retired model: refused, not read as none.
    (tmp_path / STATE_FILENAME).write_text('{"format": 3, "last_round_id": 1, "submissions": []}')
    with pytest.raises(SiloStateError, match=r"retired_models"):
        SiloStateStore(tmp_path)


def test_records_are_keyed_by_the_tensor_digest_in_format_3(tmp_path: Path) -> None:
    fed = federation()
    cfg = make_config(fed, 5, 64)
    tensors = b"T" * 32
    store = SiloStateStore(tmp_path)
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(1)),
        model_digests={sid: tensors for sid in cfg.invited},
    )
    target = cfg.invited[0]
    r.sessions[target]._journal = store.journal
    r.run()
    assert not r.aborts
    obj = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert obj["format"] == 3 and obj["retired_models"] == []
    assert [x["model_digest"] for x in obj["submissions"]] == [tensors.hex()]
    (rec,) = SiloStateStore(tmp_path).state.submission_log[tensors]
    assert rec.survivors == frozenset(cfg.invited)


def test_format_1_file_is_read_and_its_file_hashes_still_count(tmp_path: Path) -> None:
    fed = federation()
    cfg = make_config(fed, 5, 64, round_id=9)
    v1 = {
        "format": 1,
        "last_round_id": 4,
        "submissions": [
            {
                "model_sha256": MODEL_SHA.hex(),
                "round_id": 4,
                "session_id": "ab" * 32,
                "survivors": sorted(cfg.invited[:4]),
            }
        ],
    }
    (tmp_path / STATE_FILENAME).write_text(json.dumps(v1))
    store = SiloStateStore(tmp_path)
    (rec,) = store.state.submission_log[MODEL_SHA]
    assert rec.model_digest == MODEL_SHA and rec.round_id == 4
    assert rec.survivors == frozenset(cfg.invited[:4])
    s = SiloSession(
        fed.silos[0],
        fed.trust,
        store.state.policy(round_floor(SiloPolicy(0, max_masked_inputs_per_model=1), 5)),
        random_bytes=os.urandom,
        rng=np.random.default_rng(0),
        journal=store.journal,
    )
    # the same model file, now identified by its tensor digest: the old record still counts
    with pytest.raises(ProtocolAbort) as e:
        s.handle_offer(cfg.encode(), MODEL_SHA, now=NOW, model_digest=b"T" * 32)
    assert e.value.reason is AbortReason.REPLAY
    # the rewrite (RoundAccepted was journalled) is format 3 and keeps the old key
    obj = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert obj["format"] == 3 and obj["last_round_id"] == 9
    assert [x["model_digest"] for x in obj["submissions"]] == [MODEL_SHA.hex()]


def test_state_file_holds_no_vector_or_key(tmp_path: Path) -> None:
    r, dirs = _round_with_stores(tmp_path)
    for d in dirs.values():
        text = (d / STATE_FILENAME).read_text()
        assert len(text) < 2000  # hashes and ids only, whatever the model size
        assert "PRIVATE" not in text
    assert dataclasses.is_dataclass(SiloStateStore(next(iter(dirs.values()))).state)


def test_an_exclusion_is_journalled_and_read_back(tmp_path: Path) -> None:
    store = SiloStateStore(tmp_path)
    rec = SubmissionRecord(b"T" * 32, 4, b"s" * 32, frozenset({"a", "b", "c"}), frozenset({"a"}))
    store.journal(MaskedInputRecorded(rec))
    store.journal(ExclusionRecorded(dataclasses.replace(rec, excluded=frozenset({"c"}))))
    (back,) = SiloStateStore(tmp_path).state.submission_log[b"T" * 32]  # replaced, not added
    assert back.excluded == frozenset({"c"})
    assert back.retry_members() == frozenset({"a", "b"})
    obj = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert obj["format"] == 3 and obj["submissions"][0]["excluded"] == ["c"]


def test_a_format_2_file_without_exclusions_is_read(tmp_path: Path) -> None:
    old = {
        "format": 2,
        "last_round_id": 4,
        "submissions": [
            {
                "model_digest": "ab" * 32,
                "round_id": 4,
                "session_id": "cd" * 32,
                "survivors": ["a", "b", "c"],
                "members": ["a", "b", "c"],
            }
        ],
    }
    (tmp_path / STATE_FILENAME).write_text(json.dumps(old))
    (rec,) = SiloStateStore(tmp_path).state.submission_log[bytes.fromhex("ab" * 32)]
    assert rec.excluded == frozenset()
    assert rec.retry_members() == frozenset({"a", "b", "c"})
    old["submissions"][0]["excluded"] = "c"  # type: ignore[index]
    (tmp_path / STATE_FILENAME).write_text(json.dumps(old))
    with pytest.raises(SiloStateError, match="excluded must be a list"):
        SiloStateStore(tmp_path)


# ---- the bounded log: remembered_models ---------------------------------------------------


def _record(model: bytes, round_id: int) -> SubmissionRecord:
    return SubmissionRecord(model * 32, round_id, bytes([round_id]) * 32, frozenset({"a", "b"}))


def test_the_log_keeps_the_most_recently_used_models_and_retires_the_rest(
    tmp_path: Path,
) -> None:
    store = SiloStateStore(tmp_path, remembered_models=2)
    store.journal(MaskedInputRecorded(_record(b"A", 1)))
    store.journal(MaskedInputRecorded(_record(b"B", 2)))
    store.journal(MaskedInputRecorded(_record(b"A", 3)))  # a retry for A: A used last
    store.journal(MaskedInputRecorded(_record(b"C", 4)))  # B is now the least recently used
    state = SiloStateStore(tmp_path).state  # as read back after a restart
    assert set(state.submission_log) == {b"A" * 32, b"C" * 32}
    assert [r.round_id for r in state.submission_log[b"A" * 32]] == [1, 3]
    assert state.retired_models == frozenset({b"B" * 32})
    obj = json.loads((tmp_path / STATE_FILENAME).read_text())
    assert obj["retired_models"] == [(b"B" * 32).hex()]
    # A later entry for a retired model does not bring its records back.
    late = dataclasses.replace(_record(b"B", 2), survivors=frozenset({"a"}))
    store.journal(SurvivorsRecorded(late))
    store.journal(MaskedInputRecorded(_record(b"B", 5)))
    assert SiloStateStore(tmp_path).state == state


def test_the_state_file_stays_bounded_over_many_rounds(tmp_path: Path) -> None:
    members = frozenset(f"spiffe://fed/silo/site-{i:03d}" for i in range(100))
    store = SiloStateStore(tmp_path, remembered_models=8)
    sizes = []
    for round_id in range(1, 201):
        rec = SubmissionRecord(round_id.to_bytes(32, "big"), round_id, b"s" * 32, None, members)
        store.journal(MaskedInputRecorded(rec))
        store.journal(SurvivorsRecorded(dataclasses.replace(rec, survivors=members)))
        sizes.append((tmp_path / STATE_FILENAME).stat().st_size)
    state = SiloStateStore(tmp_path).state
    assert len(state.submission_log) == 8 and len(state.retired_models) == 192
    # 8 records of 100 members and 100 survivors, and 70 bytes per retired digest: not 200
    # records.
    assert sizes[-1] < 8 * 2 * 100 * 35 + 192 * 70 < sizes[7] * 200 / 8


def test_a_silo_refuses_an_offer_for_a_retired_model() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 64)
    target = cfg.invited[0]
    retired = round_floor(SiloPolicy(0, retired_models=frozenset({MODEL_SHA})), 5)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(0)), policies={target: retired})
    r.run()
    abort = r.aborts[target]
    assert abort.reason is AbortReason.REPLAY
    assert "remembered_models" in str(abort) and not r.sent[target][1:]
    assert all(sid not in r.aborts for sid in cfg.invited[1:])  # only the retired model's silo


def test_a_model_retired_under_its_old_file_hash_is_refused_and_named_so() -> None:
    # Records an older agent keyed by the model file's SHA-256 belong to the same model as its
    # tensor digest: once that key is retired the model's retry rule cannot be checked.
    fed = federation()
    cfg = make_config(fed, 5, 64)
    target = cfg.invited[0]
    retired = round_floor(SiloPolicy(0, retired_models=frozenset({MODEL_SHA})), 5)
    r = Round(
        fed,
        cfg,
        exact_inputs(cfg, np.random.default_rng(0)),
        policies={target: retired},
        model_digests={sid: b"T" * 32 for sid in cfg.invited},
    )
    r.run()
    assert r.aborts[target].reason is AbortReason.REPLAY
    assert f"file hash, from an older agent, {MODEL_SHA.hex()[:12]}" in str(r.aborts[target])


def test_remembered_models_must_be_positive() -> None:
    with pytest.raises(ValueError, match="remembered_models"):
        SiloSecAggState().apply(MaskedInputRecorded(_record(b"A", 1)), remembered_models=0)

"""coordinator.runtime.peer_input: what a silo sends comes out bounded, finite and printable;
nothing
raises (issue 10, "validate at the edge")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.runtime.peer_input import (
    MAX_METRIC_NAME,
    MAX_METRICS,
    check_metrics,
    clean_abort,
    clean_hello,
    clean_report,
    clip_text,
    finite_mean,
    valid_metric_name,
)
from coordinator.storage.roundlog import _metrics_json
from protos import federation_pb2 as pb
from protos.names import abort_name


def test_valid_metrics_pass_unchanged() -> None:
    raw = {"eval_accuracy": 0.91, "train_loss": 0.2, "eval/top-5:v1.2": 3, "x": -1e300}
    m = check_metrics(raw)
    assert m.kept == {k: float(v) for k, v in raw.items()}
    assert m.dropped == 0


def test_each_kind_of_bad_metric_is_dropped_and_counted() -> None:
    raw: dict[object, object] = {
        "": 1.0,
        "n" * 3_900_000: 1.0,
        "a b": 1.0,
        "é": 1.0,
        "line\nbreak": 1.0,
        7: 1.0,
        "eval_nan": math.nan,
        "eval_inf": math.inf,
        "eval_minf": -math.inf,
        "eval_text": "0.5",
        "eval_none": None,
        "eval_bool": True,
        "eval_ok": 0.5,
    }
    m = check_metrics(raw)
    assert m.kept == {"eval_ok": 0.5}
    assert (m.bad_names, m.non_finite, m.not_numbers, m.over_limit) == (6, 3, 3, 0)
    text = m.describe()
    assert text.startswith("dropped 12 of 13 metrics: 6 with a name not 1-64 characters")
    assert len(text) < 400  # the 3.9 MB name is not in it
    assert "\n" not in text


def test_names_at_the_length_bound() -> None:
    assert valid_metric_name("a" * MAX_METRIC_NAME)
    assert not valid_metric_name("a" * (MAX_METRIC_NAME + 1))
    assert not valid_metric_name("")


def test_at_most_max_metrics_kept_the_first_in_sorted_order() -> None:
    raw = {f"k{i:05d}": float(i) for i in range(50_000)}
    m = check_metrics(raw)
    assert list(m.kept) == [f"k{i:05d}" for i in range(MAX_METRICS)]
    assert m.over_limit == 50_000 - MAX_METRICS
    assert "49,936 over the limit of 64 per report" in m.describe()


def test_clean_report_keeps_the_other_fields() -> None:
    report = pb.TrainReport(
        round_id=7,
        num_examples=12,
        metrics={"": 1.0, "eval_x": math.nan, "eval_y": 2.0},
        update_sha256=b"\x01" * 32,
    )
    clean, m = clean_report(report)
    assert dict(clean.metrics) == {"eval_y": 2.0}
    assert (clean.round_id, clean.num_examples, clean.update_sha256) == (7, 12, b"\x01" * 32)
    assert m.dropped == 2
    assert len(report.metrics) == 3  # the received message is left as it was


def test_clip_text_bounds_and_flattens() -> None:
    assert clip_text("TIMEOUT", 64) == "TIMEOUT"
    assert clip_text("a\nb\x1b[31m", 64) == "a?b?[31m"
    long = clip_text("x" * 3_000_000, 64)
    assert long == "x" * 64 + "…(+2,999,936 chars)"
    assert clip_text(b"\xff" * 10, 4) == "<10 bytes>"
    assert clip_text(None, 4) == "<NoneType>"


def test_clean_abort_and_hello_are_bounded() -> None:
    sent = pb.AbortNotice(round_id=3, code=pb.ABORT_REASON_DECLINED, detail="d\n" * 10**6)
    notice = clean_abort(sent)
    assert notice.round_id == 3 and notice.code == pb.ABORT_REASON_DECLINED
    assert len(notice.detail) < 600 and "\n" not in notice.detail
    hello = clean_hello(
        pb.Hello(silo_id="s" * 10**6, agent_version="v" * 10**6, roster_digest=b"\0" * 33)
    )
    assert len(hello.silo_id) < 300 and len(hello.agent_version) < 100
    assert hello.roster_digest == b""
    ok = pb.Hello(silo_id="spiffe://f/silo/a", agent_version="1.0", roster_digest=b"\1" * 32)
    assert clean_hello(ok) == ok


@pytest.mark.parametrize("code", [113, 2**31 - 1, -1, 99])
def test_clean_abort_keeps_an_unknown_code_and_names_it(code: int) -> None:
    """A newer silo's code (or any number a peer sends) is kept, logged as UNKNOWN(n)."""
    notice = clean_abort(pb.AbortNotice(round_id=2, code=code))  # type: ignore[arg-type]
    assert notice.code == code and abort_name(notice.code) == f"UNKNOWN({code})"
    assert pb.AbortNotice.FromString(notice.SerializeToString()).code == code


def test_finite_mean() -> None:
    assert finite_mean([1.0, math.nan, 3.0, math.inf]) == 2.0
    assert finite_mean([math.nan]) is None
    assert finite_mean([]) is None
    big = finite_mean([1.7e308, 1.7e308])  # a plain sum would overflow to inf
    assert big is not None and math.isfinite(big)


@given(
    st.dictionaries(
        st.one_of(st.text(max_size=80), st.integers()),
        st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none(), st.booleans()),
        max_size=100,
    )
)
def test_whatever_arrives_the_round_log_can_store_what_is_kept(
    raw: dict[object, object],
) -> None:
    m = check_metrics(raw)
    assert len(m.kept) <= MAX_METRICS
    assert len(m.kept) + m.dropped == len(raw)
    assert all(math.isfinite(v) for v in m.kept.values())
    _metrics_json(m.kept, "silo s")  # raises for what the round log refuses
    assert len(m.describe()) < 1000

"""The farm's CPU accounting (bench/farm/cpu_log.py): what a span of rounds cost, read from
samples about 0.2 s apart, must not count the work just before or after the span."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.farm.cpu_log import CpuSample, read_cpu_log, span_cpu


def _sample(t: float, process: float, **silos: float) -> CpuSample:
    return CpuSample(t, process, silos)


def test_the_span_is_read_between_samples_not_at_the_samples_outside_it() -> None:
    # One silo working at a steady 0.5 CPU-second per second from t = 0 to t = 1: the span
    # [0.3, 0.7] cost it 0.2 s. The samples around the span (0.2 and 0.8) would say 0.3 s.
    log = [_sample(t, t, a=0.5 * t) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    span = span_cpu([log], 0.3, 0.7)
    assert span.silos["a"] == pytest.approx(0.2)
    assert span.shared_s == pytest.approx(0.4 - 0.2)  # the process's 0.4 s less the silo's


def test_a_farm_without_a_sample_after_the_span_counts_for_nothing() -> None:
    killed = [_sample(t, t, k=t) for t in (0.0, 0.2, 0.4)]  # SIGKILLed at 0.5
    alive = [_sample(t, t, a=t) for t in (0.0, 0.2, 0.4, 0.6, 0.8)]
    span = span_cpu([killed, alive], 0.1, 0.7)
    assert set(span.silos) == {"a"}
    assert span.silos["a"] == pytest.approx(0.6)


def test_a_span_before_the_first_sample_starts_there_and_a_late_silo_is_left_out() -> None:
    log = [_sample(1.0, 1.0, a=1.0), _sample(2.0, 3.0, a=2.0, b=0.5)]
    span = span_cpu([log], 0.0, 2.0)
    assert span.silos == {"a": pytest.approx(1.0)}  # b has no value at the start


def test_the_log_is_read_in_time_order_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "farm.cpu.jsonl"
    lines = [
        json.dumps({"t": 2.0, "process_cpu_s": 2.0, "silos": {"a": 1.0}}),
        json.dumps({"t": 1.0, "process_cpu_s": 1.0, "silos": {"a": 0.5}}),
        '{"t": 3.0, "process_cpu_s"',
    ]
    path.write_text("\n".join(lines))
    assert [s.t for s in read_cpu_log(path)] == [1.0, 2.0]

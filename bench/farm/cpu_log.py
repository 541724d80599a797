"""A farm's CPU log: one JSON object per line, written by the farm, read by the benchmark.

Rule: each line is one sample, `{"t": wall-clock time, "process_cpu_s": the farm process's user
+ system CPU seconds, "silos": {silo name: that silo's threads' CPU seconds}}`, all cumulative
since the farm started. A farm that was SIGKILLed may leave a partial last line; readers skip
it. Per-round figures read the cumulative seconds at a span's start and end, each interpolated
linearly between the two samples around it (samples are about 0.2 s apart: taking the samples
outside the span instead counted up to 0.4 s of work before and after it, about 8 % too much
over three rounds of 10 silos, next to nothing over the longer rounds of 100). A silo without a
sample after the end (its farm was killed, or it was cut) has no figure for that span; a span
starting before a farm's first sample starts at that sample.

Pure: no I/O but the file given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True, slots=True)
class CpuSample:
    t: float
    process_cpu_s: float
    silos: Mapping[str, float]


def process_cpu_s() -> float:
    """CPU seconds of this process, all its threads (ended ones included)."""
    return time.process_time()


def write_sample(out: IO[str], silos: Mapping[str, float]) -> None:
    doc = {"t": time.time(), "process_cpu_s": process_cpu_s(), "silos": dict(silos)}
    out.write(json.dumps(doc) + "\n")
    out.flush()


def read_cpu_log(path: Path) -> list[CpuSample]:
    """The samples of `path` in time order (an unreadable or partial line is skipped)."""
    samples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
            samples.append(
                CpuSample(
                    float(doc["t"]),
                    float(doc["process_cpu_s"]),
                    {str(k): float(v) for k, v in doc["silos"].items()},
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(samples, key=lambda s: s.t)


def _at(
    samples: Sequence[CpuSample], t: float, read: Callable[[CpuSample], float | None]
) -> float | None:
    """`read` at time `t`, linear between the samples around `t`; the first sample's value
    before it, None after the last sample or where `read` has no value."""
    if not samples or t > samples[-1].t:
        return None
    if t <= samples[0].t:
        return read(samples[0])
    for a, b in zip(samples, samples[1:], strict=False):
        if a.t <= t <= b.t:
            va, vb = read(a), read(b)
            if va is None or vb is None:
                return None
            return va if b.t == a.t else va + (vb - va) * (t - a.t) / (b.t - a.t)
    return None


def _process_seconds(sample: CpuSample) -> float | None:
    return sample.process_cpu_s


def _silo_seconds(name: str) -> Callable[[CpuSample], float | None]:
    return lambda sample: sample.silos.get(name)


@dataclass(frozen=True, slots=True)
class SpanCpu:
    """CPU seconds spent between two times: per silo (its own threads), and the farms' shared
    seconds (process totals minus their silos' sum)."""

    silos: Mapping[str, float]
    shared_s: float


def span_cpu(logs: Iterable[Sequence[CpuSample]], start: float, end: float) -> SpanCpu:
    """What the farms of `logs` spent between `start` and `end`; a farm with no sample at or
    after `end` (killed) counts for nothing, a silo missing from either sample neither."""
    silos: dict[str, float] = {}
    shared = 0.0
    for samples in logs:
        process = [_at(samples, t, _process_seconds) for t in (start, end)]
        if process[0] is None or process[1] is None:
            continue
        spent = {}
        for name in samples[-1].silos:
            a, b = (_at(samples, t, _silo_seconds(name)) for t in (start, end))
            if a is not None and b is not None:
                spent[name] = b - a
        silos.update(spent)
        shared += (process[1] - process[0]) - sum(spent.values())
    return SpanCpu(silos, shared)

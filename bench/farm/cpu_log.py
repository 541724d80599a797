"""A farm's CPU log: one JSON object per line, written by the farm, read by the benchmark.

Rule: each line is one sample, `{"t": wall-clock time, "process_cpu_s": the farm process's user
+ system CPU seconds, "silos": {silo name: that silo's threads' CPU seconds}}`, all cumulative
since the farm started. A farm that was SIGKILLed may leave a partial last line; readers skip
it. Per-round figures come from the two samples bracketing a time span (the last at or before
its start, the first at or after its end): a silo without a sample after the end (its farm was
killed, or it was cut) has no figure for that span.

Pure: no I/O but the file given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
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


def _bracket(
    samples: Sequence[CpuSample], start: float, end: float
) -> tuple[CpuSample, CpuSample] | None:
    before = [s for s in samples if s.t <= start] or list(samples[:1])
    after = [s for s in samples if s.t >= end]
    if not before or not after:
        return None
    return before[-1], after[0]


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
        pair = _bracket(samples, start, end)
        if pair is None:
            continue
        a, b = pair
        spent = {n: b.silos[n] - a.silos.get(n, 0.0) for n in b.silos if n in a.silos}
        silos.update(spent)
        shared += (b.process_cpu_s - a.process_cpu_s) - sum(spent.values())
    return SpanCpu(silos, shared)

"""What a silo sends, made safe to keep and to log: the coordinator's edge checks.

Rule: pure functions, no I/O, and they never raise on what a peer sent. Everything a silo
controls that the hub stores (its session, the round log) or writes to the log passes through
here first, and comes out bounded:

- metric names: 1 to `MAX_METRIC_NAME` characters from `METRIC_NAME_CHARS`;
- metric values: finite numbers (a proto `double` can be NaN or ±inf: those are dropped);
- at most `MAX_METRICS` metrics per report (the first valid names in sorted order are kept);
- free text (an abort notice's detail, hello's fields): one printable line cut to a bound,
  with a marker saying how much was cut;
- an abort notice's code: any number passes (its name is "UNKNOWN(n)" when this version does
  not know it), so a newer silo's code is logged, never a crash.

What is dropped is counted, with one example, so the hub can say it in one (rate-limited) line
instead of storing it or failing later on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protos import federation_pb2 as pb

MAX_METRIC_NAME = 64
MAX_METRICS = 64
METRIC_NAME_CHARS = "A-Za-z0-9_.:/-"
_NAME = re.compile(f"[{METRIC_NAME_CHARS}]{{1,{MAX_METRIC_NAME}}}")
DETAIL_MAX = 512  # an abort's sentence for the operator
SILO_ID_MAX = 256  # a claimed silo id (only compared with the certificate's)
AGENT_VERSION_MAX = 64
DIGEST_BYTES = 32  # a roster digest is a SHA-256
EXAMPLE_MAX = 40  # how much of a dropped metric's name a log line shows


def clip_text(text: object, limit: int) -> str:
    """`text` as one printable line of at most `limit` characters plus a cut marker.

    Control characters (newlines included: one peer line must stay one log line) become `?`.
    Anything not a str is shown by its type (and size), never converted whole.
    """
    if isinstance(text, bytes):
        return f"<{len(text):,} bytes>"
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    head = "".join(c if c.isprintable() else "?" for c in text[:limit])
    cut = len(text) - limit
    return head if cut <= 0 else f"{head}…(+{cut:,} chars)"


@dataclass(frozen=True, slots=True)
class Metrics:
    """A report's metrics after the checks: what is kept, and how many of each kind were
    dropped (with one dropped name, clipped, for the log line)."""

    kept: Mapping[str, float]
    bad_names: int = 0
    non_finite: int = 0
    not_numbers: int = 0
    over_limit: int = 0
    example: str = ""

    @property
    def dropped(self) -> int:
        return self.bad_names + self.non_finite + self.not_numbers + self.over_limit

    def describe(self) -> str:
        """One sentence for the operator, e.g. `dropped 3 of 5 metrics: 1 name not 1-64
        characters of [A-Za-z0-9_.:/-], 2 values not finite (e.g. 'eval_loss')`."""
        parts = []
        if self.bad_names:
            parts.append(
                f"{self.bad_names:,} with a name not 1-{MAX_METRIC_NAME} characters of "
                f"[{METRIC_NAME_CHARS}]"
            )
        if self.non_finite:
            parts.append(f"{self.non_finite:,} with a value not finite")
        if self.not_numbers:
            parts.append(f"{self.not_numbers:,} with a value not a number")
        if self.over_limit:
            parts.append(f"{self.over_limit:,} over the limit of {MAX_METRICS} per report")
        total = len(self.kept) + self.dropped
        return (
            f"dropped {self.dropped:,} of {total:,} metrics: {', '.join(parts)} "
            f"(e.g. {self.example})"
        )


def valid_metric_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_metrics(raw: Mapping[Any, object]) -> Metrics:  # keys of any type: a peer's
    """Keep the metrics that may be stored and logged: valid names, finite numbers, at most
    `MAX_METRICS` of them. Never raises."""
    valid: dict[str, float] = {}
    bad_names = non_finite = not_numbers = 0
    example = ""
    for name, value in raw.items():
        why = ""
        if not valid_metric_name(name):
            bad_names += 1
            why = "bad name"
        elif isinstance(value, bool) or not isinstance(value, int | float):
            not_numbers += 1
            why = "not a number"
        elif not math.isfinite(value):  # ints are finite; only floats reach the inf/NaN case
            non_finite += 1
            why = f"value {value!r}"
        else:
            assert isinstance(name, str)
            valid[name] = float(value)
        if why and not example:
            example = f"{clip_text(name, EXAMPLE_MAX)!r}: {why}"
    names = sorted(valid)
    kept = {k: valid[k] for k in names[:MAX_METRICS]}
    over = len(names) - len(kept)
    if over and not example:
        example = f"{clip_text(names[MAX_METRICS], EXAMPLE_MAX)!r}: over the limit"
    return Metrics(kept, bad_names, non_finite, not_numbers, over, example)


def clean_report(report: pb.TrainReport) -> tuple[pb.TrainReport, Metrics]:
    """A copy of `report` holding only the metrics `check_metrics` keeps (the other fields are
    numbers, or the update digest the hub only compares)."""
    metrics = check_metrics(dict(report.metrics))
    clean = pb.TrainReport(
        round_id=report.round_id,
        num_examples=report.num_examples,
        metrics=dict(metrics.kept),
        update_sha256=report.update_sha256,
    )
    return clean, metrics


def clean_abort(notice: pb.AbortNotice) -> pb.AbortNotice:
    """An abort notice whose detail is a bounded printable line and whose code is kept as sent:
    a number this version does not know is no error (a newer silo's code), its name reads
    "UNKNOWN(n)" (`protos.names.abort_name`).
    """
    return pb.AbortNotice(
        round_id=notice.round_id,
        code=notice.code,
        detail=clip_text(notice.detail, DETAIL_MAX),
    )


def clean_hello(hello: pb.Hello) -> pb.Hello:
    """A hello whose text fields are bounded printable lines; a roster digest that is not a
    SHA-256 is replaced by none (it differed from the coordinator's, and still does)."""
    return pb.Hello(
        silo_id=clip_text(hello.silo_id, SILO_ID_MAX),
        agent_version=clip_text(hello.agent_version, AGENT_VERSION_MAX),
        wire_version=clip_text(hello.wire_version, AGENT_VERSION_MAX),
        roster_digest=hello.roster_digest if len(hello.roster_digest) == DIGEST_BYTES else b"",
    )


def finite_mean(values: list[float]) -> float | None:
    """The mean of the finite values, or None when there are none. Each term is divided
    before summing, so finite inputs near the float limit cannot overflow to inf."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    mean = sum(v / len(finite) for v in finite)
    return mean if math.isfinite(mean) else None

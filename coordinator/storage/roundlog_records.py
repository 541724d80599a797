"""What the round log holds, as frozen records, and the checks and JSON forms of its values.

Rule: a record is what a reader gets back (`RoundSummary` per round, `RoundDetail` for one round,
`FinalEvaluation`); `to_dict` is its stable export form (field names documented in
docs/round-log.md). Metrics are stored as sorted JSON with non-finite values as null, and read
back as NaN.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.rounds.events import PrivacyRecord as PrivacyRecord  # the round's own record
from secagg.identity import SiloId


class RoundStatus(enum.Enum):
    """A round's status; only RUNNING rounds accept writes."""

    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


class RoundLogError(Exception):
    """The round log refused a write or cannot be read; the message says what to do."""


class RoundNotFound(RoundLogError):
    """No round with that number is in the log."""

    def __init__(self, round_id: int, last: int) -> None:
        hint = "the log is empty" if last == 0 else f"rounds are numbered 1..{last}"
        super().__init__(f"round {round_id} is not in the round log ({hint})")
        self.round_id = round_id


class RoundLogUnavailable(RoundLogError):
    """The log file is missing, unreadable, or not a silofed round log of a known version."""


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint the log vouches for: the model state after `round_id` (0 = initial model)."""

    round_id: int
    path: Path
    sha256: str


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    phase: str
    started_at: float
    ended_at: float

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class Dropout:
    silo_id: SiloId
    phase: str
    reason: str


@dataclass(frozen=True, slots=True)
class SiloStats:
    """Traffic and local evaluation metrics of one silo in one round (never its update)."""

    silo_id: SiloId
    bytes_in: int
    bytes_out: int
    metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class FinalEvaluation:
    """The evaluation, on the silos, of the model a completed round produced, run once when the
    federation finished. Not a round: it trains nothing and counts nowhere as one."""

    round_id: int  # the completed round whose model (`model_sha256`) was evaluated
    model_sha256: str
    started_at: float
    ended_at: float
    asked: tuple[SiloId, ...]  # silos sent the model to evaluate
    answered: tuple[SiloId, ...]  # silos whose `eval_*` metrics arrived
    refusals: Mapping[SiloId, str]  # silo -> the reason code it declined with
    silo_metrics: Mapping[SiloId, Mapping[str, float]]
    global_metrics: Mapping[str, float]  # unweighted mean over `answered` of each metric

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The stable export form (field names documented in docs/round-log.md)."""
        return {
            "round": self.round_id,
            "model_sha256": self.model_sha256,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "asked": list(self.asked),
            "answered": list(self.answered),
            "refusals": dict(sorted(self.refusals.items())),
            "global_metrics": _export_metrics(self.global_metrics),
            "silos": [
                {"silo_id": s, "metrics": _export_metrics(self.silo_metrics[s])}
                for s in sorted(self.silo_metrics)
            ],
        }


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """One row of `rounds list`."""

    round_id: int
    status: RoundStatus
    started_at: float
    ended_at: float | None
    aggregation: str
    invited: int
    finished: int
    dropped: int
    global_metrics: Mapping[str, float]
    silo_metrics: Mapping[SiloId, Mapping[str, float]]

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class RoundDetail:
    """Everything the log holds about one round (`rounds show N`)."""

    round_id: int
    status: RoundStatus
    started_at: float
    ended_at: float | None
    aggregation: str
    config_digest: str
    model_in_sha256: str
    model_out_sha256: str | None
    rollback_of: int | None
    weight_sum: float | None
    global_metrics: Mapping[str, float]
    abort_reason: str | None
    extra: Mapping[str, object]
    phases: tuple[PhaseTiming, ...]
    participants: Mapping[str, tuple[SiloId, ...]]
    dropouts: tuple[Dropout, ...]
    silos: tuple[SiloStats, ...]
    privacy: PrivacyRecord | None
    checkpoint: CheckpointRecord | None
    final_evaluation: FinalEvaluation | None = None  # of this round's model, if it was the last

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The stable export form (field names documented in docs/round-log.md)."""
        return {
            "round": self.round_id,
            "status": self.status.value,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "aggregation": self.aggregation,
            "config_digest": self.config_digest,
            "model_in_sha256": self.model_in_sha256,
            "model_out_sha256": self.model_out_sha256,
            "rollback_of": self.rollback_of,
            "weight_sum": self.weight_sum,
            "global_metrics": _export_metrics(self.global_metrics),
            "abort_reason": self.abort_reason,
            "extra": dict(self.extra),
            "phases": [
                {
                    "phase": p.phase,
                    "started_at": p.started_at,
                    "ended_at": p.ended_at,
                    "duration_s": p.duration_s,
                }
                for p in self.phases
            ],
            "participants": {k: list(v) for k, v in self.participants.items()},
            "dropouts": [
                {"silo_id": d.silo_id, "phase": d.phase, "reason": d.reason} for d in self.dropouts
            ],
            "silos": [
                {
                    "silo_id": s.silo_id,
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                    "metrics": _export_metrics(s.metrics),
                }
                for s in self.silos
            ],
            "privacy": None
            if self.privacy is None
            else {
                "mechanism": self.privacy.mechanism,
                "noise_multiplier": self.privacy.noise_multiplier,
                "clip_norm": self.privacy.clip_norm,
                "epsilon": self.privacy.epsilon,
                "delta": self.privacy.delta,
                "details": dict(self.privacy.details),
            },
            "checkpoint": None
            if self.checkpoint is None
            else {"path": str(self.checkpoint.path), "sha256": self.checkpoint.sha256},
            "final_evaluation": None
            if self.final_evaluation is None
            else self.final_evaluation.to_dict(),
        }


def _export_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    # Exports must be valid JSON: a non-finite metric (stored as null) goes out as null.
    return {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}


def _metrics_json(metrics: Mapping[str, float], what: str) -> str:
    clean: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: metric names must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what}: metric {key!r} must be a number, got {value!r}")
        # A diverged silo may report NaN loss; JSON has no NaN, so it is stored as null.
        clean[key] = float(value) if math.isfinite(value) else None
    return json.dumps(clean, sort_keys=True, allow_nan=False)


def _metrics_from_json(text: str) -> dict[str, float]:
    raw = json.loads(text)
    return {k: (math.nan if v is None else float(v)) for k, v in sorted(raw.items())}


def _object_json(value: Mapping[str, object], what: str) -> str:
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from exc


def _final_evaluation(row: Sequence[Any]) -> FinalEvaluation:
    round_id, sha, started, ended, asked, answered, refusals, silo_metrics, global_metrics = row
    per_silo = json.loads(silo_metrics)
    return FinalEvaluation(
        round_id=int(round_id),
        model_sha256=str(sha),
        started_at=float(started),
        ended_at=float(ended),
        asked=tuple(SiloId(s) for s in json.loads(asked)),
        answered=tuple(SiloId(s) for s in json.loads(answered)),
        refusals={SiloId(k): str(v) for k, v in sorted(json.loads(refusals).items())},
        silo_metrics={
            SiloId(s): _metrics_from_json(json.dumps(m)) for s, m in sorted(per_silo.items())
        },
        global_metrics=_metrics_from_json(global_metrics),
    )


def _check_silo(silo_id: str) -> str:
    if not isinstance(silo_id, str) or not silo_id:
        raise ValueError(f"silo id must be a non-empty string, got {silo_id!r}")
    return silo_id

"""The spread of a metric across silos: how the model served each hospital, not only on average.

Rule: `spread` is the one computation behind every `rounds` view of it (`list`, `show`,
`export`, `plot`): pure, from the per-silo metrics the round log holds, nothing else. It takes
every silo that reported a finite value of the metric in the round (a silo that later dropped
out included: its figure is its evaluation of the same model), so its `mean` can differ from
the round's `global` value, which averages the finishing silos only. `std` is the population
standard deviation (divides by n: the silos are the whole federation, not a sample), 0 for
one silo. Worst and best follow `lower_is_better`; ties go to the first silo id in sorted
order, so the same log always names the same silo.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from secagg.identity import SiloId

# What `rounds show` and `rounds export` give the spread of: the silo agents report their
# evaluation of the model they received as `eval_*`, the same model for every silo. `train_*`
# figures are of each silo's own local model, so their spread says nothing about fairness.
EVAL_PREFIX = "eval_"
# The export's per-metric columns, `<metric>_<suffix>`, in this order.
COLUMN_SUFFIXES = ("n", "mean", "std", "worst", "worst_silo", "best", "best_silo")


def lower_is_better(metric: str) -> bool:
    """Losses and errors get worse as they grow (name contains `loss` or `error`, any case);
    everything else (accuracy, AUC, F1…) as it falls."""
    name = metric.lower()
    return "loss" in name or "error" in name


@dataclass(frozen=True, slots=True)
class Spread:
    """One metric across the silos that reported it in one round (or final evaluation)."""

    metric: str
    n: int
    mean: float
    std: float
    worst: float
    worst_silo: SiloId
    best: float
    best_silo: SiloId

    def to_dict(self) -> dict[str, float | int | str]:
        """Without the metric's name: `rounds list --json` rows carry it once, as `metric`."""
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "worst": self.worst,
            "worst_silo": self.worst_silo,
            "best": self.best,
            "best_silo": self.best_silo,
        }

    def columns(self) -> dict[str, float | int | str]:
        """The export's columns: `<metric>_n`, `_mean`, `_std`, `_worst`, `_worst_silo`,
        `_best`, `_best_silo`."""
        return {f"{self.metric}_{k}": v for k, v in self.to_dict().items()}


def spread(silo_metrics: Mapping[SiloId, Mapping[str, float]], metric: str) -> Spread | None:
    """`metric` across the silos of `silo_metrics` (silo id -> its metrics), or None if no silo
    reported a finite value of it. NaN and infinite values (a diverged silo) are left out."""
    values = sorted(
        (silo, float(m[metric]))
        for silo, m in silo_metrics.items()
        if metric in m and math.isfinite(m[metric])
    )
    if not values:
        return None
    numbers = [v for _, v in values]
    mean = statistics.fmean(numbers)
    # min/max keep the first of equal values; `values` is sorted by silo id.
    low = min(values, key=lambda item: item[1])
    high = max(values, key=lambda item: item[1])
    worst, best = (high, low) if lower_is_better(metric) else (low, high)
    return Spread(
        metric=metric,
        n=len(values),
        mean=mean,
        std=statistics.pstdev(numbers, mu=mean),
        worst=worst[1],
        worst_silo=worst[0],
        best=best[1],
        best_silo=best[0],
    )


def eval_metric_names(silo_metrics: Iterable[Mapping[str, float]]) -> list[str]:
    """The `eval_*` metric names any silo reported, sorted."""
    return sorted({k for m in silo_metrics for k in m if k.startswith(EVAL_PREFIX)})


def eval_spreads(silo_metrics: Mapping[SiloId, Mapping[str, float]]) -> dict[str, Spread]:
    """`spread` of every `eval_*` metric of one round (or final evaluation), by name."""
    found = (spread(silo_metrics, name) for name in eval_metric_names(silo_metrics.values()))
    return {s.metric: s for s in found if s is not None}


def spread_columns(silo_metrics: Mapping[SiloId, Mapping[str, float]]) -> dict[str, object]:
    """The export form of one round's spreads: every `eval_*` metric's `columns()`, flat."""
    out: dict[str, object] = {}
    for s in eval_spreads(silo_metrics).values():
        out.update(s.columns())
    return out

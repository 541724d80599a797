"""How a round's contributions become the next global model: the pluggable aggregation step.

Rule: an aggregation protocol names the phases it needs after the offer (each with its own
deadline key in `[deadlines]`), takes each accepted silo contribution as it arrives, and
produces the new global state. Nothing here knows about gRPC, files or clocks.

`plaintext-insecure` is weighted FedAvg over updates sent IN THE CLEAR: the coordinator sees
each silo's update. It is an explicitly insecure baseline for benchmarks; its name says so and
is recorded on every round it produces. The old name `plaintext` is refused with an explanation
(`check_aggregation_name`) so no configuration selects the baseline without naming it insecure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from coordinator.secure_round import SECAGG

PLAINTEXT = "plaintext-insecure"
# Names refused with an explanation rather than "unknown": they used to select (or look like
# they select) the in-the-clear baseline, which must now be named as insecure.
_RENAMED = {
    "plaintext": (
        "the plaintext baseline sends every silo's update IN THE CLEAR to the coordinator "
        f"(it is insecure); to select it anyway, name it {PLAINTEXT!r}"
    ),
}


class AggregationError(ValueError):
    """A contribution cannot be aggregated (wrong tensors, bad weight); str() says why."""


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One phase of a round after the model is offered: its name and its `[deadlines]` key."""

    name: str
    deadline_key: str


@dataclass(frozen=True, slots=True)
class AggregateResult:
    new_state: dict[str, torch.Tensor]
    weight_sum: float
    contributors: tuple[str, ...]


class AggregationProtocol(Protocol):
    """What the round driver needs from an aggregation protocol."""

    name: str
    phases: Sequence[PhaseSpec]

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None: ...

    def contribute(
        self, silo_id: str, num_examples: int, update: Mapping[str, torch.Tensor]
    ) -> None: ...

    def finish(self) -> AggregateResult: ...


class PlaintextFedAvg:
    """Weighted FedAvg: new = old + sum(n_i * delta_i) / sum(n_i), in ONE float64 accumulator.

    Memory is O(model): each update is folded into the accumulator as it arrives and dropped,
    so the number of silos does not matter. The result is cast back to each tensor's dtype.
    """

    name = PLAINTEXT
    phases: Sequence[PhaseSpec] = (PhaseSpec("train", "train_s"),)

    def __init__(self) -> None:
        self._old: Mapping[str, torch.Tensor] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._weight = 0
        self._contributors: list[str] = []

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._old = global_state
        self._acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_state.items()}
        self._weight = 0
        self._contributors = []

    def contribute(
        self, silo_id: str, num_examples: int, update: Mapping[str, torch.Tensor]
    ) -> None:
        """Fold one silo's delta in. Raises AggregationError (nothing folded) when it mismatches."""
        if silo_id in self._contributors:
            raise AggregationError(f"{silo_id} already contributed to this round")
        if num_examples <= 0:
            raise AggregationError(f"{silo_id} reported {num_examples} examples; must be > 0")
        if set(update) != set(self._acc):
            missing = sorted(set(self._acc) - set(update))
            extra = sorted(set(update) - set(self._acc))
            raise AggregationError(
                f"update from {silo_id} does not match the model: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for name, acc in self._acc.items():
            if tuple(update[name].shape) != tuple(acc.shape):
                raise AggregationError(
                    f"update from {silo_id}: tensor {name!r} has shape "
                    f"{tuple(update[name].shape)}, model has {tuple(acc.shape)}"
                )
            if not bool(torch.isfinite(update[name]).all()):
                raise AggregationError(f"update from {silo_id}: tensor {name!r} is not finite")
        for name, acc in self._acc.items():
            # In-place with type promotion: computed in float64 element by element, without a
            # float64 copy of the whole update (that would double the memory at 50M params).
            acc.add_(update[name], alpha=float(num_examples))
        self._weight += num_examples
        self._contributors.append(silo_id)

    def finish(self) -> AggregateResult:
        """The new global state. Raises AggregationError when nobody contributed."""
        if self._weight == 0:
            raise AggregationError("no contributions to aggregate")
        new_state: dict[str, torch.Tensor] = {}
        for name, acc in self._acc.items():
            old = self._old[name]
            acc.div_(float(self._weight)).add_(old)
            if old.dtype.is_floating_point:
                new_state[name] = acc.to(old.dtype)
            else:
                new_state[name] = acc.round().to(old.dtype)
        self._acc = {}
        return AggregateResult(new_state, float(self._weight), tuple(self._contributors))


AGGREGATIONS = {PLAINTEXT: PlaintextFedAvg}
# Secure aggregation (the default) is driven by coordinator.secure_driver, not by this protocol:
# the coordinator never holds a contribution it could fold in one at a time.
KNOWN_AGGREGATIONS = (SECAGG, PLAINTEXT)


def check_aggregation_name(name: str) -> str:
    """`name` if it names a known aggregation; else AggregationError saying what to write."""
    if name in _RENAMED:
        raise AggregationError(f"{name!r} is refused: {_RENAMED[name]}")
    if name not in KNOWN_AGGREGATIONS:
        raise AggregationError(f"must be one of {list(KNOWN_AGGREGATIONS)}, got {name!r}")
    return name


def make_aggregation(name: str) -> AggregationProtocol:
    """A fresh plaintext protocol instance for one round; AggregationError for another name."""
    if check_aggregation_name(name) not in AGGREGATIONS:
        raise AggregationError(f"{name!r} is not a contribution-by-contribution aggregation")
    return AGGREGATIONS[name]()

"""How a round's contributions become the next global model: the pluggable aggregation step.

Rule: an aggregation protocol names the phases it needs after the offer (each with its own
deadline key in `[deadlines]`), takes each accepted silo contribution as it arrives, and
produces the new global state. Nothing here knows about gRPC, files or clocks.

`plaintext-insecure` is weighted FedAvg over updates sent IN THE CLEAR: the coordinator sees
each silo's update. It is an explicitly insecure baseline for benchmarks; its name says so and
is recorded on every round it produces. The old name `plaintext` is refused with an explanation
(`coordinator.config.check_aggregation_name`) so no configuration selects the baseline without
naming it insecure.

Insecure is not unchecked: each update is checked WHOLE before any of it is added (exactly the
model's tensor names, dtypes and shapes; every value finite; its L2 norm within `[plaintext]
clip_l2`; its example count in [1, `[plaintext] weight_max`]), so a refused update leaves the
accumulator untouched, and a new model that is not finite is refused (`NON_FINITE_MODEL`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from coordinator.config import PlaintextLimits, check_aggregation_name
from coordinator.rounds.secure_config import NON_FINITE_MODEL, sum_of_squares

PLAINTEXT = "plaintext-insecure"
_NAME_SHOWN = 64  # a tensor name in a message is cut here: a silo chooses its names


class AggregationError(ValueError):
    """A contribution cannot be aggregated (wrong tensors, bad weight); str() says why."""


# One phase of a round after the model is offered: its name and its `[deadlines]` key.
PhaseSpec = tuple[str, str]


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
    phases: Sequence[PhaseSpec] = (("train", "train_s"),)

    def __init__(self, limits: PlaintextLimits | None = None) -> None:
        self._limits = limits or PlaintextLimits()
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
        """Fold one silo's delta in. Raises AggregationError, with nothing folded, unless the
        whole update passes `check_update` first."""
        if silo_id in self._contributors:
            raise AggregationError(f"{silo_id} already contributed to this round")
        check_update(silo_id, num_examples, update, self._old, self._limits)
        for name, acc in self._acc.items():
            # In-place with type promotion: computed in float64 element by element, without a
            # float64 copy of the whole update (that would double the memory at 50M params).
            acc.add_(update[name], alpha=float(num_examples))
        self._weight += num_examples
        self._contributors.append(silo_id)

    def finish(self) -> AggregateResult:
        """The new global state. Raises AggregationError when nobody contributed, or (code
        NON_FINITE_MODEL) when a tensor of the new state is not finite or not representable in
        its dtype: the caller keeps the old model."""
        if self._weight == 0:
            raise AggregationError("no contributions to aggregate")
        new_state: dict[str, torch.Tensor] = {}
        for name, acc in self._acc.items():
            old = self._old[name]
            acc.div_(float(self._weight)).add_(old)
            if old.dtype.is_floating_point:
                new = acc.to(old.dtype)
                if not _all_finite(new):  # also a finite mean beyond the dtype's range
                    raise AggregationError(
                        f"{NON_FINITE_MODEL}: tensor {_shown(name)} of the new model is not "
                        f"finite in {_dtype(old)}; the model is kept"
                    )
                new_state[name] = new
            else:
                acc.round_()
                if old.dtype != torch.bool and not _within(acc, torch.iinfo(old.dtype)):
                    raise AggregationError(
                        f"{NON_FINITE_MODEL}: tensor {_shown(name)} of the new model is outside "
                        f"the range of {_dtype(old)}; the model is kept"
                    )
                new_state[name] = acc.to(old.dtype)
        self._acc = {}
        return AggregateResult(new_state, float(self._weight), tuple(self._contributors))


def check_update(
    silo_id: str,
    num_examples: int,
    update: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    limits: PlaintextLimits,
) -> float:
    """The update's L2 norm if ALL of it may be folded into FedAvg over `model`; else
    AggregationError saying what is wrong. Checks, in this order, before any value is read:
    the example count in [1, weight_max]; exactly the model's tensor names; each tensor's dtype
    (the model's own: no float64, integer or complex stand-ins) and shape; then every value
    finite and the norm (float64, over all tensors) within clip_l2."""
    if num_examples <= 0:
        raise AggregationError(f"{silo_id} reported {num_examples} examples; must be > 0")
    if num_examples > limits.weight_max:
        raise AggregationError(
            f"{silo_id} reported {num_examples} examples; must be at most "
            f"{limits.weight_max} ([plaintext] weight_max)"
        )
    if set(update) != set(model):
        missing = sorted(set(model) - set(update))
        extra = sorted(set(update) - set(model))
        raise AggregationError(
            f"update from {silo_id} does not match the model: missing [{_names(missing)}], "
            f"unexpected [{_names(extra)}]"
        )
    for name, base in model.items():
        got = update[name]
        if got.dtype != base.dtype:
            raise AggregationError(
                f"update from {silo_id}: tensor {_shown(name)} has dtype {_dtype(got)}, the "
                f"model's is {_dtype(base)}"
            )
        if base.dtype.is_complex:  # cannot be folded into the float64 accumulator
            raise AggregationError(
                f"update from {silo_id}: tensor {_shown(name)} is complex; the plaintext "
                "baseline averages real tensors only"
            )
        if tuple(got.shape) != tuple(base.shape):
            raise AggregationError(
                f"update from {silo_id}: tensor {_shown(name)} has shape {tuple(got.shape)}, "
                f"model has {tuple(base.shape)}"
            )
    squares = 0.0
    for name in model:  # chunked, in float64 (secure_round.sum_of_squares): no model-sized copy
        tensor_squares = sum_of_squares(update[name])
        if tensor_squares is None:
            raise AggregationError(f"update from {silo_id}: tensor {_shown(name)} is not finite")
        squares += tensor_squares
    norm = math.sqrt(squares)
    if limits.clip_l2 is not None and not norm <= limits.clip_l2:
        raise AggregationError(
            f"update from {silo_id}: L2 norm {norm:.6g} is above [plaintext] clip_l2 = "
            f"{limits.clip_l2:g}"
        )
    return norm


def _all_finite(tensor: torch.Tensor) -> bool:
    return sum_of_squares(tensor) is not None


def _within(values: torch.Tensor, info: torch.iinfo) -> bool:
    """Every value (float64, already rounded) finite and representable in `info`'s dtype."""
    if values.numel() == 0:
        return True
    # info.max + 1 is a power of two, exact in float64 (info.max itself may not be).
    return (
        _all_finite(values)
        and info.min <= float(values.min())
        and float(values.max()) < info.max + 1
    )


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _names(names: Sequence[str]) -> str:
    """At most three names, each cut to _NAME_SHOWN characters, and how many more there are."""
    shown = ", ".join(_shown(n) for n in names[:3])
    return shown + (f", and {len(names) - 3} more" if len(names) > 3 else "")


def _shown(name: str) -> str:
    return repr(name if len(name) <= _NAME_SHOWN else name[:_NAME_SHOWN] + "...")


AGGREGATIONS = {PLAINTEXT: PlaintextFedAvg}


def make_aggregation(name: str, limits: PlaintextLimits | None = None) -> AggregationProtocol:
    """A fresh plaintext protocol instance for one round, checking each update against `limits`
    (default: no norm bound, weight_max 100 000); AggregationError for another name."""
    try:
        check_aggregation_name(name)
    except ValueError as exc:
        raise AggregationError(str(exc)) from None
    # Secure aggregation (the default) is driven by coordinator.rounds.secure, not by this
    # protocol: the coordinator never holds a contribution it could fold in one at a time.
    if name not in AGGREGATIONS:
        raise AggregationError(f"{name!r} is not a contribution-by-contribution aggregation")
    return AGGREGATIONS[name](limits)

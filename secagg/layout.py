"""A model's parameter layout for secure aggregation, from plain (name, shape, dtype) triples.

Rule: one definition of "the layout of a model" for both sides, with no torch here: the
coordinator builds the round's layout from its model and every silo builds the same from its
own, so a silo can refuse a round whose layout is not its model's before allocating anything
sized by it. Only floating tensors can be averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

from secagg.config import TensorSpec

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class LayoutError(ValueError):
    """A tensor cannot be securely aggregated; str() names it and says why."""


def layout_from(tensors: Iterable[tuple[str, tuple[int, ...], str]]) -> tuple[TensorSpec, ...]:
    """The layout in the given (state-dict) order. Raises LayoutError for a non-float tensor."""
    specs = []
    for name, shape, dtype in tensors:
        if dtype not in FLOAT_DTYPES:
            raise LayoutError(
                f"tensor {name!r} has dtype {dtype}; secure aggregation averages floating "
                f"tensors only ({sorted(FLOAT_DTYPES)})"
            )
        specs.append(TensorSpec(name, tuple(int(s) for s in shape), dtype))
    return tuple(specs)

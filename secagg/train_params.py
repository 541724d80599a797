"""Training parameters carried inside the signed round configuration, and the silo's parse of them.

Rule: the parameters are one flat JSON object in ONE canonical byte form (sorted keys, no spaces,
ASCII only, no NaN or infinity). A silo accepts the bytes only if re-encoding what it parsed
gives the same bytes, so two silos cannot read the same bytes differently, and every value is a
bool, an int, a finite float or a short string. The keys `seed` and `round` are refused: the
training randomness and the round number belong to the silo, never to the coordinator. Each key
the silo bounds in `limits` must hold a number in [0, limit]. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

TrainValue = bool | int | float | str

MAX_TRAIN_PARAMS_BYTES = 64 * 1024
MAX_KEYS = 64
MAX_KEY_CHARS = 64
MAX_STR_CHARS = 256
# The silo draws its own training randomness and knows its own round; a coordinator-chosen seed
# would let it replay bit-identical training (the differencing attack), so these are refused.
RESERVED_KEYS = frozenset({"seed", "round"})


class TrainParamsError(ValueError):
    """The training parameters are malformed or outside the silo's limits; str() says which."""


def canonical_train_params(params: Mapping[str, TrainValue]) -> bytes:
    """The one byte form of `params` that every silo accepts."""
    return json.dumps(
        dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def parse_train_params(data: bytes, limits: Mapping[str, float]) -> dict[str, TrainValue]:
    """The parameters in `data`, checked against the rules of this module and `limits`."""
    if len(data) > MAX_TRAIN_PARAMS_BYTES:
        raise TrainParamsError(
            f"training parameters are {len(data)} bytes, above {MAX_TRAIN_PARAMS_BYTES}"
        )
    try:
        obj: Any = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise TrainParamsError(f"training parameters are not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise TrainParamsError(
            f"training parameters must be a JSON object, got {type(obj).__name__}"
        )
    if len(obj) > MAX_KEYS:
        raise TrainParamsError(f"training parameters have {len(obj)} keys, above {MAX_KEYS}")
    params: dict[str, TrainValue] = {}
    for key, value in obj.items():
        if not 0 < len(key) <= MAX_KEY_CHARS:
            raise TrainParamsError(
                f"training parameter key {key[:MAX_KEY_CHARS]!r} must be 1..{MAX_KEY_CHARS} "
                "characters"
            )
        if key in RESERVED_KEYS:
            raise TrainParamsError(
                f"training parameter {key!r} is refused: the silo chooses its own "
                f"{'training randomness' if key == 'seed' else 'round number'}"
            )
        params[key] = _value(key, value)
    try:
        canonical = canonical_train_params(params)
    except ValueError as exc:  # cannot happen after the checks above; kept fail-closed
        raise TrainParamsError(f"training parameters do not re-encode: {exc}") from None
    if canonical != data:
        raise TrainParamsError(
            "training parameters are not in canonical form (sorted keys, no spaces, ASCII "
            "escapes, no duplicate keys); expected "
            f"{canonical[:80].decode('ascii')!r}{'...' if len(canonical) > 80 else ''}"
        )
    for key, limit in sorted(limits.items()):
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TrainParamsError(f"training parameter {key!r} must be a number, got {value!r}")
        if not 0 <= value <= limit:
            raise TrainParamsError(
                f"training parameter {key!r} = {value} is outside this silo's limit "
                f"[0, {limit}] ([train_limits] {key})"
            )
    return params


def _value(key: str, value: object) -> TrainValue:
    if isinstance(value, bool | int | str):
        if isinstance(value, str) and len(value) > MAX_STR_CHARS:
            raise TrainParamsError(
                f"training parameter {key!r} is a string of {len(value)} characters, above "
                f"{MAX_STR_CHARS}"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # 1e999 parses as inf
            raise TrainParamsError(f"training parameter {key!r} is not finite")
        return value
    kind = "null" if value is None else type(value).__name__
    raise TrainParamsError(
        f"training parameter {key!r} is {kind}; only bool, int, finite float and string "
        "values are allowed (no nesting, no null)"
    )


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")

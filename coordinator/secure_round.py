"""The coordinator's secure-aggregation round adapter: model <-> `secagg` round parameters.

Rule: everything the coordinator needs to turn a global model and a set of connected silos into
a `secagg.RoundConfig`, and the decoded aggregate update ḡ back into the next global state, in
pure functions (no I/O, no clock, no gRPC). The layout is the model's state dict in its own
order; the scale is `secagg.encoding.recommended_scale` for the configured clip C; the threshold
and colluder bound default to the least values the silos accept (docs/secagg-protocol.md §4.5:
n_C = ⌊(n-1)/3⌋, t = max(3, ⌊(n+n_C)/2⌋+1)).
The adapter never holds or returns one silo's vector: only ḡ, the decoded sum.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from secagg.config import (
    DdgNoise,
    RoundConfig,
    TensorSpec,
    Weighting,
    default_colluders,
    minimum_threshold,
)
from secagg.encoding import recommended_scale
from secagg.layout import LayoutError, layout_from

SECAGG = "secagg"


class SecureRoundError(ValueError):
    """The model or settings cannot form a secure round; str() says what to change."""


class WeightingMode(enum.Enum):
    EXAMPLES = "examples"
    UNIFORM = "uniform"


@dataclass(frozen=True, slots=True)
class SecAggSettings:
    """Coordinator `[secagg]` settings (validated by the config loader)."""

    clip_l2: float
    threshold: int | None = None
    n_colluders: int | None = None
    ring_bits: int = 32
    weighting: WeightingMode = WeightingMode.EXAMPLES
    weight_max: int = 100_000
    dp_noise_multiplier: float | None = None  # None: DP off
    dp_noise_divisor: int = 1


_TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def layout_of(state: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """The model's tensors in state-dict order (secagg.layout: the silos build theirs alike)."""
    try:
        return layout_from(
            (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
        )
    except LayoutError as exc:
        raise SecureRoundError(str(exc)) from exc


def build_round_config(
    settings: SecAggSettings,
    *,
    federation_id: str,
    roster_version: int,
    roster_digest: bytes,
    round_id: int,
    invited: Sequence[str],
    model_version: int,
    model_sha256: bytes,
    layout: tuple[TensorSpec, ...],
    deadlines_s: tuple[int, int, int, int, int],
    train_params: bytes = b"{}",
) -> RoundConfig:
    """The RoundConfig of one round; `invited` is sorted bytewise here."""
    inv = tuple(sorted(set(invited), key=lambda s: s.encode()))
    n = len(inv)
    n_c = default_colluders(n) if settings.n_colluders is None else settings.n_colluders
    t_min = minimum_threshold(n, n_c)
    t = t_min if settings.threshold is None else settings.threshold
    if t < t_min or t > n:
        raise SecureRoundError(
            f"[secagg] threshold {t} is outside [{t_min}, {n}] for {n} invited silos and "
            f"n_colluders = {n_c} (docs/secagg-protocol.md §4.5)"
        )
    dp = None
    if settings.dp_noise_multiplier is not None:
        dp = DdgNoise(settings.dp_noise_multiplier, settings.dp_noise_divisor)
    uniform = dp is not None or settings.weighting is WeightingMode.UNIFORM
    scale = recommended_scale(
        n,
        settings.clip_l2,
        settings.ring_bits,
        settings.dp_noise_multiplier or 0.0,
        settings.dp_noise_divisor,
    )
    if scale < 1:
        raise SecureRoundError(
            f"[secagg] clip_l2 = {settings.clip_l2} leaves no precision in a "
            f"{settings.ring_bits}-bit ring for {n} silos; lower clip_l2 or use ring_bits = 64"
        )
    return RoundConfig(
        federation_id=federation_id,
        roster_version=roster_version,
        roster_digest=roster_digest,
        round_id=round_id,
        invited=inv,
        model_version=model_version,
        model_sha256=model_sha256,
        layout=layout,
        scale=scale,
        clip_l2=settings.clip_l2,
        threshold=t,
        n_colluders=n_c,
        ring_bits=settings.ring_bits,
        weighting=Weighting.UNIFORM if uniform else Weighting.EXAMPLES,
        weight_max=1 if uniform else settings.weight_max,
        dp=dp,
        deadlines_s=deadlines_s,
        train_params=train_params,
    )


def quantisation_bound(
    config: RoundConfig, examples: Sequence[int], max_abs_update: float = 0.0
) -> float:
    """Max abs error per coordinate of ḡ versus exact FedAvg over the survivors (DP off).

    `examples` are the survivors' example counts (ignored with uniform weights), and
    `max_abs_update` bounds |Δ| over every survivor and coordinate. Two terms:
    * fixed point: each silo's stochastic rounding moves its weighted coordinate by < 1 grid
      unit, and the sum is divided by S·Σw̃ (w̃_i = min(n_i, W_max)/W_max, 1 when uniform);
    * weights (examples weighting): q_i = SR(S_w·w̃_i) is off by < 1, a relative error below
      1/(S_w·w̃_i), which moves the weighted mean by < 2·max|Δ|·max_i 1/(S_w·w̃_i).
    The 1% slack covers float32 decoding."""
    n = len(examples)
    if config.weighting is Weighting.UNIFORM:
        shares = [1.0] * n
    else:
        shares = [min(max(e, 1), config.weight_max) / config.weight_max for e in examples]
    rounding = n / (config.scale * sum(shares))
    weights = 0.0
    if config.weighting is not Weighting.UNIFORM:
        weights = 2 * max_abs_update * max(1 / (config.weight_scale * w) for w in shares)
    return (rounding + weights) * 1.01


def apply_aggregate(
    old: Mapping[str, torch.Tensor], aggregate: np.ndarray, layout: tuple[TensorSpec, ...]
) -> dict[str, torch.Tensor]:
    """The next global state: old + ḡ reshaped per layout, in each tensor's own dtype."""
    d = sum(s.size for s in layout)
    if aggregate.ndim != 1 or aggregate.shape[0] != d:
        raise SecureRoundError(f"aggregate has shape {aggregate.shape}, layout needs ({d},)")
    if [s.name for s in layout] != list(old):
        raise SecureRoundError("the model's tensors differ from the round's layout")
    new: dict[str, torch.Tensor] = {}
    start = 0
    for spec in layout:
        part = aggregate[start : start + spec.size]
        start += spec.size
        base = old[spec.name]
        delta = torch.from_numpy(np.ascontiguousarray(part)).reshape(spec.shape)
        if base.dtype in (torch.float32, torch.float64):
            # One rounding in the model's own precision, and no float64 copies of big tensors.
            new[spec.name] = base + delta.to(base.dtype)
        else:  # half precision: add in float32, round once
            new[spec.name] = (base.to(torch.float32) + delta.to(torch.float32)).to(base.dtype)
    return new

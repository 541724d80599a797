"""The coordinator's secure-aggregation round adapter: model <-> `secagg` round parameters.

Rule: everything the coordinator needs to turn a global model and a set of connected silos into
a `secagg.RoundConfig`, and the decoded aggregate update ḡ back into the next global state, in
pure functions (no I/O, no clock, no gRPC). The layout is the model's state dict in its own
order; the scale is `secagg.encoding.recommended_scale` for the configured clip C; the threshold
and colluder bound default to the least values the silos accept (docs/secagg-protocol.md §4.5:
n_C = ⌊(n-1)/3⌋, t = max(3, ⌊(n+n_C)/2⌋+1)). With `[secagg] graph = "harary"` the degree and
neighbourhood threshold follow `secagg.graph_params.choose_sparse_graph` for the invited silos
(the complete graph when its degree reaches n - 1).
The adapter never holds or returns one silo's vector: only ḡ, the decoded sum.

Nothing is applied that clipped inputs cannot produce: `check_aggregate` refuses an aggregate
whose L2 norm exceeds `aggregate_norm_bound` (AGGREGATE_OUT_OF_BOUND; the derivation is in
docs/secagg-protocol.md §2.5), and `check_finite` a new state that is not finite
(NON_FINITE_MODEL). Either way the round is aborted and the model kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from coordinator.config import GraphMode, SecAggSettings, WeightingMode
from secagg.config import (
    DdgNoise,
    GraphKind,
    RoundConfig,
    TensorSpec,
    Weighting,
    default_colluders,
    minimum_threshold,
)
from secagg.encoding import recommended_scale
from secagg.graph_params import SparseGraph, choose_sparse_graph, least_degree
from secagg.layout import LayoutError, layout_from

SECAGG = "secagg"
# Abort codes of a round whose result is refused (the stall diagnosis keys on the first word).
AGGREGATE_OUT_OF_BOUND = "AGGREGATE_OUT_OF_BOUND"
NON_FINITE_MODEL = "NON_FINITE_MODEL"
# The bound's DP noise term: ‖noise‖ ≤ σ·(√d + √(2x)), failing with probability at most e^-x;
# √(2x) = 9 gives e^-40.5 < 3e-18 (docs/secagg-protocol.md §2.5).
DP_TAIL_SQRT_2X = 9.0
# Relative slack of the bound: float32 decoding (2^-24), float64 clipping and norm sums.
BOUND_SLACK = 1e-6
_NORM_CHUNK = 1 << 16


class SecureRoundError(ValueError):
    """The model or settings cannot form a secure round; str() says what to change."""


class ResultRefused(SecureRoundError):
    """A round's decoded result must not become the global model; str() starts with the code
    (AGGREGATE_OUT_OF_BOUND or NON_FINITE_MODEL)."""


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
    roster_size: int | None = None,
) -> RoundConfig:
    """The RoundConfig of one round; `invited` is sorted bytewise here."""
    inv = tuple(sorted(set(invited), key=lambda s: s.encode()))
    n = len(inv)
    # The silos' default floor follows the federation's size (the roster), not the round's.
    members = max(n, roster_size or 0)
    n_c = default_colluders(members) if settings.n_colluders is None else settings.n_colluders
    t_min = minimum_threshold(n, n_c)
    t = t_min if settings.threshold is None else settings.threshold
    if t < t_min or t > n:
        raise SecureRoundError(
            f"[secagg] threshold {t} is outside [{t_min}, {n}] for {n} invited silos and "
            f"n_colluders = {n_c} (docs/secagg-protocol.md §4.5)"
        )
    graph = sparse_graph(settings, n, n_c)
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
        graph=GraphKind.COMPLETE if graph is None else GraphKind.HARARY,
        graph_k=0 if graph is None else graph.k,
        graph_t_k=0 if graph is None else graph.t_k,
        dp=dp,
        deadlines_s=deadlines_s,
        train_params=train_params,
    )


def sparse_graph(settings: SecAggSettings, n: int, n_colluders: int) -> SparseGraph | None:
    """The Harary graph of a round of `n` invited silos assuming `n_colluders`, or None for the
    complete graph (`graph = "complete"`, or the degree reaches n - 1). A `graph_degree` below
    the silos' floor for `n_colluders` is a SecureRoundError naming the key and the minimum."""
    if settings.graph is GraphMode.COMPLETE:
        return None
    k = settings.graph_degree
    if k is not None and (k % 2 or k < least_degree(n_colluders)):
        raise SecureRoundError(
            f"[secagg] graph_degree {k} must be even and at least the minimum "
            f"{least_degree(n_colluders)} for n_colluders = {n_colluders} (the silos refuse a "
            "degree that does not exceed it; docs/secagg-protocol.md §4.6)"
        )
    return choose_sparse_graph(n, n_colluders, dropout_rate=settings.dropout_rate, degree=k)


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
    old: Mapping[str, torch.Tensor],
    aggregate: np.ndarray,
    layout: tuple[TensorSpec, ...],
    *,
    in_place: bool = False,
) -> dict[str, torch.Tensor]:
    """The next global state: old + ḡ reshaped per layout, in each tensor's own dtype. With
    `in_place`, a tensor of ḡ's own dtype is computed into ḡ's memory (ḡ is destroyed; the
    new state holds it): no second model-sized array."""
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
        if in_place and base.dtype == delta.dtype:
            new[spec.name] = delta.add_(base)  # the same sum: IEEE addition commutes
        elif base.dtype in (torch.float32, torch.float64):
            # One rounding in the model's own precision, and no float64 copies of big tensors.
            new[spec.name] = base + delta.to(base.dtype)
        else:  # half precision: add in float32, round once
            new[spec.name] = (base.to(torch.float32) + delta.to(torch.float32)).to(base.dtype)
    return new


def aggregate_norm_bound(config: RoundConfig, weight_sum: int, survivors: int) -> float:
    """The largest L2 norm of ḡ that clipped inputs can produce (docs/secagg-protocol.md §2.5).

    ḡ = Σ_i (q_i/W)·u_i + S_w/(S·W)·Σ_i e_i (+ noise), with ‖u_i‖ ≤ C, q_i ≥ 0, W = Σ q_i the
    decoded weight sum and |e_ij| < 1 the stochastic rounding. So, for n = |U3| survivors and d
    coordinates:

        ‖ḡ‖ ≤ C + n·√d·S_w/(S·W)  [+ z·C/√(n·n_h)·(√d + 9) with DP]

    The middle term is √d times the per-coordinate rounding term of `quantisation_bound`, with
    the exact W in place of S_w·Σ w̃_i. The DP term holds except with probability e^-40.5 (the
    discrete Gaussian is sub-Gaussian; chi-square tail of Laurent and Massart). The whole is
    widened by BOUND_SLACK for float32 decoding and float64 rounding."""
    if weight_sum < 1 or survivors < 1:
        raise SecureRoundError(f"no bound for W = {weight_sum} over {survivors} survivors")
    root_d = math.sqrt(config.d)
    rounding = survivors * root_d * config.weight_scale / (config.scale * weight_sum)
    noise = 0.0
    if config.dp is not None:
        sigma = config.dp.noise_multiplier * config.clip_l2
        sigma /= math.sqrt(survivors * config.dp.noise_divisor)
        noise = sigma * (root_d + DP_TAIL_SQRT_2X)
    return (config.clip_l2 + rounding + noise) * (1 + BOUND_SLACK)


def sum_of_squares(values: np.ndarray | torch.Tensor) -> float | None:
    """Σ x² in float64 through one small reused buffer (no model-sized copy), or None when a
    value is NaN or infinite. Any real dtype (bfloat16 converted exactly; complex refused
    with TypeError). numpy, not torch: torch.isfinite is ~50x slower on CPU."""
    flat, widen = _flat_numpy(values)
    buf = np.empty(_NORM_CHUNK, dtype=np.float64)
    total = 0.0
    for start in range(0, flat.shape[0], _NORM_CHUNK):
        part = buf[: min(_NORM_CHUNK, flat.shape[0] - start)]
        np.copyto(part, widen(flat[start : start + part.shape[0]]))
        squares = float(np.einsum("i,i->", part, part))
        if not math.isfinite(squares):
            if not bool(np.isfinite(part).all()):
                return None
            squares = math.inf  # finite float64 values too large to square: no finite norm
        total += squares
    return total


def _flat_numpy(
    values: np.ndarray | torch.Tensor,
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A flat numpy view of `values` and how to widen a chunk of it to what float64 holds."""
    if isinstance(values, np.ndarray):
        return values.reshape(-1), _same
    flat = values.detach().reshape(-1)
    if flat.is_complex():
        raise TypeError(f"a {flat.dtype} tensor has no real norm")
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are float32's top half
        return flat.view(torch.int16).numpy(), _bfloat16_to_float32
    return flat.numpy(), _same


def _same(chunk: np.ndarray) -> np.ndarray:
    return chunk


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def l2_norm(vector: np.ndarray) -> float:
    """‖vector‖₂ in float64 (NaN if a value is not finite)."""
    squares = sum_of_squares(vector)
    return math.nan if squares is None else math.sqrt(squares)


def check_aggregate(
    config: RoundConfig, aggregate: np.ndarray, weight_sum: int, survivors: int
) -> float:
    """‖ḡ‖ if it is within `aggregate_norm_bound`; else ResultRefused (AGGREGATE_OUT_OF_BOUND).

    A NaN norm is refused too (`not norm <= bound`)."""
    norm = l2_norm(aggregate)
    bound = aggregate_norm_bound(config, weight_sum, survivors)
    if not norm <= bound:
        raise ResultRefused(
            f"{AGGREGATE_OUT_OF_BOUND}: norm {norm:.6g} > bound {bound:.8g} (clip_l2 "
            f"{config.clip_l2:g}, {survivors} survivors, weight sum {weight_sum}): clipped "
            "inputs cannot produce it, so a silo sent an unclipped input; the model is kept"
        )
    return norm


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """ResultRefused (NON_FINITE_MODEL) if a tensor of `state` holds a NaN or an infinity."""
    for name, tensor in state.items():
        if sum_of_squares(tensor) is None:
            raise ResultRefused(
                f"{NON_FINITE_MODEL}: tensor {name!r} of the new model is not finite; the "
                "model is kept"
            )

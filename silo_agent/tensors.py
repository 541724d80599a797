"""Model state <-> bytes on the silo, and metric naming: shared by both aggregation paths."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes (sorted names, contiguous CPU copies, no metadata)."""
    tensors = {k: state[k].detach().to("cpu").contiguous().clone() for k in sorted(state)}
    data: bytes = st_save(tensors)
    return data


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = st_load(bytes(data))
    return loaded


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Metric names under `prefix` (eval_ for the received model, train_ for local training)."""
    return {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in metrics.items()}

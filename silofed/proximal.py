"""FedProx's proximal term, for a task's local training loop.

Rule: `ProximalTerm(model, mu)` snapshots the model's parameters when it is built — build it at
the start of `train`, when the model holds the global model the round started from — and
calling it, ``proximal(model)`` (the same as ``proximal.term(model)``), returns
(μ/2)·‖w − w_global‖² summed over every parameter, to add to the loss before ``backward()``.
Its gradient pulls each weight toward the global one by μ·(w − w_global), which keeps silos
with different data from drifting apart (Li et al., "Federated Optimization in Heterogeneous
Networks", MLSys 2020).

μ = 0 is FedAvg exactly: the term is then a constant zero outside the autograd graph, so the
loss, its gradients and the trained weights are bit for bit those of training without it.

μ comes from the coordinator's ``[train] proximal_mu`` (`ProximalTerm.from_params` reads it from
`train`'s params; absent means 0). Under secure aggregation it travels inside the signed round
configuration, the same for every silo, and a silo bounds it with ``[train_limits] proximal_mu``.
This module imports torch, so `silofed` exports it lazily (importing `silofed` stays light).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

PARAM_KEY = "proximal_mu"  # the key in the coordinator's [train] table


class ProximalTerm:
    """(μ/2)·‖w − w_global‖² against the parameters `model` held when this was built."""

    __slots__ = ("_anchor", "_device", "_dtype", "mu")

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        """Raises ValueError if `mu` is not a finite number ≥ 0."""
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu):
            raise ValueError(f"[train] {PARAM_KEY} must be a finite number >= 0, got {mu!r}")
        if mu < 0:
            raise ValueError(
                f"[train] {PARAM_KEY} must be >= 0, got {mu}: a negative value would push the "
                "local model away from the global one"
            )
        self.mu = float(mu)
        # A detached copy: the optimizer changes the parameters in place, the anchor must not.
        self._anchor: tuple[tuple[str, torch.Tensor], ...] = tuple(
            (name, p.detach().clone()) for name, p in model.named_parameters()
        )
        first = self._anchor[0][1] if self._anchor else torch.zeros(())
        self._dtype, self._device = first.dtype, first.device

    @classmethod
    def from_params(cls, model: torch.nn.Module, params: Mapping[str, Any]) -> ProximalTerm:
        """The term for `train(model, data, params)`: μ = ``params["proximal_mu"]``, 0 if absent.

        Raises ValueError naming ``[train] proximal_mu`` if it is not a finite number ≥ 0."""
        return cls(model, params.get(PARAM_KEY, 0.0))

    def term(self, model: torch.nn.Module) -> torch.Tensor:
        """(μ/2)·‖w − w_global‖², a scalar tensor in the graph of `model`'s parameters.

        Raises ValueError if `model` does not have the parameters (names, shapes) this term
        was built from."""
        if self.mu == 0.0:
            # Not a function of the parameters: adding it changes neither the loss's value
            # (x + 0.0 == x) nor any gradient, so μ = 0 trains exactly as FedAvg.
            return torch.zeros((), dtype=self._dtype, device=self._device)
        current = tuple(model.named_parameters())
        if [n for n, _ in current] != [n for n, _ in self._anchor]:
            raise ValueError(
                "the model's parameters are not the ones the proximal term was built from "
                f"({len(current)} parameters, expected {len(self._anchor)}); build the "
                "ProximalTerm from the model being trained, at the start of train()"
            )
        total = torch.zeros((), dtype=self._dtype, device=self._device)
        for (name, w), (_, anchor) in zip(current, self._anchor, strict=True):
            if w.shape != anchor.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(w.shape)}, but the proximal term "
                    f"was built with shape {tuple(anchor.shape)}"
                )
            total = total + (w - anchor).pow(2).sum()
        return (self.mu / 2) * total

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """Same as `term`: ``loss = loss_fn(model(x), y) + proximal(model)``."""
        return self.term(model)

    def __repr__(self) -> str:
        return f"ProximalTerm(mu={self.mu}, parameters={len(self._anchor)})"

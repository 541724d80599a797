"""FedProx's proximal term (silofed.proximal): μ = 0 is FedAvg bit for bit, μ > 0 pulls the local
model toward the global one (measured), and the term's value and gradient match a hand
computation. Also: `import silofed` still does not load torch, and a silo bounds μ."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from secagg.train_params import TrainParamsError, canonical_train_params, parse_train_params
from silofed import ProximalTerm

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def tiny_model() -> nn.Module:
    """4 -> 3 ReLU -> 2, the same weights every time (the "global model" of a round)."""
    generator = torch.Generator().manual_seed(7)
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [
        (torch.randn(5, 4, generator=generator), torch.randint(0, 2, (5,), generator=generator))
        for _ in range(STEPS)
    ]


def train(params: Mapping[str, Any], *, proximal: bool) -> nn.Module:
    """A few SGD (with momentum) steps from the global model; with or without the term."""
    model = tiny_model()
    term = ProximalTerm.from_params(model, params) if proximal else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if term is not None:
            loss = loss + term(model)
        torch.autograd.backward(loss)
        optimizer.step()
    return model


def distance_to_global(model: nn.Module) -> float:
    start = dict(tiny_model().named_parameters())
    squares = [float((p - start[n]).detach().pow(2).sum()) for n, p in model.named_parameters()]
    return float(sum(squares) ** 0.5)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mu_zero_reproduces_fedavg_bit_for_bit() -> None:
    plain = train({}, proximal=False)
    assert not same_weights(plain, tiny_model())  # training moved the weights
    assert same_weights(train({"proximal_mu": 0.0}, proximal=True), plain)
    assert same_weights(train({"proximal_mu": 0}, proximal=True), plain)
    assert same_weights(train({}, proximal=True), plain)  # absent: μ = 0
    # The comparison would see a difference: the smallest μ that matters changes the weights.
    assert not same_weights(train({"proximal_mu": 1e-3}, proximal=True), plain)


def test_mu_zero_term_is_outside_the_graph() -> None:
    model = tiny_model()
    zero = ProximalTerm(model, 0.0)(model)
    assert zero.shape == () and float(zero) == 0.0
    assert not zero.requires_grad and zero.grad_fn is None
    assert zero.dtype == next(model.parameters()).dtype


def test_larger_mu_ends_closer_to_the_global_model() -> None:
    mus = (0.0, 0.3, 1.0, 3.0)  # lr·μ < 2: the pull is a contraction, not an oscillation
    distances = [distance_to_global(train({"proximal_mu": mu}, proximal=True)) for mu in mus]
    assert distances[0] > 0.05  # FedAvg's local model did move away
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 0.8 * distances[0], distances


def test_value_and_gradient_against_a_hand_computation() -> None:
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    term = ProximalTerm(model, 0.5)  # the global model: w = (1, -2), b = 0.5
    with torch.no_grad():  # a local step moved the weights
        model.weight.copy_(torch.tensor([[1.5, -1.0]]))
        model.bias.copy_(torch.tensor([-0.5]))
    value = term(model)
    # (μ/2)·‖w − w_g‖² = 0.25 · (0.5² + 1² + (−1)²) = 0.25 · 2.25
    assert value.item() == 0.5625
    torch.autograd.backward(value)
    # ∂/∂w = μ·(w − w_g)
    assert model.weight.grad is not None and model.bias.grad is not None
    assert model.weight.grad.tolist() == [[0.25, 0.5]]
    assert model.bias.grad.tolist() == [-0.5]
    # At the global model itself the term and its pull are zero.
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    assert term.term(model).item() == 0.0


def test_the_snapshot_is_not_moved_by_training() -> None:
    model = tiny_model()
    term = ProximalTerm(model, 2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an in-place optimizer step must not drag the anchor along
    count = sum(p.numel() for p in model.parameters())
    assert term(model).item() == pytest.approx(2.0 / 2 * count)


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_a_bad_mu_is_refused_naming_the_key(mu: object) -> None:
    with pytest.raises(ValueError, match=r"\[train\] proximal_mu must be"):
        ProximalTerm.from_params(tiny_model(), {"proximal_mu": mu})


def test_another_model_is_refused() -> None:
    term = ProximalTerm(tiny_model(), 1.0)
    with pytest.raises(ValueError, match="not the ones the proximal term was built from"):
        term(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="has shape"):
        term(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)))


def test_a_silo_bounds_mu_with_train_limits() -> None:
    data = canonical_train_params({"epochs": 1, "proximal_mu": 0.5})
    assert parse_train_params(data, {"proximal_mu": 1.0})["proximal_mu"] == 0.5
    with pytest.raises(TrainParamsError, match=r"\[train_limits\] proximal_mu"):
        parse_train_params(canonical_train_params({"proximal_mu": 2.0}), {"proximal_mu": 1.0})
    with pytest.raises(TrainParamsError, match="outside this silo's limit"):
        parse_train_params(canonical_train_params({"proximal_mu": -1.0}), {"proximal_mu": 1.0})


def test_import_silofed_does_not_load_torch() -> None:
    code = (
        "import sys, silofed\n"
        "assert 'torch' not in sys.modules, 'import silofed loaded torch'\n"
        "from silofed import ProximalTerm\n"
        "assert 'torch' in sys.modules and ProximalTerm.__module__ == 'silofed.proximal'\n"
        "try:\n    silofed.NoSuchThing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('unknown attribute did not raise')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr

"""Plaintext FedAvg is exact: compared with an independent numpy computation (acceptance 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.rounds.fedavg import (
    PLAINTEXT,
    AggregationError,
    PlaintextFedAvg,
    make_aggregation,
)


def _random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(17, 5, generator=gen),
        "b": torch.randn(5, generator=gen).to(torch.float64),
        "h": torch.randn(3, 3, generator=gen).to(torch.float16),
    }


def test_weighted_average_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(3)
    old = _random_state(gen)
    updates = [_random_state(gen) for _ in range(3)]
    weights = [120, 7, 55]
    agg = make_aggregation(PLAINTEXT)
    agg.begin(old)
    for i, (u, n) in enumerate(zip(updates, weights, strict=True)):
        agg.contribute(f"silo-{i}", n, u)
    result = agg.finish()
    assert result.weight_sum == sum(weights)
    assert result.contributors == ("silo-0", "silo-1", "silo-2")
    for name, tensor in old.items():
        expected = tensor.numpy().astype(np.float64) + sum(
            n * u[name].numpy().astype(np.float64) for u, n in zip(updates, weights, strict=True)
        ) / float(sum(weights))
        got = result.new_state[name]
        assert got.dtype == tensor.dtype
        tol = 1e-3 if tensor.dtype == torch.float16 else 1e-6
        assert np.max(np.abs(got.numpy().astype(np.float64) - expected)) <= tol


def test_integer_buffers_are_rounded_back() -> None:
    agg = PlaintextFedAvg()
    agg.begin({"steps": torch.tensor(10, dtype=torch.int64)})
    agg.contribute("a", 1, {"steps": torch.tensor(3, dtype=torch.int64)})
    agg.contribute("b", 1, {"steps": torch.tensor(4, dtype=torch.int64)})
    out = agg.finish().new_state["steps"]
    assert out.dtype == torch.int64 and int(out) == 14  # 10 + 3.5 rounds to even


@pytest.mark.parametrize(
    ("update", "n", "match"),
    [
        ({"w": torch.zeros(2)}, 0, "must be > 0"),
        ({"w": torch.zeros(3)}, 1, "shape"),
        ({"v": torch.zeros(2)}, 1, "does not match the model"),
        ({"w": torch.tensor([1.0, float("nan")])}, 1, "not finite"),
    ],
)
def test_bad_contributions_are_refused_and_not_folded(
    update: dict[str, torch.Tensor], n: int, match: str
) -> None:
    agg = PlaintextFedAvg()
    agg.begin({"w": torch.zeros(2)})
    with pytest.raises(AggregationError, match=match):
        agg.contribute("bad", n, update)
    agg.contribute("good", 2, {"w": torch.ones(2)})
    assert torch.equal(agg.finish().new_state["w"], torch.ones(2))


def test_duplicate_and_empty() -> None:
    agg = PlaintextFedAvg()
    agg.begin({"w": torch.zeros(2)})
    with pytest.raises(AggregationError, match="no contributions"):
        agg.finish()
    agg.contribute("a", 1, {"w": torch.ones(2)})
    with pytest.raises(AggregationError, match="already contributed"):
        agg.contribute("a", 1, {"w": torch.ones(2)})
    unknown = r"must be one of \[.secagg., .plaintext-insecure.\], got .secagg-not-yet."
    with pytest.raises(AggregationError, match=unknown):
        make_aggregation("secagg-not-yet")

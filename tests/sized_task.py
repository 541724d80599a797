"""A task whose model size is a parameter, for tests that need a model of a given size.

Rule: light imports only (silo processes load it by its spec): one flat float32 parameter of
`n` values, so the model the coordinator sends is 4·n bytes (plus the serialisation's header).
Training adds a small step seeded by the silo's index and the round, so rounds change the model,
then sleeps `[train] sleep_s` seconds (0 by default).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch


class SizedTask:
    """One parameter `w` of `n` float32 values; evaluation reports a constant score."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.name = f"sized-{n}"

    @property
    def model_bytes(self) -> int:
        return 4 * self.n

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.register_parameter("w", torch.nn.Parameter(torch.zeros(self.n)))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silofed import TrainResult

        seed = 1000 * int(data.get("silo_index", 0)) + int(params.get("round", 0))
        step = torch.randn(self.n, generator=torch.Generator().manual_seed(seed)) * 1e-3
        with torch.no_grad():
            model.get_parameter("w").add_(step)
        time.sleep(float(params.get("sleep_s", 0.0)))  # [train] sleep_s: a slower silo
        return TrainResult(10, {"loss": 0.0})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {"score": 0.0}


TASK_8MB = SizedTask(2 * 1024 * 1024)  # an 8 MiB model
TASK_3MB = SizedTask(768 * 1024)  # a 3 MiB model: a masked vector travels as 4 chunks

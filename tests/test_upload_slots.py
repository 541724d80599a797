"""P, the masked vectors the coordinator buffers at once: `[secagg] max_concurrent_uploads`
when set, else 2, or 1 for a masked vector of 256 MiB or more (the real `Hub`, which sizes its
buffers from the model it holds)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from coordinator.runtime.uploads import LARGE_VECTOR_BYTES, upload_slots
from tests.hub_harness import make_harness


@pytest.mark.parametrize(
    ("configured", "vector_bytes", "slots"),
    [
        (None, 4 << 20, 2),
        (None, LARGE_VECTOR_BYTES - 1, 2),
        (None, LARGE_VECTOR_BYTES, 1),
        (None, 1 << 40, 1),
        (3, LARGE_VECTOR_BYTES, 3),
        (1, 1, 1),
    ],
)
def test_the_rule(configured: int | None, vector_bytes: int, slots: int) -> None:
    assert upload_slots(configured, vector_bytes) == slots


class _Large(torch.nn.Module):
    """64 Mi float32 parameters: a masked vector (the weight element too) of just over 256 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(LARGE_VECTOR_BYTES // 4))


def test_the_hub_gives_a_large_model_one_upload_buffer_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="silofed"):
        h = make_harness(
            tmp_path,
            min_silos=3,
            aggregation="secagg",
            secagg={"clip_l2": 1.0},
            model_factory=_Large,
        )
    assert h.hub.slots.count == 1
    assert "upload buffers: 1 (a masked vector has 256.0 MiB" in caplog.text


@pytest.mark.parametrize(("secagg", "slots"), [({}, 2), ({"max_concurrent_uploads": 1}, 1)])
def test_a_small_model_gets_two_unless_the_config_says_otherwise(
    tmp_path: Path, secagg: dict[str, int], slots: int
) -> None:
    h = make_harness(tmp_path, min_silos=3, aggregation="secagg", secagg={"clip_l2": 1.0, **secagg})
    assert h.hub.slots.count == slots

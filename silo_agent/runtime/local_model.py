"""The silo's view of model tensors: its own model's layout, the digest of a received model, and
metric naming (the bytes codec both roles share is silofed.tensors).

Rule: shared by both aggregation paths; nothing here does I/O beyond reading the OS's
randomness for a training seed."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from secagg.config import TensorSpec, layout_sha256
from secagg.layout import layout_from
from silofed.task import Task
from silofed.tensors import state_to_bytes


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Metric names under `prefix` (eval_ for the received model, train_ for local training)."""
    return {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in metrics.items()}


def model_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a model's tensors — names (sorted), dtypes, shapes and values — not of a file.

    The differencing guard keys on this: the same tensors re-serialised with other metadata or
    in another order are the same model, so a coordinator cannot make a silo train twice on one
    model by re-encoding it. −0.0 is hashed as +0.0 (the same value to training), and the
    driver refuses tensors whose dtype is not its own model's before hashing, so a dtype change
    cannot make a new digest either."""
    h = hashlib.sha256(b"silofed/model-digest/v1\x00")
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros_like(t), t)  # −0.0 → +0.0
        t = t.contiguous()
        meta = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(meta).to_bytes(4, "big") + meta)
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def layout_differences(state: Mapping[str, torch.Tensor], layout: tuple[TensorSpec, ...]) -> str:
    """'' when `state` has exactly the names, shapes and dtypes of `layout`; else what differs."""
    want = {s.name: (s.shape, s.dtype) for s in layout}
    got = {
        n: (tuple(int(x) for x in t.shape), str(t.dtype).removeprefix("torch."))
        for n, t in state.items()
    }
    if got == want:
        return ""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    changed = sorted(n for n in want.keys() & got.keys() if want[n] != got[n])
    return f"missing {missing[:5]}, unexpected {extra[:5]}, other shape or dtype {changed[:5]}"


def fresh_seed() -> int:
    """The task's `seed` for one round: the silo's own fresh randomness (64 bits), never the
    coordinator's, so a coordinator cannot make a retrained update repeat bit for bit."""
    return int.from_bytes(os.urandom(8), "big")


@dataclass(frozen=True, slots=True)
class LocalModel:
    """What the silo knows of its own model before any round: the layout a secure round must
    have (a layout that is not this model's is refused before anything is allocated for it)
    and the largest model download it accepts."""

    layout: tuple[TensorSpec, ...]
    layout_sha256: bytes
    max_model_bytes: int

    @staticmethod
    def of(task: Task, max_model_bytes: int | None) -> LocalModel:
        state = task.build_model().state_dict()
        layout = layout_from(
            (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
        )
        limit = max_model_bytes or 2 * len(state_to_bytes(state)) + (1 << 20)
        return LocalModel(layout, layout_sha256(layout), limit)

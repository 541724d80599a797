"""silo_agent.secure_session: real SiloSessions behind the driver in a real in-memory round;
masks are precomputed on the background thread and the decoded sum is still exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secagg.config import TensorSpec
from silo_agent.secure_session import SecureSession, SecureSessionError, flatten_update
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import federation


def test_round_through_driver_is_exact_and_masks_precomputed() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 20_000)
    inputs = exact_inputs(cfg, np.random.default_rng(5))
    r = Round(fed, cfg, inputs)
    drivers = {sid: SecureSession(s) for sid, s in r.sessions.items()}
    r.sessions = drivers  # type: ignore[assignment]  # the harness calls the same four methods
    rnd = r.run()
    assert rnd.result is not None and not r.aborts
    assert all(d.precomputed_in_background for d in drivers.values())
    want = np.mean([inputs[s].astype(np.float64) for s in cfg.invited], axis=0)
    assert np.max(np.abs(rnd.result.aggregate.astype(np.float64) - want)) <= 5 / cfg.scale


def test_flatten_update_follows_layout_order() -> None:
    layout = (TensorSpec("b", (2,)), TensorSpec("a", (1, 2)))
    received = {"a": torch.zeros(1, 2), "b": torch.ones(2)}
    trained = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([1.5, 0.5])}
    assert flatten_update(trained, received, layout).tolist() == [0.5, -0.5, 1.0, 2.0]


def test_flatten_update_names_the_wrong_tensor() -> None:
    layout = (TensorSpec("a", (3,)),)
    with pytest.raises(SecureSessionError, match="'a' has shape \\(2,\\)"):
        flatten_update({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, layout)

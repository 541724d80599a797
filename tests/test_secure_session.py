"""silo_agent.runtime.secure_session: real SiloSessions behind the driver in a real in-memory round;
masks are precomputed on the background thread and the decoded sum is still exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secagg.config import TensorSpec
from silo_agent.runtime.secure_session import SecureSession, SecureSessionError, flatten_update
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


def test_silo_deadlines_abort_before_upload_and_erase_after() -> None:
    from secagg.silo import SiloStage
    from silo_agent.runtime.secure_round import overdue

    d = (10, 20, 300, 30, 40)
    # Waiting for M2 (advertise + share_keys deadlines), for M4, and training/uploading.
    assert overdue(SiloStage.ADVERTISED, 59.0, 59.0, d) is None
    assert overdue(SiloStage.ADVERTISED, 61.0, 61.0, d) == "abort"
    assert overdue(SiloStage.SHARED, 41.0, 100.0, d) == "abort"
    assert overdue(SiloStage.KEYS_RECEIVED, 599.0, 700.0, d) is None
    assert overdue(SiloStage.KEYS_RECEIVED, 601.0, 700.0, d) == "abort"
    # Its input committed, the silo keeps waiting until twice the whole round (800 s).
    assert overdue(SiloStage.MASKED_SENT, 700.0, 799.0, d) is None
    assert overdue(SiloStage.SIGNED, 700.0, 801.0, d) == "erase"
    assert overdue(SiloStage.COMPLETED, 1e9, 1e9, d) is None


def test_a_stalled_session_aborts_with_timeout_and_erases() -> None:
    from secagg.errors import AbortReason, ProtocolAbort
    from secagg.silo import SiloStage
    from tests.secagg.harness import MODEL_SHA, NOW

    fed = federation()
    cfg = make_config(fed, 3, 10)
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(1)))
    session = SecureSession(r.sessions[cfg.invited[0]])
    session.handle_offer(cfg.encode(), MODEL_SHA, now=NOW)
    assert session.stage is SiloStage.ADVERTISED
    with pytest.raises(ProtocolAbort) as info:
        session.deadline_passed()
    assert info.value.reason is AbortReason.TIMEOUT
    assert session.stage is SiloStage.ABORTED and session.session.abort_notice is not None

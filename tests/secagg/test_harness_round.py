"""A full round of N silos and a coordinator in memory, with and without dropouts."""

from __future__ import annotations

import numpy as np

from secagg.coordinator import Phase
from secagg.silo import SiloStage
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import federation


def test_full_round_no_dropout_decodes_mean() -> None:
    fed = federation()
    cfg = make_config(fed, 5, 1000)
    inputs = exact_inputs(cfg, np.random.default_rng(1))
    r = Round(fed, cfg, inputs)
    rnd = r.run()
    assert rnd.phase is Phase.DONE, (rnd.abort_reason, rnd.rejected)
    assert rnd.result is not None
    expected = np.mean([inputs[s].astype(np.float64) for s in cfg.invited], axis=0)
    assert rnd.result.aggregate.dtype == np.float32
    np.testing.assert_allclose(rnd.result.aggregate, expected, rtol=1e-6, atol=1e-7)
    assert rnd.result.weight_sum == 5 * cfg.weight_scale
    for sid, session in r.sessions.items():
        assert session.stage is SiloStage.COMPLETED, sid
        assert session.result is not None and session.result.weight_sum == 5 * cfg.weight_scale
        kinds = [type(e).__name__ for e in r.journal[sid]]
        assert kinds == ["RoundAccepted", "MaskedInputRecorded", "SurvivorsRecorded"]

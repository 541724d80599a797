"""Server optimizers survive a coordinator killed in the middle of training (issue 12, acc. 2).

One test per server optimizer: a secure federation (threshold 3, uniform weighting) of three
RECORDING_TASK silos, each recording the update it masked, runs R = 4 completed rounds with the
coordinator stopped twice on the same state directory, the silo agents staying up throughout:

* run 1 completes rounds 1 and 2 and exits (a clean stop);
* run 2 resumes from round 2, and `[debug] pause_after_phase = "checkpoint"` freezes it in its
  first round, round 3, right after that round's model AND optimizer state were written (the
  round log does not record them yet); it is SIGKILLed there;
* run 3 marks round 3 interrupted, resumes from the checkpoint of round 2 (with the optimizer
  state saved beside it, not the orphaned one of round 3) and completes rounds 4 and 5.

The check is the whole trajectory, recomputed OFFLINE as one UNINTERRUPTED run by one optimizer
object: x_r = opt.step(x_{r-1}, x_{r-1} + FedAvg_r, state) from round 0's checkpoint, FedAvg_r
the unweighted mean of the updates round r's survivors recorded. Every completed round's
checkpoint must equal x_r within a tolerance derived below (`_Deviation`); a recomputation whose
state is reset at the restart must miss the checkpoints after it by far more than that (so the
check would catch a restart that lost the state), and so must plain FedAvg (so each method's
steps are non-trivial).

Tolerance. The secure aggregate ḡˢ differs from the exact mean ḡ by at most the quantisation
bound B per coordinate; the coordinator computes x̄ᶜ = fl32(xᶜ + fl32(ḡˢ)), the recomputation
x̄ᵒ = fl32(xᵒ + ḡ). So Δ = x̄ − x (what every method steps on) differs by

    ε ≤ B + 2⁻²³·(|ḡ| + B + |x̄ᵒ| + δx)   (float32 roundings: two on its side, one on ours)

whatever the models' earlier deviation δx: the recorded updates do not depend on the model.
Through one step, with bounds δm, δv on the moments' deviation:

    fedavgm     δm' = μ·δm + ε;                          δstep = η·δm'
    adaptive    δm' = β1·δm + (1−β1)·ε;  δ(Δ²) = (2|Δ| + ε)·ε
        fedadam     δv' = β2·δv + (1−β2)·δ(Δ²)
        fedadagrad  δv' = δv + δ(Δ²)
        fedyogi     δv' = δv + (1−β2)·δ(Δ²), or, where sign(v − Δ²) may differ on the two sides
                    (|v − Δ²| ≤ δv + δ(Δ²)), δv' = δv + (1−β2)·(2Δ² + δ(Δ²))
        δstep = η·(δm'/(√v_lo + τ) + (|m'| + δm')·(√v_hi − √v_lo)/(√v_lo + τ)²),
                v_lo = max(v' − δv', 0), v_hi = v' + δv'   (|a/b − a'/b'| split in m and v)

and δx' = δx + δstep + 2⁻²³·(|x'| + δx + δstep) (each side rounds the new model to float32 once).
These are worst-case bounds per coordinate, evaluated along the recomputed trajectory; the
tolerance is MARGIN = 2 times the bound (the margin covers float64 rounding, 1e-16 relative,
and second-order terms such as 2⁻²⁴·ε). With uniform weighting and clip_l2 = 10, B ≈ 1.4e-8,
below float32's resolution at |x| ~ 1, so float32 rounding dominates: the largest tolerance
is 3e-6 to 8e-6 by round 5, the coordinator's largest measured deviation 0 to 7e-7, and a
recomputation that resets the state at the restart misses rounds 4 and 5 by 8e-3 to 0.15
(FAR = 100 times the tolerance is asserted).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.config import SecAggSettings, ServerOptimizerSettings, WeightingMode
from coordinator.rounds.secure_config import build_round_config, layout_of, quantisation_bound
from coordinator.rounds.server_optimizer import (
    ServerOptimizer,
    ServerOptimizerState,
    build_server_optimizer,
)
from coordinator.storage.checkpoints import CheckpointStore, server_state_name
from coordinator.storage.roundlog import RoundDetail, RoundLog, RoundStatus
from tests.federation_helpers import (
    RECORDING_TASK,
    FederationRun,
    NewFederation,
    Proc,
    to_toml,
)

pytestmark = pytest.mark.e2e

NAMES = ("s1", "s2", "s3")
EXAMPLES = {"s1": 40, "s2": 7, "s3": 13}  # reported, but uniform weighting ignores them
ROUNDS = 4  # completed rounds: 1 and 2 (run 1), 3 interrupted (run 2), 4 and 5 (run 3)
CLIP_L2 = 10.0  # a recorded update's norm is about 0.5: never clipped
SECAGG = {"clip_l2": CLIP_L2, "threshold": 3, "n_colluders": 0, "weighting": "uniform"}
SETTINGS = SecAggSettings(
    clip_l2=CLIP_L2, threshold=3, n_colluders=0, weighting=WeightingMode.UNIFORM
)
# Steps far from FedAvg's (a FedAvg update here is ~0.06 per coordinate): fedavgm's η < 1 so
# that even its first step is not FedAvg's; the adaptive ones move each coordinate by up to ~η.
METHODS: dict[str, dict[str, float]] = {
    "fedavgm": {"lr": 0.7, "momentum": 0.9},
    "fedadam": {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 0.05, "beta1": 0.9, "tau": 1e-3},
}
MARGIN = 2.0
FAR = 100.0  # "far more than the tolerance"
ULP = 2.0**-23  # twice float32's unit roundoff: one rounding on each side
RUN_S = 90.0
_RESUMED = "resuming from the checkpoint of round 2"


# ---- the federation -----------------------------------------------------------------------


def _config(
    run: FederationRun, n: int, method: str, *, rounds: int = ROUNDS, pause: str | None = None
) -> Path:
    """Run `n`'s coordinator config: `rounds` completed rounds, `method`, `[debug]` pause."""
    path = run.coordinator_config(
        f"c{n}.toml",
        rounds=rounds,
        min_silos=3,
        aggregation="secagg",
        secagg=SECAGG,
        offer_s=20.0,
        train_s=20.0,
        deadlines={"share_keys_s": 20.0, "consistency_s": 20.0, "unmask_s": 20.0},
        start_timeout_s=30.0,
    )
    tables: dict[str, Mapping[str, Any]] = {
        "server_optimizer": {"method": method, **METHODS[method]}
    }
    if pause is not None:
        tables["debug"] = {"pause_after_phase": pause}
    with path.open("a") as fh:
        fh.write(to_toml(tables))
    return path


def _exit_code(proc: Proc, run: FederationRun) -> int:
    try:
        return proc.wait(RUN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still runs after {RUN_S:.0f} s\n{run.logs()}")


def _run_with_a_kill(run: FederationRun, method: str) -> Proc:
    """Runs 1-3 as the module docstring says; returns run 3's process."""
    first = run.start_coordinator(_config(run, 1, method, rounds=2), name="coord-1")
    run.start_recording_silos(EXAMPLES, "--serve-forever", allow_plaintext_insecure=False)
    assert _exit_code(first, run) == 0, run.logs()

    paused = run.start_coordinator(_config(run, 2, method, pause="checkpoint"), name="coord-2")
    paused.wait_for_log(r"pause_after_phase = checkpoint: paused", RUN_S)
    marker = run.state / "paused-checkpoint"
    assert marker.exists(), marker
    paused.popen.kill()
    paused.popen.wait(timeout=30)
    marker.unlink()
    # Round 3's model and optimizer state were written before the kill, never recorded.
    assert (run.state / "checkpoints" / server_state_name(3)).exists(), run.logs()

    resumed = run.start_coordinator(_config(run, 3, method), name="coord-3")
    assert _exit_code(resumed, run) == 0, run.logs()
    return resumed


# ---- what the coordinator recorded ----------------------------------------------------------


@dataclass(frozen=True)
class _Recorded:
    """A completed round: its checkpoint, the FedAvg (float64, unweighted mean) of the updates
    its survivors recorded, and the quantisation bound B of its secure aggregate."""

    round_id: int
    checkpoint: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    bound: float


def _recorded(run: FederationRun, details: list[RoundDetail]) -> list[_Recorded]:
    store = CheckpointStore(run.state / "checkpoints")
    layout = layout_of(RECORDING_TASK.build_model().state_dict())
    out = []
    for d in details:
        if d.status is not RoundStatus.COMPLETED:
            continue
        assert d.checkpoint is not None and d.checkpoint.sha256 == d.model_out_sha256, d
        survivors = [s.rsplit("/", 1)[-1] for s in d.participants["finished"]]
        assert sorted(survivors) == sorted(NAMES), (d.round_id, d.participants)
        updates = [torch.load(run.root / "sent" / n / f"round-{d.round_id}.pt") for n in survivors]
        mean = {k: sum(u[k].double() for u in updates) / len(updates) for k in updates[0]}
        config = build_round_config(  # only the settings and the invited count matter
            SETTINGS,
            federation_id="check",
            roster_version=1,
            roster_digest=b"\0" * 32,
            round_id=d.round_id,
            invited=d.participants["invited"],
            model_version=d.round_id - 1,
            model_sha256=b"\0" * 32,
            layout=layout,
            deadlines_s=(60, 60, 60, 60, 60),
        )
        max_abs = max(float(t.abs().max()) for u in updates for t in u.values())
        bound = quantisation_bound(config, [EXAMPLES[n] for n in survivors], max_abs)
        checkpoint = store.load(d.checkpoint.path, d.checkpoint.sha256)
        out.append(_Recorded(d.round_id, checkpoint, mean, bound))
    return out


def _round_zero(run: FederationRun, log: RoundLog) -> dict[str, torch.Tensor]:
    (ck,) = [c for c in log.export()["checkpoints"] if c["round"] == 0]
    store = CheckpointStore(run.state / "checkpoints")
    return store.load(Path(ck["path"]), str(ck["sha256"]))


# ---- the offline recomputation and its tolerance -----------------------------------------------


@dataclass(frozen=True)
class _Deviation:
    """Per-coordinate bounds on |coordinator − recomputation| of one tensor's x, m and v."""

    x: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor

    def step(
        self,
        s: ServerOptimizerSettings,
        eps: torch.Tensor,
        delta: torch.Tensor,
        v_before: torch.Tensor,
        m_after: torch.Tensor,
        v_after: torch.Tensor,
        x_after: torch.Tensor,
    ) -> _Deviation:
        """The bounds after one step whose Δ is off by at most `eps` (the module docstring);
        the other tensors are the recomputation's (float64)."""
        if s.method == "fedavgm":
            dm = s.param("momentum") * self.m + eps
            dv = self.v
            dstep = s.param("lr") * dm
        else:
            beta1, tau = s.param("beta1"), s.param("tau")
            dm = beta1 * self.m + (1 - beta1) * eps
            dd2 = (2 * delta.abs() + eps) * eps
            if s.method == "fedadam":
                dv = s.param("beta2") * self.v + (1 - s.param("beta2")) * dd2
            elif s.method == "fedadagrad":
                dv = self.v + dd2
            else:  # fedyogi: sign(v − Δ²) may differ where v and Δ² are this close
                may_flip = (v_before - delta * delta).abs() <= self.v + dd2
                jump = torch.where(may_flip, 2 * delta * delta + dd2, dd2)
                dv = self.v + (1 - s.param("beta2")) * jump
            lo = (v_after - dv).clamp(min=0).sqrt()
            hi = (v_after + dv).sqrt()
            dstep = s.param("lr") * (
                dm / (lo + tau) + (m_after.abs() + dm) * (hi - lo) / (lo + tau) ** 2
            )
        dx = self.x + dstep + ULP * (x_after.abs() + self.x + dstep)
        return _Deviation(dx, dm, dv)


@dataclass(frozen=True)
class _Step:
    """One recomputed round: the model x_r, the FedAvg result x̄_r it was made from, and the
    tolerance for the coordinator's checkpoint (MARGIN × the deviation bound), by tensor."""

    model: dict[str, torch.Tensor]
    fedavg: dict[str, torch.Tensor]
    tolerance: dict[str, torch.Tensor]


def _recompute(
    opt: ServerOptimizer,
    x0: dict[str, torch.Tensor],
    rounds: list[_Recorded],
    *,
    reset_at: int | None = None,
) -> list[_Step]:
    """x_r = opt.step(x_{r-1}, x_{r-1} + FedAvg_r, state) over `rounds`, one optimizer from
    round 0's checkpoint; with `reset_at`, the state is made afresh before that round."""
    x = x0
    state: ServerOptimizerState = opt.initial_state(x0)
    zero = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in x0.items()}
    dev = {k: _Deviation(zero[k], zero[k], zero[k]) for k in x0}
    steps = []
    for rec in rounds:
        if rec.round_id == reset_at:
            state = opt.initial_state(x)
        fedavg = {k: (t.double() + rec.mean[k]).to(t.dtype) for k, t in x.items()}
        new, after = opt.step(x, fedavg, state)
        for k, t in x.items():
            xbar = fedavg[k].double()
            eps = rec.bound + ULP * (rec.mean[k].abs() + rec.bound + xbar.abs() + dev[k].x)
            dev[k] = dev[k].step(
                opt.settings,
                eps,
                xbar - t.double(),
                state.v.get(k, zero[k]),
                after.m.get(k, zero[k]),
                after.v.get(k, zero[k]),
                new[k].double(),
            )
        steps.append(_Step(new, fedavg, {k: MARGIN * d.x for k, d in dev.items()}))
        x, state = new, after
    return steps


def _max_abs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _tolerance(step: _Step) -> float:
    return max(float(t.max()) for t in step.tolerance.values())


# ---- the test -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_server_optimizer_state_survives_a_coordinator_kill(
    method: str, federation: NewFederation
) -> None:
    run = federation(f"opt{method}", NAMES)
    resumed = _run_with_a_kill(run, method)

    # The restart really happened where it should: round 3 was cut off, round 2's state resumed.
    text = resumed.log()
    assert "rounds [3] were interrupted" in text, text
    assert re.search(rf"{_RESUMED} \(", text), text
    assert "starts afresh" not in text, text
    with RoundLog.open_readonly(run.state / "rounds.sqlite") as log:
        details = [log.round_detail(r.round_id) for r in log.rounds()]
        x0 = _round_zero(run, log)
    assert [d.status.value for d in details] == [
        "completed",
        "completed",
        "interrupted",
        "completed",
        "completed",
    ], run.logs()
    assert details[3].model_in_sha256 == details[1].model_out_sha256
    rounds = _recorded(run, details)
    assert [r.round_id for r in rounds] == [1, 2, 4, 5]

    opt = build_server_optimizer(ServerOptimizerSettings.of(method, **METHODS[method]))
    uninterrupted = _recompute(opt, x0, rounds)
    reset = _recompute(opt, x0, rounds, reset_at=4)  # what a restart that lost the state does
    worst = 0.0
    for rec, step, lost in zip(rounds, uninterrupted, reset, strict=True):
        for k, bound in step.tolerance.items():
            off = (rec.checkpoint[k].double() - step.model[k].double()).abs()
            assert bool((off <= bound).all()), (method, rec.round_id, k, float((off - bound).max()))
        deviation = _max_abs(rec.checkpoint, step.model)
        worst = max(worst, deviation)
        tol = _tolerance(step)
        # Each method's step is far from plain FedAvg's, in every round.
        assert _max_abs(rec.checkpoint, step.fedavg) > FAR * tol, (method, rec.round_id)
        if rec.round_id >= 4:  # the check can fail: lost state is caught
            missed = _max_abs(rec.checkpoint, lost.model)
            assert missed > FAR * tol, (method, rec.round_id, missed, tol)
            print(
                f"{method} round {rec.round_id}: tolerance {tol:.3g}, deviation "
                f"{deviation:.3g}, reset-state deviation {missed:.3g}"
            )
    print(f"{method}: max deviation over rounds 1, 2, 4, 5: {worst:.3g}")

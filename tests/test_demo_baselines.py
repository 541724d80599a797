"""Acceptance: on the demo's shipped split and budget, federation pays off.

The demo's baseline computation (examples.digits.baselines, the code `make demo` prints its last
two lines with) runs on the demo's own split, rounds and [train] table. The federated model is
simulated in process: plain FedAvg over the same silos with the task's own train, each silo
counted equally as the demo's secure aggregation does (`weighting = "uniform"`), each silo
shuffling with its own seed every round as the agent does. Asserted: federated beats the best
single silo (chosen on its own validation split) by more than 0.10 and is within 0.03 of
centralized training, all on the held-out test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from examples.digits import baselines, demo
from examples.digits.task import TASK


def fedavg(rounds: int, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Round r: every silo trains the global model once, then the plain mean of their states."""
    options = {"num_silos": len(demo.SILOS), "classes_per_silo": demo.CLASSES_PER_SILO}
    datas = [TASK.load_data({**options, "silo_index": i}) for i in range(len(demo.SILOS))]
    global_state = TASK.build_model().state_dict()
    for round_id in range(1, rounds + 1):
        states = []
        for index, data in enumerate(datas):
            model = TASK.build_model()
            model.load_state_dict(global_state)
            seed = 7919 * round_id + index  # the agent's fresh per-round seed, made repeatable
            TASK.train(model, data, {**params, "round": round_id, "seed": seed})
            states.append(model.state_dict())
        global_state = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    return global_state


def test_federation_beats_every_silo_alone_and_matches_centralized() -> None:
    federated = baselines.heldout_accuracy(fedavg(demo.ROUNDS, demo.TRAIN))
    reference = baselines.compute(demo.ROUNDS, demo.TRAIN, len(demo.SILOS), demo.CLASSES_PER_SILO)
    print(*baselines.silos_lines(reference, demo.SILOS), sep="\n")
    print(baselines.summary_line(federated, reference))
    initial = baselines.heldout_accuracy(TASK.build_model().state_dict())
    assert initial < 0.2  # the accuracy is learned, not in the initial weights
    assert federated > reference.best_single + 0.10
    assert abs(federated - reference.centralized) <= 0.03
    # Each silo alone is good on its own 4 digits and poor on all ten: the split's point.
    assert all(s.validation > 0.9 and s.heldout < 0.5 for s in reference.alone)


def test_best_single_silo_is_chosen_on_own_validation_not_on_the_test_set() -> None:
    alone = (
        baselines.SiloAlone(validation=0.90, heldout=0.60),
        baselines.SiloAlone(validation=0.95, heldout=0.40),
        baselines.SiloAlone(validation=0.95, heldout=0.45),
    )
    result = baselines.Baselines(centralized=0.99, alone=alone)
    assert result.best_index == 1  # highest validation; the tie goes to the lower index
    assert result.best_single == 0.40  # not 0.60, the best held-out figure
    assert result.mean_single == pytest.approx(1.45 / 3)
    assert result.worst_single == 0.40
    assert baselines.summary_line(0.981, result) == (
        "federated accuracy: 0.981 (centralized: 0.990, best single silo: 0.400)"
    )
    each, spread = baselines.silos_lines(result, ("a", "b", "c"))
    assert each.endswith("a 0.600 / 0.900, b 0.400 / 0.950, c 0.450 / 0.950")
    assert spread.endswith("mean 0.483, worst 0.400, best by own validation b 0.400")
    with pytest.raises(ValueError, match="2 names for 3 silos"):
        baselines.silos_lines(result, ("a", "b"))
    with pytest.raises(ValueError, match="at least one silo"):
        baselines.Baselines(centralized=0.5, alone=())


def test_baseline_budget_follows_the_federations_rounds() -> None:
    # Training "like the federation" for 2 rounds is round 1 then round 2 of the task's own
    # train (round 2 with the decayed lr), not one call with twice the epochs.
    data = TASK.load_data({"silo_index": 0})
    params = {**demo.TRAIN, "seed": 3}
    ours = TASK.build_model()
    baselines.train_like_federation(ours, data.train, 2, params)
    by_round = TASK.build_model()
    for round_id in (1, 2):
        TASK.train(by_round, data, {**params, "round": round_id})
    assert all(
        torch.equal(a, b)
        for a, b in zip(ours.state_dict().values(), by_round.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        baselines.train_like_federation(ours, data.train, 0, params)

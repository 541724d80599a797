"""Which round kind a round is, and how it is built from the coordinator's configuration.

Rule: the one place that tells the kinds apart. `build_round` returns a `RoundKind` ready for
`start`, or `CannotStart` when the round cannot be configured (a secure round with too few
invited silos for the threshold, a model whose tensors have no secure layout, and the like):
the driver records that as a round started and aborted (CANNOT_CONFIGURE). Pure: the caller
passes the trust anchors, the global state, the model's digest and size, and `now`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import torch

from coordinator.config import CoordinatorConfig
from coordinator.rounds.fedavg import make_aggregation
from coordinator.rounds.kind import CannotStart, RoundKind
from coordinator.rounds.phases import RoundId
from coordinator.rounds.plaintext import PlaintextRound
from coordinator.rounds.secure import PHASE_DEADLINE_KEYS, SecureKind
from coordinator.rounds.secure_config import (
    SECAGG,
    SecureRoundError,
    build_round_config,
    layout_of,
)
from secagg.errors import ConfigError
from secagg.train_params import canonical_train_params
from secagg.trust import Trust

CANNOT_CONFIGURE = "CANNOT_CONFIGURE"


def build_round(
    config: CoordinatorConfig,
    trust: Trust,
    global_state: Mapping[str, torch.Tensor],
    round_id: RoundId,
    invited: Sequence[str],
    *,
    model_sha256: bytes,
    model_bytes: int,
    now: float,
    dp_rounds_before: int = 0,
) -> RoundKind | CannotStart:
    """Round `round_id` of the configured aggregation over `invited`, offering the model of
    `model_bytes` bytes with digest `model_sha256`. `dp_rounds_before`: the private rounds the
    round log holds (the privacy accounting composes them)."""
    d = config.deadlines
    if config.rounds.aggregation != SECAGG:
        return PlaintextRound(
            round_id,
            make_aggregation(config.rounds.aggregation, config.plaintext),
            global_state,
            deadlines_s={k: float(v) for k, v in dataclasses.asdict(d).items()},
            min_silos=config.rounds.min_silos,
            model_bytes=model_bytes,
            offer_config=json.dumps({"aggregation": config.rounds.aggregation}).encode(),
            train_params_json=canonical_train_params(config.train).decode(),
        )
    settings = config.secagg
    try:
        if settings is None:  # the config loader requires [secagg] for secagg
            raise SecureRoundError("[secagg] is missing from the configuration")
        round_config = build_round_config(
            settings,
            federation_id=config.federation_id,
            roster_version=trust.roster.version,
            roster_digest=trust.roster.digest(),
            round_id=round_id,
            invited=invited,
            model_version=round_id - 1,
            model_sha256=model_sha256,
            layout=layout_of(global_state),
            deadlines_s=(
                whole_s(d.offer_s),
                whole_s(d.share_keys_s),
                whole_s(d.train_s),
                whole_s(d.consistency_s),
                whole_s(d.unmask_s),
            ),
            # Inside the signed configuration: every silo checks that all others trained
            # with the same parameters (the consistency digest covers the config).
            train_params=canonical_train_params(config.train),
            roster_size=len(trust.roster.entries),
        )
    except (SecureRoundError, ConfigError) as exc:  # ConfigError: RoundConfig's own checks
        return CannotStart(f"{CANNOT_CONFIGURE}: {exc}")
    return SecureKind(
        round_config,
        trust,
        {k: float(getattr(d, k)) for k in PHASE_DEADLINE_KEYS.values()},
        global_state,
        now=now,
        dp_rounds_before=dp_rounds_before,
    )


def whole_s(seconds: float) -> int:
    """A deadline as whole seconds for the round config (silos time out a little later)."""
    return max(1, math.ceil(seconds))

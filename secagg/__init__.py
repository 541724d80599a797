"""secagg/v1: pairwise-masking secure aggregation as pure state machines (no I/O).

The two roles are `SiloSession` (secagg.silo) and `CoordinatorRound` (secagg.coordinator); the
drivers in `silo_agent` and `coordinator` feed them bytes, the time and randomness, and send
what they return. docs/secagg-protocol.md describes the protocol and its threat model.
"""

from secagg.config import RoundConfig
from secagg.coordinator import CoordinatorRound
from secagg.errors import AbortReason, ProtocolAbort, SecAggError
from secagg.silo import SiloPolicy, SiloSession
from secagg.trust import SiloIdentity, Trust

__all__ = [
    "AbortReason",
    "CoordinatorRound",
    "ProtocolAbort",
    "RoundConfig",
    "SecAggError",
    "SiloIdentity",
    "SiloPolicy",
    "SiloSession",
    "Trust",
]

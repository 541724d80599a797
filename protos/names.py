"""The names configuration files, round logs and ledgers use for the wire's enums, both ways.

Rule: the wire carries enums (federation.proto); the names below are what humans and stored
records use ("secagg", "completed", ...). Each side converts here, at the wire, so neither
hard-codes a literal of the other's representation.
"""

from __future__ import annotations

from collections.abc import Mapping

from protos import federation_pb2 as pb

SECAGG = "secagg"
PLAINTEXT_INSECURE = "plaintext-insecure"
EVALUATE = "evaluate"
COMPLETED = "completed"
ABORTED = "aborted"

AGGREGATION: Mapping[str, pb.Aggregation.ValueType] = {
    SECAGG: pb.AGGREGATION_SECAGG,
    PLAINTEXT_INSECURE: pb.AGGREGATION_PLAINTEXT_INSECURE,
    EVALUATE: pb.AGGREGATION_EVALUATE,
}
_AGGREGATION_NAME: dict[int, str] = {value: name for name, value in AGGREGATION.items()}

STATUS: Mapping[str, pb.RoundStatus.ValueType] = {
    COMPLETED: pb.ROUND_STATUS_COMPLETED,
    ABORTED: pb.ROUND_STATUS_ABORTED,
}


def aggregation_name(value: int) -> str:
    """The stored name of a wire Aggregation; an unknown value reads as its number (refused by
    whoever expects one of the names)."""
    return _AGGREGATION_NAME.get(value, f"unknown aggregation {value}")


def aggregation_value(name: str) -> pb.Aggregation.ValueType:
    """The wire value of a configured aggregation name. Raises KeyError for any other name."""
    return AGGREGATION[name]

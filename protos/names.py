"""The names configuration files, round logs and ledgers use for the wire's enums, both ways.

Rule: the wire carries enums (federation.proto); the names below are what humans and stored
records use ("secagg", "completed", "TIMEOUT", ...). Each side converts here, at the wire, so
neither hard-codes a literal of the other's representation. Reading a value never raises: a
number from a newer peer reads as a name that says it is unknown.
"""

from __future__ import annotations

import re
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


# An abort code's stored name is its enum name without the prefix, so the names of codes 1-20
# are secagg.errors.AbortReason's own ("THRESHOLD_VIOLATION").
_ABORT_PREFIX = "ABORT_REASON_"
ABORT: Mapping[str, pb.AbortReason.ValueType] = {
    name.removeprefix(_ABORT_PREFIX): value
    for name, value in pb.AbortReason.items()
    if value != pb.ABORT_REASON_UNSPECIFIED
}
_ABORT_NAME: dict[int, str] = {value: name for name, value in ABORT.items()}
UNSPECIFIED = "UNSPECIFIED"
_LEADING_CODE = re.compile(r"([A-Z][A-Z0-9_]*)\b")


def abort_name(code: int) -> str:
    """The stored name of a wire AbortReason ("TIMEOUT"): "UNSPECIFIED" for 0, "UNKNOWN(n)" for
    a number this version does not know (a newer peer's code). Never raises."""
    if code == pb.ABORT_REASON_UNSPECIFIED:
        return UNSPECIFIED
    return _ABORT_NAME.get(code, f"UNKNOWN({code})")


def abort_value(name: str) -> pb.AbortReason.ValueType:
    """The wire value of an abort code's name ("TIMEOUT"). Raises KeyError for any other name,
    "UNSPECIFIED" included (nobody sends that on purpose)."""
    return ABORT[name]


def abort_code_in(sentence: str) -> pb.AbortReason.ValueType:
    """The code a round's abort sentence starts with ("CANNOT_CONFIGURE: [secagg] threshold
    ..." -> CANNOT_CONFIGURE); UNSPECIFIED when its first word names no code (e.g. "only 1 silos
    left in phase train, need 2")."""
    found = _LEADING_CODE.match(sentence)
    if found is None:
        return pb.ABORT_REASON_UNSPECIFIED
    return ABORT.get(found.group(1), pb.ABORT_REASON_UNSPECIFIED)

"""protos.names: the wire's abort codes and the names stored records use, both ways.

The codes of the secure-aggregation protocol travel in two places, the byte of a secagg
AbortNotice frame and the AbortReason of a gRPC AbortNotice: the numbers and names must be
the same. A number from a newer peer must read as a name, never raise.
"""

from __future__ import annotations

import pytest

from protos import federation_pb2 as pb
from protos.names import ABORT, abort_code_in, abort_name, abort_value
from secagg.errors import AbortReason

# Every code the runtime sends or stores as the first word of a round's abort sentence
# (coordinator DropReason, hub, recorder, round kinds; silo runner, rounds, final model).
RUNTIME_CODES = (
    "DISCONNECTED",
    "INVALID",
    "DECLINED",
    "TRAINING_FAILED",
    "MODEL_TOO_LARGE",
    "FEDERATION_FINISHED",
    "COORDINATOR_STOPPING",
    "NOT_THE_FINAL_MODEL",
    "EVALUATION_FAILED",
    "NOT_ENOUGH_SILOS",
    "CANNOT_CONFIGURE",
    "AGGREGATE_OUT_OF_BOUND",
    "NON_FINITE_MODEL",
)


@pytest.mark.parametrize("reason", list(AbortReason), ids=lambda r: r.name)
def test_every_secagg_code_has_the_same_number_and_name_on_the_wire(reason: AbortReason) -> None:
    assert abort_value(reason.name) == reason.value
    assert abort_name(reason.value) == reason.name
    assert pb.AbortReason.Name(reason.value) == f"ABORT_REASON_{reason.name}"  # type: ignore[arg-type]


def test_the_wire_has_no_secagg_number_secagg_lacks() -> None:
    """Below 100 every wire code is secagg's, so a new secagg code cannot collide with one."""
    below = {value for value in ABORT.values() if value < 100}
    assert below == {r.value for r in AbortReason}


@pytest.mark.parametrize("name", RUNTIME_CODES)
def test_runtime_codes_round_trip_from_100_up(name: str) -> None:
    value = abort_value(name)
    assert value >= 100
    assert abort_name(value) == name


def test_names_and_values_are_one_to_one() -> None:
    assert len(set(ABORT.values())) == len(ABORT)
    assert all(abort_value(abort_name(v)) == v for v in ABORT.values())
    assert "UNSPECIFIED" not in ABORT


@pytest.mark.parametrize("code", [99, 113, 2**31 - 1, -1])
def test_an_unknown_number_reads_as_unknown_and_never_raises(code: int) -> None:
    assert abort_name(code) == f"UNKNOWN({code})"


def test_unspecified_reads_as_its_name_and_is_no_value() -> None:
    assert abort_name(pb.ABORT_REASON_UNSPECIFIED) == "UNSPECIFIED"
    with pytest.raises(KeyError):
        abort_value("UNSPECIFIED")
    with pytest.raises(KeyError):
        abort_value("HARNESS_ABORT")


@pytest.mark.parametrize(
    ("sentence", "name"),
    [
        ("CANNOT_CONFIGURE: [secagg] threshold 5 is outside [3, 3]", "CANNOT_CONFIGURE"),
        ("NOT_ENOUGH_SILOS: 1 silos connected, 2 needed", "NOT_ENOUGH_SILOS"),
        ("THRESHOLD_VIOLATION in phase advertise", "THRESHOLD_VIOLATION"),
        ("OVERFLOW_RULE", "OVERFLOW_RULE"),
        ("AGGREGATE_OUT_OF_BOUND: norm 3 > bound 2", "AGGREGATE_OUT_OF_BOUND"),
        ("only 1 silos left in phase train, need 2", "UNSPECIFIED"),
        ("the coordinator is stopping (in phase masked)", "UNSPECIFIED"),
        ("TIMEOUTS are not a code", "UNSPECIFIED"),
        ("HARNESS_ABORT", "UNSPECIFIED"),
        ("", "UNSPECIFIED"),
    ],
)
def test_the_code_a_round_sentence_starts_with(sentence: str, name: str) -> None:
    assert abort_name(abort_code_in(sentence)) == name

"""Upload grants across versions, end to end: a coordinator with ONE upload buffer runs secure
rounds for silo agents of wire 1.0 (which send their chunks at once and wait in gRPC flow
control) and of this build (which wait at home for their grant), as separate processes over
mTLS. Every round completes with every silo: neither kind waits for the other's way."""

from __future__ import annotations

import pytest

from silofed import wire
from tests.federation_helpers import (
    WEIGHTED_SECAGG,
    WEIGHTED_SILO,
    NewFederation,
    completed_round_details,
)

# An agent from before upload grants: it announces 1.0 and never waits for a grant, whatever the
# Welcome says (a build of then would not even read the field).
BEFORE_GRANTS = """
import runpy, sys
from silofed import wire
wire.WIRE_VERSION = wire.WireVersion(1, 0)
wire.speaks_upload_grants = lambda announced: False
sys.argv = ["silo_agent", *sys.argv[1:]]
runpy.run_module("silo_agent", run_name="__main__", alter_sys=True)
"""

pytestmark = pytest.mark.e2e

FED = "grantse2e"
NAMES = ("a", "b", "c", "d")
OLD = ("a", "b")  # agents of wire 1.0: before upload grants
ROUNDS = 3


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def test_silos_of_wire_1_0_and_1_1_share_one_upload_buffer(federation: NewFederation) -> None:
    run = federation(FED, NAMES)
    cfg = run.coordinator_config(
        rounds=ROUNDS,
        min_silos=4,
        aggregation="secagg",
        secagg={**WEIGHTED_SECAGG, "max_concurrent_uploads": 1},
        offer_s=30.0,
        train_s=30.0,
    )
    coordinator = run.start_coordinator(cfg)
    silos = {}
    before_grants = wire.WireVersion(1, 0)
    assert before_grants < wire.UPLOAD_GRANTS
    for name in NAMES:
        toml = run.recording_silo_config(name, 10 + NAMES.index(name), **WEIGHTED_SILO)
        if name in OLD:
            argv = ["-c", BEFORE_GRANTS, "run", "--config", str(toml)]
            silos[name] = run.procs.start(f"silo-{name}", argv)
        else:
            silos[name] = run.procs.silo(name, toml)
    assert coordinator.wait(180) == 0, run.logs()
    for name, proc in silos.items():
        assert proc.wait(30) == 0, (name, run.logs())

    log = coordinator.log()
    for name in OLD:  # admitted as the older minor they are
        assert f"{_id(name)} speaks wire version {before_grants}" in log, log
    for name in NAMES:
        if name not in OLD:
            assert f"{_id(name)} speaks wire version" not in log  # this build's own
    for detail in completed_round_details(run.state, ROUNDS):
        assert sorted(detail.participants["finished"]) == [_id(n) for n in NAMES], detail
        assert not detail.dropouts, detail.dropouts

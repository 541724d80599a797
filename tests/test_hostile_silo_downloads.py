"""A member that never reads cannot keep the model from the others (issue 14, download slots).

The coordinator runs in this process (hub + gRPC server over mTLS on loopback, as `serve` builds
it) with `[server] max_concurrent_downloads = 1`, three honest silo agents as real processes, and
a raw gRPC client with an enrolled certificate that says hello and never reads its stream
(tests/test_hostile_silo_flow.py:RawMember). The idle member is made to take the only download
slot first (the honest streams wait until it holds it), so the honest silos get the model only
if the coordinator takes the slot back: after `[deadlines] upload_progress_s` without a chunk it
does, cancels the idle member's stream, and both rounds complete.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest

from coordinator.runtime.downloads import Holder
from coordinator.runtime.serve import Outcome
from tests.federation_helpers import (
    coordinator_in_process,
    processes,
    provision,
    write_coordinator_config,
)
from tests.test_hostile_silo_flow import HONEST, SECAGG, Run, raw_members

pytestmark = pytest.mark.e2e

TASK = "tests.sized_task:TASK_3MB"  # a 3 MiB model: far past an idle reader's flow-control window


def test_a_member_that_never_reads_cannot_keep_the_only_download_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="silofed")
    fed = provision(tmp_path / "fed", "downloads", [*HONEST, "idle"])
    state = tmp_path / "coord"
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        fed,
        state_dir=state,
        task_spec=TASK,
        rounds=2,
        min_silos=3,
        start_silos=4,
        offer_s=30.0,
        train_s=60.0,
        aggregation="secagg",
        secagg=SECAGG,
        deadlines={"upload_progress_s": 3.0},
    )
    text = config.read_text()
    assert "[server]\n" in text
    config.write_text(text.replace("[server]\n", "[server]\nmax_concurrent_downloads = 1\n"))
    with (
        processes(tmp_path / "logs") as procs,
        coordinator_in_process(config) as coordinator,
    ):
        run = Run(fed, state, coordinator, procs)
        slots = run.hub.downloads
        assert slots.count == 1
        with raw_members(fed, ["idle"], coordinator.port, reads=False) as (idle,):
            run.wait_connected(["idle"], 10)
            # The schedule under test: the idle member holds the slot before anyone else asks.
            take = slots.acquire
            idle_holds = threading.Event()

            def idle_first(holder: Holder, total_bytes: int, wait_s: float) -> bool:
                if holder.silo_id != idle.silo_id and not idle_holds.is_set():
                    idle_holds.wait(wait_s)  # the stream asks again (SiloStream._wait_for_slot)
                    return False
                taken = take(holder, total_bytes, wait_s)
                if taken and holder.silo_id == idle.silo_id:
                    idle_holds.set()
                return taken

            monkeypatch.setattr(slots, "acquire", idle_first)
            done = run.start_rounds()
            run.start_honest(TASK)
            assert done.wait(120), run.procs.logs()
            assert run.outcome == [Outcome.FINISHED], run.procs.logs()
            assert idle_holds.is_set()
            assert idle.silo_id not in run.hub.sessions
            # Cancelled by the coordinator (the member itself never ended it).
            assert idle.ended(10) is grpc.StatusCode.CANCELLED
        details = run.details()

    assert [d.status.value for d in details] == ["completed", "completed"]
    drops = {d.round_id: {x.silo_id: (x.phase, x.reason) for x in d.dropouts} for d in details}
    assert drops == {1: {idle.silo_id: ("advertise", "DISCONNECTED")}, 2: {}}
    assert idle.silo_id not in details[1].participants["invited"]
    assert slots.evicted == 1 and slots.holders == [] and slots.waiting == []
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{idle.silo_id}: download stalled: no chunk taken for" in messages

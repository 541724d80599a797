"""The final model end to end: a coordinator and 3 silo processes over mTLS, secure aggregation.

The federation runs its 2 rounds; then the coordinator has every silo evaluate the final model
(round 2's) and records it in the round log as the final evaluation, which is no round: the log
still counts 2, and each silo's ledger still agrees with the export. The silo whose policy is
`keep_final_model = true` holds the model, byte for byte round 2's checkpoint, with its digest;
the others hold nothing. Then, as after a coordinator killed during that evaluation, the
evaluation is removed from the log and the coordinator restarted: it runs it again (and no
round) and exits 0; the silos, still up (`--serve-forever`), answer with the same figures
without evaluating again.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.storage.roundlog import RoundLog
from silo_agent.storage.ledger_verify import read_ledger, verify
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    Processes,
    processes,
    provision,
    write_coordinator_config,
    write_recording_silo_config,
)

pytestmark = pytest.mark.e2e

FED = "fin"
NAMES = ("s1", "s2", "s3")
KEEPER = "s1"


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def _free_port() -> int:
    # Fixed for the run: the restarted coordinator must listen where the silos dial again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_silos(procs: Processes, tmp_path: Path, fed: Federation, port: int) -> None:
    for i, name in enumerate(NAMES):
        toml = write_recording_silo_config(
            tmp_path / f"{name}.toml",
            fed,
            name,
            port=port,
            num_examples=10 + i,
            record_root=tmp_path / "r",
            allow_plaintext_insecure=False,
            # this hospital's policy: keep the federation's final model
            keep_final_model=name == KEEPER,
        )
        # Up for good: they wait for the coordinator's next run instead of exiting.
        procs.silo(name, toml, "--serve-forever")


def test_final_evaluation_and_the_kept_final_model(tmp_path: Path) -> None:
    started = time.monotonic()
    fed = provision(tmp_path / "fed", FED, NAMES)
    state = tmp_path / "coord"
    port = _free_port()
    cfg = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=state,
        task_spec=RECORDING_SPEC,
        rounds=2,
        min_silos=3,
        aggregation="secagg",
        secagg={"clip_l2": 100.0},
        offer_s=20.0,
        train_s=20.0,
        listen=f"127.0.0.1:{port}",
    )
    with processes(tmp_path / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        _start_silos(procs, tmp_path, fed, port)
        assert coordinator.wait(90) == 0, procs.logs()
        first_run = time.monotonic() - started
        final, checkpoint = _check_the_final_evaluation(state, fed)

        # A coordinator stopped during the final evaluation left none in the log: a restart
        # runs it, and only it, then exits 0.
        conn = sqlite3.connect(state / "rounds.sqlite")
        with conn:
            conn.execute("DELETE FROM final_evaluations")
        conn.close()
        restarted = procs.start(
            "coordinator-2", ["-m", "coordinator", "serve", "--config", str(cfg)]
        )
        assert restarted.wait(60) == 0, procs.logs()
        with RoundLog.open_readonly(state / "rounds.sqlite") as log:
            assert [r.round_id for r in log.rounds()] == [1, 2]
            again = log.final_evaluation(2)
        assert again is not None, procs.logs()
        assert again.answered == final.answered and again.silo_metrics == final.silo_metrics
        for silo in procs.procs[1:4]:
            # Evaluated once per model: asked again, the same figures, not a second evaluation.
            silo.wait_for_log("already evaluated", 10)
            assert silo.log().count("final evaluation of round 2's model:") == 2, silo.log()

    kept = fed.silos[KEEPER].dir / "state" / "final-model.safetensors"
    digest = hashlib.sha256(kept.read_bytes()).hexdigest()
    assert digest == final.model_sha256
    assert kept.read_bytes() == checkpoint.read_bytes()
    assert (kept.parent / "final-model.sha256").read_text() == f"{digest}  {kept.name}\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    for name in NAMES:
        if name != KEEPER:
            assert not (fed.silos[name].dir / "state" / "final-model.safetensors").exists()
            assert not (fed.silos[name].dir / "state" / "final-model.sha256").exists()
    print(f"final model e2e: first run {first_run:.1f} s, all {time.monotonic() - started:.1f} s")


def _check_the_final_evaluation(state: Path, fed: Any) -> tuple[Any, Path]:
    with RoundLog.open_readonly(state / "rounds.sqlite") as log:
        rounds = [(r.round_id, r.status.value) for r in log.rounds()]
        assert rounds == [(1, "completed"), (2, "completed")]
        last = log.round_detail(2)
        final = log.final_evaluation(2)
        export = json.loads(json.dumps(log.export(), allow_nan=False))
    assert last.checkpoint is not None and final is not None
    assert final.model_sha256 == last.model_out_sha256 == last.checkpoint.sha256
    everyone = tuple(_id(n) for n in NAMES)
    assert final.asked == final.answered == everyone and not final.refusals
    # RecordingTask scores any model with its silo's index: each silo's own answer is there.
    assert {s: dict(m) for s, m in final.silo_metrics.items()} == {
        _id(n): {"eval_score": float(i)} for i, n in enumerate(NAMES)
    }
    assert final.global_metrics == {"eval_score": pytest.approx(1.0)}
    assert last.ended_at is not None and final.started_at >= last.ended_at
    assert export["rounds"][1]["final_evaluation"]["answered"] == list(everyone)

    # Not a round: every silo's ledger lists the evaluation's report, and still agrees.
    for name in NAMES:
        entries = read_ledger(fed.silos[name].dir / "state" / "ledger.jsonl")
        finals = [e for e in entries if e.round_id == 2 and e.aggregation == "evaluate"]
        assert [e.message for e in finals] == ["TrainReport"], name
        assert finals[0].details["num_examples"] == 0
        assert finals[0].details["update_sha256"] is None
        assert verify(entries, export, _id(name)) == [], name
    return final, last.checkpoint.path

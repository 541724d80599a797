"""Roster rotation end to end: a silo re-enrolls mid-federation and nobody else lifts a finger.

Four silo processes and a coordinator process over mTLS on loopback, secure aggregation (t = 3),
three rounds, and every round needs all four silos connected to start. Silo c leaves after round
1 (`--rounds 1`) and re-enrolls: a new key and CSR (`silo_agent.enroll`), signed by the
federation CA with the coordinator's own `sign` command, which pins the new key in roster version
5 and signs it. c restarts with its new certificate and roster — the scenario's one operator step.
a, b and d still pin version 4: they receive version 5 over the stream, check the CA's signature,
adopt it (a log line and a ledger line each) and the federation completes its rounds, the last
one with c's new identity, each new model equal to FedAvg of its round's survivors within
coordinator.secure_round.quantisation_bound.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator import pki
from coordinator.checkpoints import CheckpointStore
from coordinator.cli import main as coordinator_cli
from coordinator.roundlog import CheckpointRecord, RoundLog
from coordinator.secure_round import (
    SecAggSettings,
    build_round_config,
    layout_of,
    quantisation_bound,
)
from secagg.identity import Roster
from silo_agent.enroll import generate_key_and_csr
from silo_agent.ledger import LEDGER_FILENAME, read_ledger
from silo_agent.roster_update import backup_path
from tests.federation_helpers import (
    RECORDING_SPEC,
    RECORDING_TASK,
    Federation,
    Proc,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e

FED = "rot"
NAMES = ("a", "b", "c", "d")
EXAMPLES = {"a": 31, "b": 7, "c": 19, "d": 40}
SECAGG = {"clip_l2": 100.0, "threshold": 3, "n_colluders": 1, "weight_max": 40}
ROUNDS = 3


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def _reenroll(fed: Federation, name: str) -> Roster:
    """What silo `name`'s operator and the federation operator do: a new key and CSR on the
    silo's machine, signed with `silofed-coordinator sign` (pins it one roster version up)."""
    silo = fed.silos[name]
    csr = generate_key_and_csr(silo.dir, FED, name, force=True)
    argv = ["sign", "--dir", str(fed.root), "--csr", str(csr), "--out", str(silo.cert)]
    assert coordinator_cli(argv) == 0
    # Handed to the silo with its certificate: the federation's new roster (and its signature).
    pki.write_public(
        pki.roster_signature_path(silo.roster), pki.roster_signature_path(fed.roster).read_bytes()
    )
    pki.write_public(silo.roster, fed.roster.read_bytes())
    return Roster.from_json(fed.roster.read_text())


def test_a_reenrolled_silo_comes_back_and_the_others_adopt_the_signed_roster(
    tmp_path: Path,
) -> None:
    fed = provision(tmp_path / "fed", FED, NAMES)
    assert Roster.from_json(fed.roster.read_text()).version == 4
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=state,
        task_spec=RECORDING_SPEC,
        rounds=ROUNDS,
        min_silos=4,  # every round waits for all four: the last ones need c's new identity
        aggregation="secagg",
        secagg=SECAGG,
        offer_s=30.0,
        train_s=30.0,
        start_timeout_s=60.0,
    )
    with processes(tmp_path / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        port = wait_for_port(state, coordinator)

        def start(name: str, run: int, *extra: str) -> Proc:
            toml = write_silo_config(
                tmp_path / f"{name}-{run}.toml",
                fed.silos[name],
                port=port,
                task_spec=RECORDING_SPEC,
                options={
                    "silo_index": NAMES.index(name),
                    "num_examples": EXAMPLES[name],
                    "record_dir": str(tmp_path / "sent" / name),
                },
                allow_plaintext_insecure=False,
            )
            return procs.silo(f"{name}-{run}", toml, *extra)

        silos = {
            name: start(name, 0, *(("--rounds", "1") if name == "c" else ())) for name in NAMES
        }
        assert silos["c"].wait(90) == 0, procs.logs()  # c took part in round 1 and left
        new_roster = _reenroll(fed, "c")
        assert new_roster.version == 5
        silos["c"] = start("c", 1)
        assert coordinator.wait(120) == 0, procs.logs()
        for name, proc in silos.items():
            assert proc.wait(30) == 0, (name, procs.logs())
        logs = {name: proc.log() for name, proc in silos.items()}

    # The coordinator's round log: every round completed, none refused for the roster.
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    store = CheckpointStore(state / "checkpoints")
    try:
        rounds = log.rounds()
        assert [r.status.value for r in rounds] == ["completed"] * ROUNDS, [
            (r.round_id, r.status.value, r.abort_reason) for r in rounds
        ]
        last = log.round_detail(ROUNDS)
        assert sorted(last.participants["finished"]) == [_id(n) for n in NAMES]
        for r in rounds:
            survivors = [
                s.rsplit("/", 1)[-1] for s in log.round_detail(r.round_id).participants["finished"]
            ]
            _check_fedavg(log, store, tmp_path, r.round_id, survivors)
    finally:
        log.close()

    # a, b and d adopted version 5 by themselves: a log line, a ledger line, the file, a backup.
    for name in ("a", "b", "d"):
        silo = fed.silos[name]
        assert "adopted roster version 5 (was 4): added 0, changed 1, removed 0" in logs[name]
        adopted = [
            e
            for e in read_ledger(silo.dir / "state" / LEDGER_FILENAME)
            if e.message == "RosterAdopted"
        ]
        assert len(adopted) == 1, name
        details = adopted[0].details
        assert (details["from_version"], details["to_version"]) == (4, 5)
        assert details["to_digest"] == new_roster.digest().hex()
        assert details["changed"] == [_id("c")]
        assert silo.roster.read_bytes() == fed.roster.read_bytes()
        assert Roster.from_json(backup_path(silo.roster, 4).read_text()).version == 4
    assert "ROSTER_MISMATCH" not in "".join(logs.values())


def _check_fedavg(
    log: RoundLog, store: CheckpointStore, tmp_path: Path, round_id: int, survivors: list[str]
) -> None:
    """The new model against old + example-weighted mean of the survivors' recorded updates."""
    detail = log.round_detail(round_id)
    old_record = _checkpoint_by_sha(log, detail.model_in_sha256)
    old = store.load(old_record.path, old_record.sha256)
    assert detail.checkpoint is not None
    new = store.load(detail.checkpoint.path, detail.checkpoint.sha256)
    deltas = {n: torch.load(tmp_path / "sent" / n / f"round-{round_id}.pt") for n in survivors}
    total = float(sum(EXAMPLES[n] for n in survivors))
    max_abs = max(float(t.abs().max()) for d in deltas.values() for t in d.values())
    config = build_round_config(
        SecAggSettings(clip_l2=100.0, threshold=3, n_colluders=1, weight_max=40),
        federation_id=FED,
        roster_version=1,
        roster_digest=b"\0" * 32,
        round_id=round_id,
        invited=detail.participants["invited"],
        model_version=round_id - 1,
        model_sha256=b"\0" * 32,
        layout=layout_of(RECORDING_TASK.build_model().state_dict()),
        deadlines_s=(30, 30, 30, 30, 30),
    )
    bound = quantisation_bound(config, [EXAMPLES[n] for n in survivors], max_abs)
    for key, tensor in old.items():
        mean = sum(EXAMPLES[n] * deltas[n][key].double().numpy() for n in survivors) / total
        expected = tensor.double().numpy() + mean
        err = float(np.max(np.abs(new[key].double().numpy() - expected)))
        ulp = float(np.max(np.abs(expected))) * 2.0**-23  # the model is stored in float32
        assert err <= bound + ulp, (round_id, key, err, bound)
    assert detail.weight_sum == pytest.approx(total, rel=0.01)


def _checkpoint_by_sha(log: RoundLog, sha: str | None) -> CheckpointRecord:
    conn = sqlite3.connect(log.path)
    try:
        row = conn.execute(
            "SELECT round_id, path, sha256 FROM checkpoints WHERE sha256=? ORDER BY round_id",
            (sha,),
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, sha
    return CheckpointRecord(int(row[0]), Path(row[1]), str(row[2]))

"""Roster rotation end to end: a silo re-enrolls mid-federation and nobody else lifts a finger.

Four silo processes and a coordinator process over mTLS on loopback, secure aggregation (t = 3),
three rounds, and every round needs all four silos connected to start. Silo c leaves after round
1 (`--rounds 1`) and re-enrolls: a new key and CSR (`silo_agent.pki.enrollment`), signed by the
federation CA with the coordinator's own `sign` command, which pins the new key in roster version
5 and signs it. c restarts with its new certificate and roster — the scenario's one operator step.
a, b and d still pin version 4: they receive version 5 over the stream, check the CA's signature,
adopt it (a log line and a ledger line each) and the federation completes its rounds, the last
one with c's new identity, each new model equal to FedAvg of its round's survivors within
coordinator.rounds.secure_config.quantisation_bound.
"""

from __future__ import annotations

import pytest

from coordinator.cli import main as coordinator_cli
from coordinator.pki import authority as pki
from coordinator.rounds.secure_config import SecAggSettings, WeightingMode
from secagg.identity import Roster
from silo_agent.pki.enrollment import generate_key_and_csr
from silo_agent.pki.roster_update import backup_path
from silo_agent.storage.ledger import LEDGER_FILENAME
from silo_agent.storage.ledger_verify import read_ledger
from tests.federation_helpers import (
    WEIGHTED_SECAGG,
    WEIGHTED_SILO,
    Federation,
    NewFederation,
    Proc,
    check_fedavg,
    completed_round_details,
)

pytestmark = pytest.mark.e2e

FED = "rot"
NAMES = ("a", "b", "c", "d")
EXAMPLES = {"a": 31, "b": 7, "c": 19, "d": 40}
# Example weighting (WEIGHTED_SECAGG): the silos opt in (start), the check uses each silo's
# count. SETTINGS is that [secagg] as the coordinator reads it (to rebuild each round's
# configuration and its bound).
SETTINGS = SecAggSettings(**{**WEIGHTED_SECAGG, "weighting": WeightingMode.EXAMPLES})
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
    federation: NewFederation,
) -> None:
    run = federation(FED, NAMES)
    tmp_path, fed, state = run.root, run.fed, run.state
    assert Roster.from_json(fed.roster.read_text()).version == 4
    # Every round waits for all four: the last ones need c's new identity.
    cfg = run.weighted_secure_config(rounds=ROUNDS, min_silos=4)
    procs = run.procs
    coordinator = run.start_coordinator(cfg)

    def start(name: str, number: int, *extra: str) -> Proc:
        examples = {name: EXAMPLES[name]}  # recorded under tmp_path / "sent"
        return run.start_recording_silos(examples, *extra, run=number, **WEIGHTED_SILO)[name]

    silos = {name: start(name, 0, *(("--rounds", "1") if name == "c" else ())) for name in NAMES}
    assert silos["c"].wait(90) == 0, procs.logs()  # c took part in round 1 and left
    new_roster = _reenroll(fed, "c")
    assert new_roster.version == 5
    silos["c"] = start("c", 1)
    assert coordinator.wait(120) == 0, procs.logs()
    for name, proc in silos.items():
        assert proc.wait(30) == 0, (name, procs.logs())
    logs = {name: proc.log() for name, proc in silos.items()}

    # The coordinator's round log: every round completed, none refused for the roster.
    rounds = completed_round_details(state, ROUNDS)
    assert sorted(rounds[-1].participants["finished"]) == [_id(n) for n in NAMES]
    for detail in rounds:
        check_fedavg(
            state, detail, examples=EXAMPLES, record_root=tmp_path / "sent", settings=SETTINGS
        )

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

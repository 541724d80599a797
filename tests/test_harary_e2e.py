"""A sparse (Harary) graph end to end: a coordinator process with `[secagg] graph = "harary"` and
nine silo processes that opted in (`allow_sparse_graph = true`), over mTLS on loopback.

Nine members: the silos' default collusion floor is n_C = ⌊8/3⌋ = 2, so the coordinator's
default threshold is t = ⌊(9 + 2)/2⌋ + 1 = 6 and its rule (secagg.graph_params, δ = 0.05,
D = 1) gives k = 4 < n − 1 = 8 with t_k = 4. One silo is frozen right after its masked upload
(`[debug] pause_after_phase = "masked"`) and SIGKILLed: its self-mask seed is rebuilt from its
four neighbours' shares, and the round completes. Every silo's ledger shows its encrypted
shares went to four ring neighbours only (the graph was sparse), and the new model equals the
example-weighted FedAvg of the survivors' recorded updates within the quantisation bound.
"""

from __future__ import annotations

from collections import deque

import pytest

from coordinator.config import GraphMode, SecAggSettings, WeightingMode
from coordinator.storage.roundlog import RoundLog, RoundStatus
from silo_agent.storage.ledger_verify import read_ledger
from tests.federation_helpers import (
    NewFederation,
    Proc,
    check_fedavg,
    write_recording_silo_config,
)

pytestmark = pytest.mark.e2e

NAMES = tuple(f"s{i}" for i in range(1, 10))
EXAMPLES = {name: 5 + 7 * i for i, name in enumerate(NAMES)}
VICTIM = "s5"
DEGREE = 4  # the rule's k for 9 silos, n_C = 2, δ = 0.05
SECAGG = {"clip_l2": 100.0, "weighting": "examples", "weight_max": 100, "graph": "harary"}
# SECAGG as the coordinator reads it (to rebuild the round's configuration and its bound).
SETTINGS = SecAggSettings(
    clip_l2=100.0, weighting=WeightingMode.EXAMPLES, weight_max=100, graph=GraphMode.HARARY
)
WAIT_S = 120.0  # an upper bound for a wait; the whole test takes well under a minute


def _silo_id(name: str) -> str:
    return f"spiffe://harary/silo/{name}"


def test_a_sparse_round_survives_a_silo_killed_after_its_upload(
    federation: NewFederation,
) -> None:
    run = federation("harary", NAMES)
    coordinator = run.start_coordinator(
        run.coordinator_config(
            rounds=1,
            min_silos=len(NAMES),  # the round invites all nine
            aggregation="secagg",
            secagg=SECAGG,
            offer_s=60.0,
            train_s=60.0,
            start_timeout_s=WAIT_S,
        )
    )
    silos: dict[str, Proc] = {}
    for name in NAMES:
        pause = {"pause_after_phase": "masked", "pause_in_round": 1} if name == VICTIM else {}
        toml = write_recording_silo_config(
            run.root / f"silo-{name}.toml",
            run.fed,
            name,
            port=run.port,
            num_examples=EXAMPLES[name],
            record_root=run.root / "sent",
            allow_plaintext_insecure=False,
            allow_example_weighting=True,
            **pause,
        )
        # The sparse-graph opt-in (the helper writes the other [secagg] keys).
        text = toml.read_text()
        assert text.count("[secagg]\n") == 1
        toml.write_text(text.replace("[secagg]\n", "[secagg]\nallow_sparse_graph = true\n"))
        silos[name] = run.procs.silo(name, toml)

    victim = silos[VICTIM]
    victim.wait_for_log(r"pause_after_phase = masked: paused", WAIT_S)
    marker = run.fed.silos[VICTIM].dir / "state" / "paused-masked"
    assert marker.exists(), marker
    victim.popen.kill()  # SIGKILL: no goodbye on the stream
    victim.popen.wait(timeout=30)
    assert coordinator.wait(WAIT_S) == 0, run.logs()

    log = RoundLog.open_readonly(run.state / "rounds.sqlite")
    try:
        detail = log.round_detail(1)
    finally:
        log.close()
    assert detail.status is RoundStatus.COMPLETED, (detail.abort_reason, run.logs())
    sets = detail.participants
    everyone = {_silo_id(n) for n in NAMES}
    assert set(sets["invited"]) == set(sets["U3"]) == set(sets["finished"]) == everyone
    assert _silo_id(VICTIM) not in sets["U4"] and _silo_id(VICTIM) not in sets["U5"]
    # (listed as a dropout only when its loss shows after the masked phase closed)
    assert {d.silo_id for d in detail.dropouts} <= {_silo_id(VICTIM)}, detail.dropouts

    # The graph was sparse: each silo's ShareKeys, as its own ledger recorded it when it left,
    # carried encrypted shares for four ring neighbours, not for all eight others.
    shared_with: dict[str, set[str]] = {}
    for name in NAMES:
        entries = read_ledger(run.fed.silos[name].dir / "state" / "ledger.jsonl")
        share_keys = [e for e in entries if e.round_id == 1 and e.message.endswith("ShareKeys)")]
        assert len(share_keys) == 1, (name, [e.message for e in entries])
        shared_with[_silo_id(name)] = set(share_keys[0].details["encrypted_shares_for"])
    n = len(NAMES)
    assert all(len(peers) == DEGREE < n - 1 for peers in shared_with.values()), shared_with
    for silo, peers in shared_with.items():  # a symmetric, connected ring of degree k
        assert silo not in peers and all(silo in shared_with[p] for p in peers), shared_with
    seen, todo = {_silo_id(NAMES[0])}, deque([_silo_id(NAMES[0])])
    while todo:  # bounded: each silo is queued once
        for peer in shared_with[todo.popleft()] - seen:
            seen.add(peer)
            todo.append(peer)
    assert seen == everyone

    # The new model: old + the example-weighted mean of all nine recorded updates (the victim's
    # input is in the sum: it was uploaded before the kill).
    check_fedavg(
        run.state,
        detail,
        examples=EXAMPLES,
        record_root=run.root / "sent",
        settings=SETTINGS,
        invited=sorted(everyone),
    )
    for name, proc in silos.items():
        if name != VICTIM:
            assert proc.wait(WAIT_S) == 0, run.logs()

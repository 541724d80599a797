"""Renewal end to end (issue 13, acceptance 3): a silo whose certificate is about to expire
renews it over its own connection and keeps taking part in secure rounds; nobody else notices.

A coordinator process (`[pki] auto_renew = true`, signing with the dev federation's CA) and
four silo processes over mTLS on loopback, secure aggregation (t = 3): the first round waits for
all four, later ones need three (a round offered while a reconnects goes on without it). Silo a
starts with a certificate for its enrolled key that expires in two days and
`[pki] renew_before_days = 10`: at its first connection it asks for a renewal (rpc Renew), installs
the certificate it gets and reconnects after the round in progress to present it. Once a has
installed it, the test revokes a's OLD certificate: a connection with it would be refused, so
every later round that a completes proves the renewed certificate works — for the coordinator's
admission and for the other silos, which check a's signed messages against their pinned roster.
The roster file, its version and the silos' pinned copies do not change.
"""

from __future__ import annotations

import pytest
from cryptography import x509

from coordinator.cli import main as coordinator_cli
from secagg.identity import spki_sha256
from tests.federation_helpers import (
    RENEW_BEFORE_10_DAYS,
    WEIGHTED_SILO,
    NewFederation,
    auto_renew_table,
    completed_round_details,
    reissue_expiring,
    with_table,
)

pytestmark = pytest.mark.e2e

FED = "renewe2e"
NAMES = ("a", "b", "c", "d")
EXAMPLES = {"a": 11, "b": 7, "c": 19, "d": 30}
ROUNDS = 6  # the renewal happens in the first rounds; the last ones show a back


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def test_a_silo_renews_over_its_connection_and_keeps_taking_part(
    federation: NewFederation,
) -> None:
    run = federation(FED, NAMES)
    fed = run.fed
    a = fed.silos["a"]
    old = reissue_expiring(fed, "a")  # a's certificate, for its enrolled key, about to expire
    roster_before = fed.roster.read_bytes()
    pinned_before = {n: fed.silos[n].roster.read_bytes() for n in NAMES}
    key_before = a.key.read_bytes()

    # Every round starts with all four connected: a, reconnecting with its renewed certificate,
    # can miss only a round that began before its old stream closed.
    cfg = run.weighted_secure_config(rounds=ROUNDS, min_silos=4, start_silos=4)
    coordinator = run.start_coordinator(with_table(cfg, auto_renew_table(fed.ca_cert, fed.ca_key)))
    silos = {}
    for name in NAMES:
        toml = run.recording_silo_config(name, EXAMPLES[name], **WEIGHTED_SILO)
        if name == "a":
            with_table(toml, RENEW_BEFORE_10_DAYS)
        silos[name] = run.procs.silo(name, toml)

    silos["a"].wait_for_log(r"installed the renewed certificate", 90)
    # From now on the old certificate is refused: a must use the renewed one to reconnect.
    argv = ["revoke", "--dir", str(fed.root), "--serial", f"{old.serial_number:x}"]
    assert coordinator_cli([*argv, "--reason", "superseded by renewal"]) == 0

    assert coordinator.wait(180) == 0, run.logs()
    for name, proc in silos.items():
        assert proc.wait(30) == 0, (name, run.logs())
    a_log, c_log = silos["a"].log(), coordinator.log()

    # Every round completed; a took part in the first (old certificate) and, after its
    # reconnection with the renewed one, in the last. It reconnects right after a round's
    # result, and the coordinator may have begun the next round before its old stream closed:
    # a may miss that one round, never more (no round starts without it).
    rounds = completed_round_details(run.state, ROUNDS)
    assert sorted(rounds[0].participants["finished"]) == [_id(n) for n in NAMES]
    assert sorted(rounds[-1].participants["finished"]) == [_id(n) for n in NAMES]
    missed = [r.round_id for r in rounds if _id("a") not in r.participants["finished"]]
    assert len(missed) <= 1, missed
    for r in rounds:  # the others never left
        assert {_id(n) for n in NAMES if n != "a"} <= set(r.participants["finished"]), r
    assert "reconnecting to present the renewed certificate" in a_log
    assert c_log.count(f"silo connected: {_id('a')}") >= 2, c_log
    assert f"renewed the certificate of {_id('a')} (same key, roster unchanged)" in c_log
    assert f"the certificate of {_id('a')} expires in" in c_log  # the expiry warning
    assert "PERMISSION_DENIED" not in a_log  # never presented the revoked certificate

    # a holds the renewed certificate, for the same key; the key file was not touched.
    new = x509.load_pem_x509_certificate(a.cert.read_bytes())
    assert new.serial_number != old.serial_number
    assert spki_sha256(new) == spki_sha256(old)
    assert new.not_valid_after_utc > old.not_valid_after_utc
    assert a.key.read_bytes() == key_before
    # No roster change anywhere: the same file at the coordinator and at every silo.
    assert fed.roster.read_bytes() == roster_before
    for name in NAMES:
        assert fed.silos[name].roster.read_bytes() == pinned_before[name], name
        assert not list(fed.silos[name].roster.parent.glob("roster.json.v*")), name
        assert "adopted roster" not in silos[name].log(), name
    assert "ROSTER_MISMATCH" not in run.logs()

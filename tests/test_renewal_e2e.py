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

import datetime as dt

import pytest
from cryptography import x509

from coordinator.cli import main as coordinator_cli
from coordinator.pki import authority as pki
from coordinator.storage.roundlog import RoundLog
from secagg.identity import spki_sha256
from tests.federation_helpers import NewFederation, write_recording_silo_config

pytestmark = pytest.mark.e2e

FED = "renewe2e"
NAMES = ("a", "b", "c", "d")
EXAMPLES = {"a": 11, "b": 7, "c": 19, "d": 30}
SECAGG = {
    "clip_l2": 100.0,
    "threshold": 3,
    "n_colluders": 1,
    "weight_max": 40,
    "weighting": "examples",
}
ROUNDS = 4


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def test_a_silo_renews_over_its_connection_and_keeps_taking_part(
    federation: NewFederation,
) -> None:
    run = federation(FED, NAMES)
    fed, state = run.fed, run.state
    a = fed.silos["a"]
    now = dt.datetime.now(dt.UTC)
    # a's certificate, for its enrolled key, about to expire (issued by the test).
    ca = pki.load_ca(fed.root, FED)
    a.cert.write_bytes(
        pki.sign_csr(
            ca,
            (a.dir / "silo.csr").read_bytes(),
            federation_id=FED,
            now=now,
            not_before=now - dt.timedelta(days=28),
            not_after=now + dt.timedelta(days=2),
        )
    )
    old = x509.load_pem_x509_certificate(a.cert.read_bytes())
    roster_before = fed.roster.read_bytes()
    pinned_before = {n: fed.silos[n].roster.read_bytes() for n in NAMES}
    key_before = a.key.read_bytes()

    cfg = run.coordinator_config(
        rounds=ROUNDS,
        min_silos=3,
        start_silos=4,
        aggregation="secagg",
        secagg=SECAGG,
        offer_s=30.0,
        train_s=30.0,
        start_timeout_s=60.0,
    )
    cfg.write_text(
        cfg.read_text()
        + f'\n[pki]\nauto_renew = true\nissuing_cert = "{fed.ca_cert}"\n'
        + f'issuing_key = "{fed.ca_key}"\nrenew_valid_days = 30\n'
    )
    coordinator = run.start_coordinator(cfg)
    silos = {}
    for name in NAMES:
        toml = write_recording_silo_config(
            run.root / f"silo-{name}.toml",
            fed,
            name,
            port=run.port,
            num_examples=EXAMPLES[name],
            record_root=run.root / "sent",
            allow_plaintext_insecure=False,
            allow_example_weighting=True,
        )
        if name == "a":
            toml.write_text(toml.read_text() + "\n[pki]\nrenew_before_days = 10\n")
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
    # reconnection with the renewed one, in the last.
    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        rounds = [log.round_detail(r.round_id) for r in log.rounds()]
    finally:
        log.close()
    assert [r.status.value for r in rounds] == ["completed"] * ROUNDS, [
        (r.round_id, r.status.value, r.abort_reason) for r in rounds
    ]
    assert sorted(rounds[0].participants["finished"]) == [_id(n) for n in NAMES]
    assert sorted(rounds[-1].participants["finished"]) == [_id(n) for n in NAMES]
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

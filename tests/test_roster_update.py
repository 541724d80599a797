"""Signing rosters (coordinator.pki.authority, the `sign` and `sign-roster` commands) and a silo
adopting
or refusing a delivered roster (silo_agent.pki.roster_update), on real files.

Each test provisions its own federation; a "re-enrollment" is a new key and CSR signed by the
federation CA through `coordinator.pki.authority`, which pins the new key one roster version up.
"""

from __future__ import annotations

import datetime as dt
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.cli import main as coordinator_cli
from coordinator.pki import authority as pki
from protos import federation_pb2 as pb
from secagg.identity import Roster, spki_sha256
from secagg.roster_sig import roster_signature_valid, sign_roster
from silo_agent.config import ConfigError, SiloConfig, load_silo_config
from silo_agent.pki.enrollment import generate_key_and_csr
from silo_agent.pki.roster_update import backup_path, offered_path, on_roster_update, signature_path
from silo_agent.storage.ledger import LEDGER_FILENAME
from silo_agent.storage.ledger_verify import read_ledger
from tests.federation_helpers import (
    RECORDING_SPEC,
    SiloFiles,
    provision,
    write_silo_config,
)

NOW = dt.datetime.now(dt.UTC)
FED = "rup"


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def reenroll(fed_dir: Path, silo_dir: Path, name: str) -> Roster:
    """A new key and certificate for silo `name` in `silo_dir`; the federation roster pins it,
    signed, one version up (what `silofed-silo enroll --force` + `silofed-coordinator sign` do)."""
    ca = pki.load_ca(fed_dir, FED)
    csr = generate_key_and_csr(silo_dir, FED, name, force=True)
    cert_pem = pki.sign_csr(ca, csr.read_bytes(), federation_id=FED, now=NOW)
    pki.write_public(silo_dir / "silo.pem", cert_pem)
    return pki.add_to_roster(fed_dir / pki.ROSTER_FILE, cert_pem, ca=ca)


def _update(fed_roster: Path) -> pb.RosterUpdate:
    return pb.RosterUpdate(
        roster_json=fed_roster.read_bytes(),
        signature=pki.roster_signature_path(fed_roster).read_bytes(),
    )


def _config(tmp_path: Path, fed_silo: SiloFiles, *, mode: str | None = None) -> SiloConfig:
    path = write_silo_config(tmp_path / "silo.toml", fed_silo, port=1, task_spec=RECORDING_SPEC)
    if mode is not None:
        path.write_text(path.read_text().replace("[tls]\n", f'[tls]\nroster_updates = "{mode}"\n'))
    return load_silo_config(path)


def test_pki_signs_every_roster_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = pki.provision_dev(tmp_path / "fed", FED, ["a", "b"], now=NOW)
    ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    signed = pki.load_signed_roster(fed.roster, ca_cert)
    assert signed.problem is None and signed.roster.version == 2
    after = reenroll(fed.dir, tmp_path / "site-b", "b")
    signed = pki.load_signed_roster(fed.roster, ca_cert)
    assert signed.problem is None and signed.roster == after and after.version == 3
    # Unsigned write (no CA at hand): the stale signature goes, and the reason is given.
    pki.write_roster(fed.roster, after.with_silo(next(iter(after.entries)), b"\1" * 32), None)
    assert not pki.roster_signature_path(fed.roster).exists()
    assert "is missing" in (pki.load_signed_roster(fed.roster, ca_cert).problem or "")
    # A hand edit keeps the old signature: it no longer verifies until `sign-roster`.
    pki.sign_roster_file(fed.roster, pki.load_ca(fed.dir, FED))
    fed.roster.write_text(fed.roster.read_text().replace('"version": 4', '"version": 5'))
    assert "does not verify" in (pki.load_signed_roster(fed.roster, ca_cert).problem or "")
    assert coordinator_cli(["sign-roster", "--dir", str(fed.dir)]) == 0
    assert "signed roster version 5" in capsys.readouterr().out
    assert pki.load_signed_roster(fed.roster, ca_cert).problem is None


def test_sign_command_signs_the_roster_it_updates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = pki.provision_dev(tmp_path / "fed", FED, ["a"], now=NOW)
    site = tmp_path / "site"
    csr = generate_key_and_csr(site, FED, "b")
    argv = ["sign", "--dir", str(fed.dir), "--csr", str(csr), "--out", str(site / "silo.pem")]
    assert coordinator_cli(argv) == 0
    assert "roster signed by the CA" in capsys.readouterr().out
    data = fed.roster.read_bytes()
    assert Roster.from_json(data.decode()).version == 2
    ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    assert roster_signature_valid(ca_cert, data, pki.roster_signature_path(fed.roster).read_bytes())


def test_a_signed_newer_roster_is_adopted_backed_up_logged_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = provision(tmp_path / "fed", FED, ["a", "b", "c"])
    silo = fed.silos["a"]
    before = silo.roster.read_bytes()
    reenroll(fed.root, tmp_path / "site-c", "c")
    config = _config(tmp_path, silo)
    caplog.set_level(logging.INFO, logger="silofed.silo")

    change = on_roster_update(config, _update(fed.roster), clock=lambda: 1234.5)

    assert change is not None and change.changed == (_id("c"),)
    assert silo.roster.read_bytes() == fed.roster.read_bytes()
    assert (
        signature_path(silo.roster).read_bytes()
        == pki.roster_signature_path(fed.roster).read_bytes()
    )
    assert backup_path(silo.roster, 3).read_bytes() == before
    assert stat.S_IMODE(silo.roster.stat().st_mode) == 0o644
    assert "adopted roster version 4 (was 3): added 0, changed 1, removed 0" in caplog.text
    entries = read_ledger(config.state_dir / LEDGER_FILENAME)
    assert [e.message for e in entries] == ["RosterAdopted"]
    line = entries[0]
    assert line.at == 1234.5 and line.round_id == 0
    assert line.details["from_version"] == 3 and line.details["to_version"] == 4
    assert line.details["to_digest"] == Roster.from_json(fed.roster.read_text()).digest().hex()
    assert line.details["changed"] == [_id("c")] and line.details["added"] == []
    # The same roster again (e.g. on reconnect) changes nothing and records nothing.
    assert on_roster_update(config, _update(fed.roster), clock=lambda: 2.0) is None
    assert len(read_ledger(config.state_dir / LEDGER_FILENAME)) == 1


def test_manual_mode_keeps_the_pinned_roster_and_saves_the_offer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = provision(tmp_path / "fed", FED, ["a", "b", "c"])
    silo = fed.silos["a"]
    before = silo.roster.read_bytes()
    reenroll(fed.root, tmp_path / "site-c", "c")
    config = _config(tmp_path, silo, mode="manual")
    assert config.tls.roster_updates == "manual"

    assert on_roster_update(config, _update(fed.roster), clock=lambda: 1.0) is None

    assert silo.roster.read_bytes() == before
    assert offered_path(silo.roster).read_bytes() == fed.roster.read_bytes()
    assert 'roster_updates = "manual"' in caplog.text and "keeps v3" in caplog.text
    assert not (config.state_dir / LEDGER_FILENAME).exists()


@pytest.mark.parametrize("case", ["forged", "rekeyed_self", "replayed_old"])
def test_refused_rosters_leave_the_pinned_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    fed = provision(tmp_path / "fed", FED, ["a", "b", "c"])
    silo = fed.silos["a"]
    config = _config(tmp_path, silo)
    old_update = _update(fed.roster)
    if case == "forged":  # a coordinator that is not the CA holder adds a member
        roster = Roster.from_json(fed.roster.read_text()).with_silo(_id("mallory"), b"\7" * 32)
        data = pki.roster_bytes(roster)
        update = pb.RosterUpdate(
            roster_json=data, signature=sign_roster(ec.generate_private_key(ec.SECP256R1()), data)
        )
    elif case == "rekeyed_self":  # this silo was re-enrolled elsewhere: adopting would lock it out
        reenroll(fed.root, tmp_path / "site-a", "a")
        update = _update(fed.roster)
    else:  # first adopt v4, then get the (validly signed) v3 again
        reenroll(fed.root, tmp_path / "site-c", "c")
        assert on_roster_update(config, _update(fed.roster), clock=lambda: 1.0) is not None
        update = old_update
    pinned = silo.roster.read_bytes()

    assert on_roster_update(config, update, clock=lambda: 2.0) is None

    assert silo.roster.read_bytes() == pinned
    expected = {
        "forged": "not signed by this silo's pinned federation CA",
        "rekeyed_self": "re-enroll",
        "replayed_old": "not newer than the pinned roster",
    }[case]
    assert expected in caplog.text
    own_pin = spki_sha256(x509.load_pem_x509_certificate(silo.cert.read_bytes()))
    assert Roster.from_json(pinned.decode()).entries[_id("a")] == own_pin


def test_roster_updates_accepts_only_signed_or_manual(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", FED, ["a"])
    assert _config(tmp_path, fed.silos["a"]).tls.roster_updates == "signed"
    with pytest.raises(ConfigError, match="roster_updates"):
        _config(tmp_path, fed.silos["a"], mode="automatic")

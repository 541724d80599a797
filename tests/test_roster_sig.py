"""Signed rosters (secagg.roster_sig): the CA's signature and the rule a silo adopts by.

Every key and certificate is made here; the rosters are the files `coordinator.pki.authority`
writes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.pki import authority as pki
from secagg.identity import Roster, SiloId
from secagg.roster_sig import (
    DOMAIN,
    RosterRefusal,
    RosterUpdateRefused,
    check_update,
    diff,
    roster_mismatch_detail,
    roster_signature_valid,
    sign_roster,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
FED = "rfed"


def _id(name: str) -> SiloId:
    return SiloId(f"spiffe://{FED}/silo/{name}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> pki.DevFederation:
    return pki.provision_dev(tmp_path_factory.mktemp("fed"), FED, ["a", "b", "c"], now=NOW)


def _ca(world: pki.DevFederation) -> pki.CA:
    return pki.load_ca(world.dir, FED)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _rekeyed(roster: Roster, name: str) -> Roster:
    """`roster` one version up with silo `name` pinned to a fresh key (a re-enrollment)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return roster.with_silo(_id(name), hashlib.sha256(spki).digest())


def _signed(world: pki.DevFederation, roster: Roster) -> tuple[bytes, bytes]:
    data = pki.roster_bytes(roster)
    return data, sign_roster(_ca(world).key, data)


def test_provisioned_rosters_carry_a_valid_ca_signature(world: pki.DevFederation) -> None:
    ca = _cert(world.ca_cert)
    for roster_path in [world.roster, *(p.roster for p in world.silos.values())]:
        data = roster_path.read_bytes()
        signature = pki.roster_signature_path(roster_path).read_bytes()
        assert roster_signature_valid(ca, data, signature), roster_path
        # The signature covers the exact bytes: one changed byte (a space) breaks it.
        assert not roster_signature_valid(ca, data.replace(b": ", b":  ", 1), signature)
    # Domain separated: the same key's plain signature over the bytes is not a roster signature.
    data = world.roster.read_bytes()
    plain = _ca(world).key.sign(data, ec.ECDSA(hashes.SHA256()))
    assert not roster_signature_valid(ca, data, plain)
    assert roster_signature_valid(
        ca, data, _ca(world).key.sign(DOMAIN + data, ec.ECDSA(hashes.SHA256()))
    )


def test_a_newer_ca_signed_roster_is_accepted_with_its_changes(world: pki.DevFederation) -> None:
    pinned = pki.load_roster(world.roster)
    new = _rekeyed(pinned, "c")
    new = Roster(new.federation_id, new.version, {**new.entries, _id("d"): b"\x07" * 32})
    data, signature = _signed(world, new)
    change = check_update(
        pinned, data, signature, ca_cert=_cert(world.ca_cert), own_cert=_cert(world.silos["a"].cert)
    )
    assert change.new == new and change.old == pinned
    assert (change.added, change.changed, change.removed) == ((_id("d"),), (_id("c"),), ())
    assert change.summary() == "added 1, changed 1, removed 0"
    assert change.to_dict()["to_digest"] == new.digest().hex()


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("tampered", RosterRefusal.BAD_SIGNATURE),
        ("wrong_key", RosterRefusal.BAD_SIGNATURE),
        ("not_json", RosterRefusal.NOT_A_ROSTER),
        ("wrong_federation", RosterRefusal.WRONG_FEDERATION),
        ("same_version", RosterRefusal.NOT_NEWER),
        ("lower_version", RosterRefusal.NOT_NEWER),
        ("silo_removed", RosterRefusal.SILO_REMOVED),
        ("silo_rekeyed", RosterRefusal.SILO_KEY_CHANGED),
    ],
)
def test_refusals(world: pki.DevFederation, case: str, refusal: RosterRefusal) -> None:
    pinned = pki.load_roster(world.roster)
    ca_key = _ca(world).key
    newer = _rekeyed(pinned, "c")
    data, signature = _signed(world, newer)
    if case == "tampered":
        data = data.replace(b'"version": ', b'"version": 1', 1)  # a much higher version
    elif case == "wrong_key":
        signature = sign_roster(ec.generate_private_key(ec.SECP256R1()), data)
    elif case == "not_json":
        data = b"not a roster"
        signature = sign_roster(ca_key, data)
    elif case == "wrong_federation":
        data, signature = _signed(world, Roster("other", newer.version, newer.entries))
    elif case == "same_version":
        data, signature = _signed(world, Roster(FED, pinned.version, newer.entries))
    elif case == "lower_version":
        data, signature = _signed(world, Roster(FED, pinned.version - 1, pinned.entries))
    elif case == "silo_removed":
        entries = {k: v for k, v in newer.entries.items() if k != _id("a")}
        data, signature = _signed(world, Roster(FED, newer.version, entries))
    elif case == "silo_rekeyed":
        data, signature = _signed(world, _rekeyed(pinned, "a"))
    with pytest.raises(RosterUpdateRefused) as refused:
        check_update(
            pinned,
            data,
            signature,
            ca_cert=_cert(world.ca_cert),
            own_cert=_cert(world.silos["a"].cert),
        )
    assert refused.value.refusal is refusal
    if refusal in (RosterRefusal.SILO_REMOVED, RosterRefusal.SILO_KEY_CHANGED):
        assert "re-enroll" in str(refused.value)
    if refusal is RosterRefusal.NOT_NEWER:
        assert f"this silo pins v{pinned.version}" in str(refused.value)


def test_diff_lists_ids_sorted() -> None:
    old = Roster(FED, 1, {_id("a"): b"\1" * 32, _id("b"): b"\2" * 32, _id("z"): b"\3" * 32})
    new = Roster(FED, 2, {_id("b"): b"\6" * 32, _id("y"): b"\4" * 32, _id("x"): b"\5" * 32})
    change = diff(old, new)
    assert change.added == (_id("x"), _id("y"))
    assert change.changed == (_id("b"),)
    assert change.removed == (_id("a"), _id("z"))


def test_mismatch_detail_names_both_versions_digests_and_what_to_do() -> None:
    pinned = Roster(FED, 3, {_id("a"): b"\1" * 32})
    theirs = Roster(FED, 4, {_id("a"): b"\2" * 32})
    text = roster_mismatch_detail(FED, 4, theirs.digest(), pinned, source="/etc/silo.toml")
    assert f"roster v4 (digest {theirs.digest().hex()[:12]}" in text
    assert f"this silo pins v3 (digest {pinned.digest().hex()[:12]}" in text
    assert "roster_updates" in text and "/etc/silo.toml" in text
    older = roster_mismatch_detail(FED, 2, b"\5" * 32, pinned)
    assert "older roster than this silo" in older
    other = roster_mismatch_detail("elsewhere", 4, theirs.digest(), pinned)
    assert "federation 'elsewhere'" in other and "[coordinator] address" in other

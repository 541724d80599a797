"""What a Trust remembers of the certificate chains it checked, and what it never skips.

`CheckedChains` stands in for the whole certificate check of a chain `verify_signer` accepted
under one Trust, for the same expected silo and only while every certificate of the chain is
valid: the message's own signature is verified every time; another silo expected, a time past a
certificate's validity, another Trust (revocations, roster), an impostor's chain under the same
names, a chain that failed, or one accepted at a moment outside some of its certificates'
validity (an expired certificate the check did not use) go through the full check.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import secagg.trust as trust_module
from secagg.errors import DecryptionFailed
from secagg.identity import Roster
from secagg.messages import SignedEnvelope
from secagg.primitives import sign
from secagg.trust import (
    MAX_CERTIFICATE_BYTES,
    MAX_CHAIN_CERTIFICATES,
    CheckedChains,
    Trust,
    verify_signer,
)
from tests.secagg.pki import NOW, _cert, federation, junk_certificate, self_signed


def _leaf(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def _counting_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full certificate checks `verify_signer` makes (each still runs)."""
    calls: list[int] = []
    real = trust_module.check_certificate

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trust_module, "check_certificate", counted)
    return calls


def test_a_chain_is_checked_once_per_trust_and_every_message_signature_always(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = federation()
    checks = _counting_checks(monkeypatch)
    trust = Trust(fed.ca_cert, fed.roster)
    for silo in fed.silos[:3]:
        for n in range(4):
            verify_signer(silo.seal(b"kind", b"m%d" % n), silo.silo_id, b"kind", trust, NOW)
    assert len(checks) == 3
    silo = fed.silos[0]
    env = silo.seal(b"kind", b"payload")
    with pytest.raises(DecryptionFailed):  # a remembered chain, a payload it did not sign
        verify_signer(
            dataclasses.replace(env, payload=b"forged"), silo.silo_id, b"kind", trust, NOW
        )
    with pytest.raises(DecryptionFailed):  # signed for another kind of message
        verify_signer(env, silo.silo_id, b"other kind", trust, NOW)
    fresh = Trust(fed.ca_cert, fed.roster)  # another Trust: its own memory
    verify_signer(env, silo.silo_id, b"kind", fresh, NOW)
    assert len(checks) == 4


def test_a_remembered_chain_is_refused_for_another_silo_or_past_its_validity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = federation()
    checks = _counting_checks(monkeypatch)
    trust = Trust(fed.ca_cert, fed.roster)
    silo, other = fed.silos[0], fed.silos[1]
    verify_signer(silo.seal(b"kind", b"m"), silo.silo_id, b"kind", trust, NOW)
    with pytest.raises(DecryptionFailed):
        verify_signer(silo.seal(b"kind", b"m"), other.silo_id, b"kind", trust, NOW)
    for late in (NOW + dt.timedelta(days=365), NOW - dt.timedelta(days=365)):
        with pytest.raises(DecryptionFailed):
            verify_signer(silo.seal(b"kind", b"m"), silo.silo_id, b"kind", trust, late)
    assert len(checks) == 4  # each refusal went through the full check


def test_a_chain_that_failed_is_checked_again_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    fed = federation()
    checks = _counting_checks(monkeypatch)
    silo = fed.silos[0]
    revoked = Trust(fed.ca_cert, fed.roster, (_leaf(silo.cert_chain_der[0]).serial_number,))
    for _ in range(3):
        with pytest.raises(DecryptionFailed):
            verify_signer(silo.seal(b"kind", b"m"), silo.silo_id, b"kind", revoked, NOW)
    assert len(checks) == 3


def test_a_chain_accepted_with_an_unused_expired_certificate_is_not_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leaf is the CA's own, so the check never looks at the certificate after it, which
    expired: the chain is accepted, but remembering it would tie it to a validity the check
    did not examine. It is checked in full each time."""
    fed = federation()
    checks = _counting_checks(monkeypatch)
    silo = fed.silos[0]
    _, expired = self_signed(
        fed.ca_cert.subject, NOW - dt.timedelta(days=60), NOW - dt.timedelta(days=1)
    )
    chain = (silo.cert_chain_der[0], expired.public_bytes(serialization.Encoding.DER))
    trust = Trust(fed.ca_cert, fed.roster)
    for n in range(3):
        env = SignedEnvelope(b"m%d" % n, silo.seal(b"kind", b"m%d" % n).signature, chain)
        verify_signer(env, silo.silo_id, b"kind", trust, NOW)
    assert len(checks) == 3


def test_remembered_chains_hold_no_bytes_a_relay_appends() -> None:
    """The envelope's signature does not cover its chain, and the check ignores certificates it
    does not use: a relay (the coordinator) or a member may append a different large, valid
    certificate to each envelope. Each is accepted, as by the full check, and remembered; the
    memory must not hold their bytes (found by an adversarial review: 24 such chains of 1 MiB
    pinned 24 MiB of a silo agent's memory for its life)."""
    fed = federation()
    silo = fed.silos[0]
    trust = Trust(fed.ca_cert, fed.roster)
    honest = silo.seal(b"kind", b"advertise")
    junk = [junk_certificate(i, 12 * 1024) for i in range(8)]  # under the certificate bound
    for extra in junk:
        env = SignedEnvelope(honest.payload, honest.signature, (honest.cert_chain[0], extra))
        verify_signer(env, silo.silo_id, b"kind", trust, NOW)
    assert len(trust.chains._accepted) == len(junk)  # each was accepted and remembered
    held = sum(_bytes_in(k) + _bytes_in(v) for k, v in trust.chains._accepted.items())
    assert held < 1024 * len(junk), f"{len(junk)} chains hold {held} bytes"


def _bytes_in(obj: object) -> int:
    """The bytes and text `obj` holds, through tuples and dataclass fields."""
    if isinstance(obj, bytes | str):
        return len(obj)
    if isinstance(obj, tuple):
        return sum(_bytes_in(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_bytes_in(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda: [junk_certificate(0, MAX_CERTIFICATE_BYTES)], id="a huge certificate"),
        pytest.param(
            lambda: [junk_certificate(i, 100) for i in range(MAX_CHAIN_CERTIFICATES)],
            id="too many certificates",
        ),
    ],
)
def test_a_chain_over_the_bound_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch, extra: Callable[[], list[bytes]]
) -> None:
    """The signature does not cover the chain: the bound keeps a member's relayed Advertise from
    carrying megabytes (docs/secagg-protocol.md §3)."""
    fed = federation()
    checks = _counting_checks(monkeypatch)
    silo = fed.silos[0]
    honest = silo.seal(b"kind", b"advertise")
    env = SignedEnvelope(honest.payload, honest.signature, (honest.cert_chain[0], *extra()))
    with pytest.raises(DecryptionFailed):
        verify_signer(env, silo.silo_id, b"kind", Trust(fed.ca_cert, fed.roster), NOW)
    assert checks == []
    verify_signer(honest, silo.silo_id, b"kind", Trust(fed.ca_cert, fed.roster), NOW)


def test_a_chain_remembered_under_one_trust_is_refused_by_a_trust_that_revoked_or_unpinned_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = federation()
    checks = _counting_checks(monkeypatch)
    silo = fed.silos[0]
    verify_signer(
        silo.seal(b"kind", b"m"), silo.silo_id, b"kind", Trust(fed.ca_cert, fed.roster), NOW
    )
    serial = _leaf(silo.cert_chain_der[0]).serial_number
    unpinned = Roster(fed.roster.federation_id, 2, {})
    for other in (Trust(fed.ca_cert, fed.roster, (serial,)), Trust(fed.ca_cert, unpinned)):
        with pytest.raises(DecryptionFailed):
            verify_signer(silo.seal(b"kind", b"m"), silo.silo_id, b"kind", other, NOW)
    assert len(checks) == 3


def test_an_impostors_chain_under_the_same_names_is_refused_after_the_genuine_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first silo's names and silo id, a key of the impostor's own, signed by a key under
    the federation CA's name: another chain, checked in full, and refused."""
    fed = federation()
    checks = _counting_checks(monkeypatch)
    silo = fed.silos[0]
    trust = Trust(fed.ca_cert, fed.roster)
    verify_signer(silo.seal(b"kind", b"m"), silo.silo_id, b"kind", trust, NOW)
    impostor = ec.generate_private_key(ec.SECP256R1())
    foreign = _cert(impostor, impostor, fed.ca_cert.subject, "s00", silo.silo_id, ca=False)
    assert foreign.subject == _leaf(silo.cert_chain_der[0]).subject
    chain = (foreign.public_bytes(serialization.Encoding.DER),)
    forged = SignedEnvelope(b"m", sign(impostor, b"kind", b"m"), chain)  # its own signature
    for _ in range(2):
        with pytest.raises(DecryptionFailed):
            verify_signer(forged, silo.silo_id, b"kind", trust, NOW)
    assert len(checks) == 3


def test_the_memory_starts_afresh_when_full() -> None:
    fed = federation()
    chains = CheckedChains(capacity=2)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    for silo in fed.silos[:3]:
        chains.accept(silo.cert_chain_der, silo.silo_id, key, [_leaf(silo.cert_chain_der[0])], NOW)
    last = fed.silos[2]
    assert chains.key_for(last.cert_chain_der, last.silo_id, NOW) is key  # the newest is kept
    first = fed.silos[0]
    assert chains.key_for(first.cert_chain_der, first.silo_id, NOW) is None  # the older went

"""Certificate lifecycle pieces: expiry warnings (log limiter, status, metrics, `check`), the
[pki] config tables, when a silo asks for renewal, and what it refuses to install."""

from __future__ import annotations

import datetime as dt
import io
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.commands.status import _print, status_doc
from coordinator.config import ConfigError, load_coordinator_config
from coordinator.observability.metrics import start_metrics
from coordinator.pki import authority as pki
from coordinator.pki.expiry import DAY_S, DailyOnce, expiry_warning
from protos import federation_pb2 as pb
from silo_agent.commands.check import check_certificate_validity
from silo_agent.config import load_silo_config
from silo_agent.pki.renewal import RenewalError, check_renewed, renew_at, renewal_csr
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    provision,
    write_coordinator_config,
    write_silo_config,
)
from tests.test_status_metrics import scrape

FED = "life"
UTC = dt.UTC
NOW = dt.datetime.now(UTC)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("fed"), FED, ["a", "b"])


def _cert(
    fed: Federation, name: str, *, days_left: float, key: ec.EllipticCurvePrivateKey | None = None
) -> x509.Certificate:
    """A certificate for silo `name` (its enrolled key unless `key`), 30 days old, expiring in
    `days_left` days."""
    ca = pki.load_ca(fed.root, FED)
    silo = fed.silos[name]
    csr = (silo.dir / "silo.csr").read_bytes()
    if key is not None:
        csr = renewal_csr(x509.load_pem_x509_certificate(silo.cert.read_bytes()), key)
    pem = pki.sign_csr(
        ca,
        csr,
        federation_id=FED,
        now=NOW,
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW + dt.timedelta(days=days_left),
    )
    return x509.load_pem_x509_certificate(pem)


def test_expiry_warning_starts_at_the_configured_distance() -> None:
    now = 1_000_000.0
    assert expiry_warning("s", now + 31 * DAY_S, now, 30) is None
    soon = expiry_warning("s", now + 29 * DAY_S, now, 30)
    assert soon is not None and "expires in 29.0 days" in soon
    gone = expiry_warning("s", now - DAY_S, now, 30)
    assert gone is not None and "has expired" in gone


def test_the_log_warning_is_let_through_once_a_day_per_silo() -> None:
    once = DailyOnce()
    assert once.allow("a", 0.0) and once.allow("b", 10.0)
    assert not once.allow("a", DAY_S - 1)
    assert once.allow("a", DAY_S)


def test_status_shows_a_warning_for_a_certificate_close_to_expiry() -> None:
    now = time.time()
    reply = pb.StatusReply(
        federation_id=FED,
        silos=[
            pb.SiloStatus(silo_id="spiffe://life/silo/a", cert_not_after_unix=now + 3 * DAY_S),
            pb.SiloStatus(silo_id="spiffe://life/silo/b", cert_not_after_unix=now + 300 * DAY_S),
        ],
    )
    doc = status_doc("127.0.0.1:1", reply, "SERVING", now, warning_days=30)
    warnings = {s["silo_id"]: s["cert_warning"] for s in doc["silos"]}
    assert warnings["spiffe://life/silo/b"] is None
    assert "expires in 3.0 days" in warnings["spiffe://life/silo/a"]
    out = io.StringIO()
    _print(doc, out)
    assert "warning: the certificate of spiffe://life/silo/a expires in 3.0 days" in out.getvalue()
    assert "silo/b expires" not in out.getvalue()


def test_metrics_export_seconds_to_expiry_per_silo(tmp_path: Path) -> None:
    not_after = time.time() + 5 * DAY_S
    reply = pb.StatusReply(
        federation_id=FED,
        silos=[pb.SiloStatus(silo_id="spiffe://life/silo/a", cert_not_after_unix=not_after)],
    )
    server = start_metrics("127.0.0.1:0", tmp_path, lambda: reply)
    try:
        got = scrape(server.port)
    finally:
        server.stop()
    left = got[("silofed_cert_expiry_seconds", (("silo", "spiffe://life/silo/a"),))]
    assert 5 * DAY_S - 60 < left <= 5 * DAY_S


def test_check_warns_when_renewal_is_due(fed: Federation, tmp_path: Path) -> None:
    silo = fed.silos["a"]
    toml = write_silo_config(tmp_path / "a.toml", silo, port=1, task_spec=RECORDING_SPEC)
    config = load_silo_config(toml)
    fresh = check_certificate_validity(config, NOW)  # provisioned: 90 days
    assert fresh.ok and "WARNING" not in fresh.detail
    short = tmp_path / "short.pem"
    short.write_bytes(_cert(fed, "a", days_left=3).public_bytes(serialization.Encoding.PEM))
    toml.write_text(toml.read_text().replace(str(silo.cert), str(short)))
    due = check_certificate_validity(load_silo_config(toml), NOW)
    assert due.ok and "WARNING: renewal due" in due.detail
    toml.write_text(toml.read_text() + "\n[pki]\nauto_renew = false\n")
    manual = check_certificate_validity(load_silo_config(toml), NOW)
    assert "auto_renew is off" in manual.detail


def test_renewal_is_due_in_the_last_third_or_the_configured_days(fed: Federation) -> None:
    cert = _cert(fed, "a", days_left=60)  # 90 days of life: due from day 60, i.e. now
    start = cert.not_valid_before_utc.timestamp()
    assert renew_at(cert, None) == pytest.approx(start + 60 * DAY_S)
    assert renew_at(cert, 10) == pytest.approx(cert.not_valid_after_utc.timestamp() - 10 * DAY_S)


def test_the_silo_installs_only_a_renewal_of_its_own_identity_and_key(fed: Federation) -> None:
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    current = _cert(fed, "a", days_left=3)
    check_renewed(_cert(fed, "a", days_left=30), current, ca, NOW)  # the good case passes
    with pytest.raises(RenewalError, match="names spiffe://life/silo/b"):
        check_renewed(_cert(fed, "b", days_left=30), current, ca, NOW)
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(RenewalError, match="another key"):
        check_renewed(_cert(fed, "a", days_left=30, key=other_key), current, ca, NOW)
    with pytest.raises(RenewalError, match="does not last longer"):
        check_renewed(_cert(fed, "a", days_left=2), current, ca, NOW)
    foreign = provision(fed.root.parent / "foreign", FED, ["a"])
    foreign_ca = x509.load_pem_x509_certificate(foreign.ca_cert.read_bytes())
    with pytest.raises(RenewalError, match="not issued by the pinned CA"):
        check_renewed(_cert(fed, "a", days_left=30), current, foreign_ca, NOW)


def test_auto_renew_without_an_issuing_ca_is_a_config_error(
    fed: Federation, tmp_path: Path
) -> None:
    path = write_coordinator_config(
        tmp_path / "c.toml", fed, state_dir=tmp_path / "s", task_spec=RECORDING_SPEC, rounds=1,
        min_silos=1,
    )  # fmt: skip
    base = path.read_text()
    assert load_coordinator_config(path).pki.auto_renew is False  # the default: queue
    assert load_coordinator_config(path).renewals_dir == tmp_path / "s" / "renewals"
    path.write_text(base + "\n[pki]\nauto_renew = true\n")
    with pytest.raises(ConfigError, match=r"\[pki\] auto_renew .*issuing_cert and issuing_key"):
        load_coordinator_config(path)
    path.write_text(
        base + f'\n[pki]\nauto_renew = true\nissuing_cert = "{fed.ca_cert}"\n'
        f'issuing_key = "{fed.ca_key}"\nexpiry_warning_days = 14\n'
    )
    loaded = load_coordinator_config(path).pki
    assert loaded.auto_renew and loaded.issuing_key == fed.ca_key
    assert loaded.expiry_warning_days == 14

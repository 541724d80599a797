"""Certificate renewal: a new certificate for the identity and key the roster already pins.

Rule: a renewal never changes the roster. The roster pins a silo's id and the SHA-256 of its
public key, not a certificate, so a certificate for the same id and the same key matches the pin
as it is: no roster version, nothing for the other silos to adopt. `check_csr` enforces exactly
that, after the caller passed the checks of a connection (federation CA, validity, revocation,
roster: the servicer runs them first): the CSR's signature verifies (it was made with the key),
it names the caller's own silo id, and its key is the pinned one. A CSR with another key is a
key rotation, which moves the pin: that needs a new roster version signed by the CA (`sign`),
never this path.

What happens to an accepted CSR is the coordinator operator's policy (`[pki] auto_renew`):
signed at once with the configured issuing CA (`RenewalDesk`: the online intermediate the
offline root issued, or the root itself; an intermediate's certificate follows the leaf in the
reply, so the silo's certificate file carries its chain), or queued as
`<renewals>/pending/<name>.csr` until someone holding the CA key runs `silofed-coordinator pki
approve`, which writes `<renewals>/issued/<name>.pem`; the silo's next request picks it up
(`issued_for`). coordinator.pki.authority stays the import for the CA itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.config import CoordinatorConfig
from coordinator.pki.certificates import (
    CA,
    PkiError,
    chain_pem,
    csr_uris,
    is_root,
    load_csr,
    load_issuer,
    sign_csr,
    write_public,
)
from coordinator.pki.expiry import DailyOnce, expiry_warning
from secagg.identity import (
    CertificateRejected,
    Roster,
    SiloId,
    check_issuer,
    intermediate_problem,
    load_pem_chain,
    silo_id_for,
    spki_sha256,
    uri_san,
)
from secagg.primitives import spki_der

log = logging.getLogger("silofed.coordinator")

PENDING_DIR = "pending"
ISSUED_DIR = "issued"
# A P-256 CSR with one URI SAN is well under 1 KiB; anything far larger is not one of ours.
MAX_CSR_BYTES = 8192


class RenewalRefused(Exception):
    """The renewal request is refused; str() is the sentence the silo and the log receive."""


@dataclass(frozen=True, slots=True)
class RenewalOutcome:
    """`cert_pem` is the new certificate when `issued`; else the request waits for approval."""

    issued: bool
    cert_pem: bytes
    detail: str


@dataclass(frozen=True, slots=True)
class PendingRenewal:
    """A request waiting for `pki approve`."""

    name: str
    silo_id: str
    csr: Path
    requested_at: float  # unix seconds (the file's mtime)


def key_pin(key: ec.EllipticCurvePublicKey) -> bytes:
    """The roster pin of a public key: SHA-256 of its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der(key)).digest()


def silo_name(silo_id: str, federation_id: str) -> str:
    """The name part of `silo_id` (`spiffe://<federation>/silo/<name>`); PkiError otherwise."""
    prefix = silo_id_for(federation_id, "")
    name = silo_id.removeprefix(prefix)
    if (
        not silo_id.startswith(prefix)
        or not name
        or not all(c.isalnum() or c in "-_." for c in name)
    ):
        raise PkiError(f"{silo_id} is not a silo id of federation {federation_id!r}")
    return name


def check_csr(csr_pem: bytes, *, silo_id: str, pin: bytes) -> x509.CertificateSigningRequest:
    """The CSR, when it may renew `silo_id` whose roster pin is `pin`. Raises RenewalRefused."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise RenewalRefused(f"the CSR is {len(csr_pem)} bytes; a silo CSR is under 1 KiB")
    try:
        csr, key = load_csr(csr_pem, whose="the CSR", redo="make it again with the silo's key")
    except PkiError as exc:
        raise RenewalRefused(str(exc)) from None
    uris = csr_uris(csr)
    if uris != [silo_id]:
        raise RenewalRefused(
            f"the CSR names {uris or 'no silo id'}, but the caller is {silo_id}: a silo may "
            "renew only its own certificate"
        )
    if key_pin(key) != pin:
        raise RenewalRefused(
            f"the CSR's key is not the key the roster pins for {silo_id}: a renewal keeps the "
            "key; a new key moves the roster pin, so it needs a new roster version (enroll "
            "again and have the CA holder run `silofed-coordinator sign`)"
        )
    return csr


def _csr_path(directory: Path, name: str) -> Path:
    return directory / PENDING_DIR / f"{name}.csr"


def issued_path(directory: Path, name: str) -> Path:
    """Where an approved renewal waits for the silo to pick it up."""
    return directory / ISSUED_DIR / f"{name}.pem"


def queue_request(directory: Path, name: str, csr_pem: bytes) -> Path:
    """Keep the silo's latest request for approval (one per silo: a newer one replaces it)."""
    path = _csr_path(directory, name)
    write_public(path, csr_pem)
    return path


def list_pending(directory: Path, federation_id: str) -> list[PendingRenewal]:
    """The requests waiting for approval, oldest first."""
    folder = directory / PENDING_DIR
    if not folder.is_dir():
        return []
    found = [
        PendingRenewal(p.stem, silo_id_for(federation_id, p.stem), p, p.stat().st_mtime)
        for p in folder.glob("*.csr")
    ]
    return sorted(found, key=lambda r: (r.requested_at, r.name))


def issued_for(
    directory: Path,
    name: str,
    *,
    ca_cert: x509.Certificate,
    silo_id: str,
    pin: bytes,
    newer_than: dt.datetime,
    now: dt.datetime,
) -> bytes | None:
    """An approved certificate for `silo_id` that renews the caller's: issued by `ca_cert`, the
    same id and pinned key, valid at `now` and lasting beyond `newer_than` (the caller's current
    expiry). None when there is none (or a stale one, e.g. already installed)."""
    path = issued_path(directory, name)
    try:
        pem = path.read_bytes()
        chain = load_pem_chain(pem)
        cert = chain[0]
        check_issuer(cert, ca_cert, chain[1:], now=now)
    except (OSError, ValueError, CertificateRejected):
        return None
    if uri_san(cert) != silo_id or spki_sha256(cert) != pin:
        return None
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return pem if cert.not_valid_after_utc > newer_than else None


def approve(
    directory: Path, name: str, *, ca: CA, roster: Roster, now: dt.datetime, valid_days: int
) -> tuple[Path, x509.Certificate]:
    """Sign silo `name`'s pending request with the CA (the same checks as an automatic renewal,
    against `roster`'s pin), write it where the silo's next request finds it, and drop the
    request. Raises PkiError (or RenewalRefused) saying why not."""
    csr_path = _csr_path(directory, name)
    try:
        csr_pem = csr_path.read_bytes()
    except FileNotFoundError:
        raise PkiError(
            f"no renewal request from silo {name!r} in {directory / PENDING_DIR}; "
            "`silofed-coordinator pki list` shows the waiting ones"
        ) from None
    silo_id = silo_id_for(ca.federation_id, name)
    pin = roster.entries.get(SiloId(silo_id))
    if pin is None:
        raise PkiError(f"{silo_id} is not on the roster; it cannot renew")
    check_csr(csr_pem, silo_id=silo_id, pin=pin)
    cert_pem = sign_csr(ca, csr_pem, federation_id=ca.federation_id, now=now, valid_days=valid_days)
    out = issued_path(directory, name)
    write_public(out, cert_pem)
    csr_path.unlink()
    return out, x509.load_pem_x509_certificate(cert_pem)


class RenewalDesk:
    """The coordinator's side of `Renew`: the policy, the issuing CA and the queue."""

    def __init__(
        self,
        *,
        federation_id: str,
        ca_cert: x509.Certificate,
        directory: Path,
        issuer: CA | None,
        valid_days: int,
    ) -> None:
        """`issuer`: sign at once with it (auto_renew); None: queue for approval."""
        self.federation_id = federation_id
        self.ca_cert = ca_cert
        self.directory = directory
        self.issuer = issuer
        self.valid_days = valid_days

    @classmethod
    def from_config(
        cls, config: CoordinatorConfig, ca_cert: x509.Certificate, *, now: dt.datetime
    ) -> RenewalDesk:
        """The desk `[pki]` describes. Raises PkiError when the issuing CA is unusable at `now`
        (not the [tls] ca_cert root nor an intermediate it issued that may issue)."""
        pki = config.pki
        issuer: CA | None = None
        if pki.auto_renew:
            assert pki.issuing_cert is not None and pki.issuing_key is not None  # config checks
            try:
                issuer = load_issuer(
                    pki.issuing_cert, pki.issuing_key, ca_cert, config.federation_id, now
                )
            except PkiError as exc:
                raise PkiError(f"[pki] issuing_cert/issuing_key: {exc}") from exc
        return cls(
            federation_id=config.federation_id,
            ca_cert=ca_cert,
            directory=config.renewals_dir,
            issuer=issuer,
            valid_days=pki.renew_valid_days,
        )

    def renew(
        self,
        *,
        caller: x509.Certificate,
        silo_id: str,
        pin: bytes,
        csr_pem: bytes,
        now: float,
        revoked: frozenset[int] = frozenset(),
    ) -> RenewalOutcome:
        """Answer a renewal request of `silo_id` (already checked as a connection would be,
        holding `caller`, pinned to `pin`; `revoked`: the serials the coordinator refuses).
        Raises RenewalRefused, or RenewalUnavailable when the issuing intermediate can no
        longer issue (expired or revoked since the coordinator started)."""
        check_csr(csr_pem, silo_id=silo_id, pin=pin)
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        name = silo_name(silo_id, self.federation_id)
        if self.issuer is not None:
            return self._sign(csr_pem, moment, revoked)
        ready = issued_for(
            self.directory,
            name,
            ca_cert=self.ca_cert,
            silo_id=silo_id,
            pin=pin,
            newer_than=caller.not_valid_after_utc,
            now=moment,
        )
        if ready is not None:
            return RenewalOutcome(True, ready, "approved by the coordinator operator")
        queue_request(self.directory, name, csr_pem)
        return RenewalOutcome(
            False,
            b"",
            f"queued for the coordinator operator's approval (`silofed-coordinator pki "
            f"approve --silo {name}`); ask again later",
        )

    def _sign(self, csr_pem: bytes, moment: dt.datetime, revoked: frozenset[int]) -> RenewalOutcome:
        """Sign with the issuer; a leaf never outlives the intermediate that issued it."""
        assert self.issuer is not None
        end: dt.datetime | None = None
        if not is_root(self.issuer.cert):
            problem = intermediate_problem(
                self.issuer.cert, self.ca_cert, now=moment, revoked_serials=tuple(revoked)
            )
            if problem is not None:
                log.error("cannot renew certificates: %s", problem)
                raise RenewalUnavailable(
                    "the coordinator's issuing CA cannot issue now (its operator sees why in "
                    "its log); ask again later"
                )
            start = moment - dt.timedelta(minutes=5)
            end = min(
                start + dt.timedelta(days=self.valid_days), self.issuer.cert.not_valid_after_utc
            )
        cert_pem = sign_csr(
            self.issuer,
            csr_pem,
            federation_id=self.federation_id,
            now=moment,
            valid_days=self.valid_days,
            not_after=end,
        )
        return RenewalOutcome(
            True, chain_pem(self.issuer, cert_pem), "signed by the coordinator's issuing CA"
        )


class RenewalUnavailable(Exception):
    """This coordinator cannot renew certificates now ([pki] is misconfigured); str() says why."""


class RenewalService:
    """The servicer's renewal and expiry-warning helper over the hub's config, roster, CA and
    clock (read from the hub: the servicer knows the hub only through its gRPC-facing methods).

    Builds its `RenewalDesk` at the first request, so a coordinator that never renews never
    reads the issuing key; a misconfigured issuer is reported to each caller and logged."""

    def __init__(self) -> None:
        self._desk: RenewalDesk | None = None
        self._lock = threading.Lock()
        self._daily = DailyOnce()

    def warn_expiry(self, hub: Any, silo_id: str, cert_pem: bytes | None) -> None:
        """Log, at most once a day per silo, that its certificate is close to expiry."""
        config: CoordinatorConfig | None = getattr(hub, "config", None)
        clock = getattr(hub, "clock", None)
        if config is None or clock is None or cert_pem is None:
            return
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return
        now = float(clock.now())
        warning = expiry_warning(
            silo_id,
            cert.not_valid_after_utc.timestamp(),
            now,
            config.pki.expiry_warning_days,
        )
        if warning is not None and self._daily.allow(silo_id, now):
            log.warning("%s", warning)

    def _desk_for(self, hub: Any) -> RenewalDesk:
        with self._lock:
            if self._desk is None:
                config: CoordinatorConfig | None = getattr(hub, "config", None)
                trust = getattr(hub, "trust", None)
                if config is None or trust is None:
                    raise RenewalUnavailable("this coordinator does not renew certificates")
                try:
                    now = dt.datetime.fromtimestamp(float(hub.clock.now()), dt.UTC)
                    self._desk = RenewalDesk.from_config(config, trust.ca_cert, now=now)
                except PkiError as exc:
                    log.error("cannot renew certificates: %s", exc)
                    raise RenewalUnavailable(
                        "the coordinator cannot renew certificates now (its [pki] issuing CA is "
                        "misconfigured; its operator sees why in its log)"
                    ) from exc
            return self._desk

    def renew(self, hub: Any, silo_id: str, cert_pem: bytes, csr_pem: bytes) -> RenewalOutcome:
        """Answer `silo_id`'s request (its certificate `cert_pem` already passed the checks of a
        connection). Raises RenewalRefused or RenewalUnavailable."""
        desk = self._desk_for(hub)
        roster: Roster = hub.roster
        pin = roster.entries.get(SiloId(silo_id))
        if pin is None:  # the roster changed since the check: refuse as a connection would be
            raise RenewalRefused(f"{silo_id} is not on the roster")
        caller = x509.load_pem_x509_certificate(cert_pem)
        revoked: frozenset[int] = getattr(hub.trust, "revoked", frozenset())
        outcome = desk.renew(
            caller=caller,
            silo_id=silo_id,
            pin=pin,
            csr_pem=csr_pem,
            now=float(hub.clock.now()),
            revoked=revoked,
        )
        if outcome.issued:
            cert = x509.load_pem_x509_certificate(outcome.cert_pem)
            log.info(
                "renewed the certificate of %s (same key, roster unchanged): serial %x, valid "
                "until %s (%s)",
                silo_id,
                cert.serial_number,
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                outcome.detail,
            )
        else:
            log.info("renewal request of %s %s", silo_id, outcome.detail)
        return outcome

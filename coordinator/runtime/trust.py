"""Who may open a stream: the federation CA, the roster and the revocation list, reread live.

Rule: `TrustStore` owns the trust files' current contents and the signed roster silos are sent;
the hub owns one and calls it under its lock. `check` is the certificate decision for a peer
(CA, key, validity at the given time, revocation, roster) and raises `Refused` saying why.

A silo certificate issued by the coordinator's online intermediate (`[pki] issuing_cert`, when
it is not the root) is accepted through that intermediate, whose own checks include the
revocation list: revoking the intermediate's serial refuses every leaf it issued.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from coordinator.config import CoordinatorConfig
from coordinator.pki.authority import (
    PkiError,
    load_revoked_serials,
    load_signed_roster,
    roster_signature_path,
)
from coordinator.pki.operator import operator_name
from coordinator.runtime.stream import SiloStream
from coordinator.transport.servicer import RefusalCode, Refused
from protos import federation_pb2 as pb
from secagg.identity import (
    CertificateRejected,
    CertProblem,
    Roster,
    check_certificate,
    load_pem_certificate,
    load_pem_chain,
    uri_san,
)
from secagg.roster_sig import describe_roster, short_digest

log = logging.getLogger("silofed.coordinator")

# Which refusals are "who you are is not allowed" vs "we cannot tell who you are".
_CODE_FOR = {
    CertProblem.NOT_FROM_FEDERATION_CA: RefusalCode.UNAUTHENTICATED,
    CertProblem.NO_URI_SAN: RefusalCode.UNAUTHENTICATED,
    CertProblem.WRONG_KEY_TYPE: RefusalCode.UNAUTHENTICATED,
}


class _FileWatch:
    """Rereads a file when its mtime or size changes (roster, revocation list)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None

    def changed(self) -> bool:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = (0.0, -1)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


class TrustStore:
    """The CA certificate, the roster and the revoked serials (the hub's lock guards them)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.ca_cert = load_pem_certificate(config.tls.ca_cert.read_bytes())
        self.intermediates = _issuing_intermediates(config, self.ca_cert)
        self._roster_watch = _FileWatch(config.tls.roster)
        self._revoked_watch = _FileWatch(config.tls.revoked)
        self.roster = Roster.from_json(config.tls.roster.read_text())
        self.revoked: frozenset[int] = frozenset()
        # Roster delivery: the signed roster silos are sent when they pin another one.
        self._roster_sig_watch = _FileWatch(roster_signature_path(config.tls.roster))
        self._roster_update: pb.RosterUpdate | None = None
        self.refresh(())

    def refresh(self, sessions: Iterable[SiloStream]) -> None:
        """Reload roster and revocations when their files change: no restart needed."""
        roster_changed = self._roster_watch.changed()
        if self._roster_sig_watch.changed() or roster_changed:
            self._reload_roster(sessions)
        if self._revoked_watch.changed():
            self.revoked = load_revoked_serials(self.config.tls.revoked)
            log.info("revocation list loaded: %d revoked serials", len(self.revoked))

    def _reload_roster(self, sessions: Iterable[SiloStream]) -> None:
        """Load the roster file and, when the CA signed it, send it to every connected silo
        (each adopts it if newer than its pinned one; see silo_agent.pki.roster_update)."""
        try:
            signed = load_signed_roster(self.config.tls.roster, self.ca_cert)
        except PkiError as exc:  # e.g. caught mid-edit: keep serving with the roster we have
            log.error("%s; keeping roster version %d until it is fixed", exc, self.roster.version)
            return
        self.roster = signed.roster
        log.info(
            "roster loaded: version %d, %d silos", self.roster.version, len(self.roster.entries)
        )
        if signed.signature is None:
            self._roster_update = None
            log.warning(
                "roster version %d cannot be sent to silos: %s",
                signed.roster.version,
                signed.problem,
            )
            return
        self._roster_update = pb.RosterUpdate(roster_json=signed.data, signature=signed.signature)
        live = [s for s in sessions if not s.closed]
        for s in live:
            s.send(pb.CoordinatorMessage(roster_update=self._roster_update))
        if live:
            log.info(
                "sent the signed roster version %d to %d connected silos",
                self.roster.version,
                len(live),
            )

    def send_roster(self, session: SiloStream, pinned_digest: bytes) -> None:
        """The silo pins another roster: queue the signed one (the stream sends it right after
        Welcome), or say why rounds will not agree."""
        mine = describe_roster(self.roster.version, self.roster.digest())
        if self._roster_update is not None:
            session.send(pb.CoordinatorMessage(roster_update=self._roster_update))
            log.info(
                "%s pins roster digest %s, the coordinator %s: sending the signed roster",
                session.silo_id,
                short_digest(pinned_digest),
                mine,
            )
            return
        log.warning(
            "%s pins roster digest %s, the coordinator %s, and the roster has no valid CA "
            "signature to send: secure rounds will be refused (ROSTER_MISMATCH) until the silo "
            "installs the same roster.json, or the roster is signed (silofed-coordinator "
            "sign-roster)",
            session.silo_id,
            short_digest(pinned_digest),
            mine,
        )

    def check(
        self, cert: x509.Certificate, roster: Roster, revoked: tuple[int, ...], *, now: float
    ) -> str:
        """The silo id of `cert` after the federation CA, key, validity (at unix time `now`),
        revocation and roster checks against `roster` and `revoked` (read under the hub's lock,
        after `refresh`). Raises Refused saying why not."""
        try:
            silo_id = check_certificate(
                cert, self.ca_cert, now=dt.datetime.fromtimestamp(now, dt.UTC), roster=roster,
                revoked_serials=revoked, intermediates=self.intermediates,
            )  # fmt: skip
        except CertificateRejected as exc:
            uri = uri_san(cert)
            if exc.problem is CertProblem.NOT_ON_ROSTER and operator_name(
                uri, self.config.federation_id
            ):
                raise Refused(
                    RefusalCode.PERMISSION_DENIED,
                    f"{uri} is an operator certificate, and operators are not on the roster: it "
                    "may ask for status (silofed-coordinator status), not join rounds; a silo "
                    "connects with its own enrolled certificate",
                ) from exc
            code = _CODE_FOR.get(exc.problem, RefusalCode.PERMISSION_DENIED)
            raise Refused(
                code, f"{exc}; ask the coordinator operator to (re)enroll this silo"
            ) from exc
        return silo_id


def _issuing_intermediates(
    config: CoordinatorConfig, ca_cert: x509.Certificate
) -> tuple[x509.Certificate, ...]:
    """`[pki] issuing_cert` when it is an intermediate: the leaves it issues are accepted
    through it (the TLS layer saw the silo's chain; the servicer hands over the leaf only)."""
    path = config.pki.issuing_cert
    if path is None:
        return ()
    try:
        certs = load_pem_chain(path.read_bytes())
    except (OSError, ValueError) as exc:
        log.error("[pki] issuing_cert %s is unreadable (%s): it issues no accepted leaf", path, exc)
        return ()
    return tuple(c for c in certs if c.public_key() != ca_cert.public_key())


def peer_certificate(cert_pem: bytes | None) -> x509.Certificate:
    """The TLS peer's certificate, parsed. Raises Refused when there is none or it is not one."""
    if cert_pem is None:
        raise Refused(
            RefusalCode.UNAUTHENTICATED,
            "no client certificate was presented; configure the silo's [tls] cert and key",
        )
    try:
        return load_pem_certificate(cert_pem)
    except ValueError:
        raise Refused(
            RefusalCode.UNAUTHENTICATED, "the client certificate could not be parsed"
        ) from None

"""A roster the coordinator delivered (RosterUpdate): adopt it, or keep the pinned one and say why.

Rule: the coordinator is not trusted to change the membership. A delivered roster is adopted only
when `secagg.roster_sig.check_update` accepts it — signed by the federation CA this silo pins,
same federation, a strictly higher version, and this silo still on it with its own certificate's
key — and `[tls] roster_updates` is "signed" (the default). Adopting replaces the `[tls] roster`
file atomically (temporary file, fsync, rename, mode 0644; its signature beside it as
`<roster>.sig`), keeps the previous file as `<roster>.v<old version>`, logs the change and
appends a `RosterAdopted` line to the silo's ledger. With "manual" the silo keeps its roster and
saves the verified offer as `<roster>.offered` for its operator to review.

Nothing here raises into the stream: every refusal and I/O failure is logged with what to do,
and the silo goes on with the roster it pinned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from protos import federation_pb2 as pb
from secagg.identity import Roster, load_pem_certificate
from secagg.roster_sig import (
    SIGNATURE_SUFFIX,
    RosterChange,
    RosterRefusal,
    RosterUpdateRefused,
    check_update,
    describe_roster,
)
from silo_agent.config import SiloConfig
from silo_agent.storage.ledger import LEDGER_FILENAME, record_roster_adopted
from silofed.files import write_atomically

log = logging.getLogger("silofed.silo")

SIGNED = "signed"
MANUAL = "manual"
OFFERED_SUFFIX = ".offered"
# Whatever the umask: every reader of the roster (and of its signature) may read it.
ROSTER_MODE = 0o644


def backup_path(roster_path: Path, version: int) -> Path:
    """Where the roster replaced by an adoption is kept: `<roster>.v<version>`."""
    return roster_path.with_name(f"{roster_path.name}.v{version}")


def signature_path(roster_path: Path) -> Path:
    return roster_path.with_name(roster_path.name + SIGNATURE_SUFFIX)


def offered_path(roster_path: Path) -> Path:
    """Where a "manual" silo keeps the last verified roster it was offered."""
    return roster_path.with_name(roster_path.name + OFFERED_SUFFIX)


def on_roster_update(
    config: SiloConfig, update: pb.RosterUpdate, *, clock: Callable[[], float]
) -> RosterChange | None:
    """Handle one RosterUpdate. Returns the change when the roster was adopted (the caller must
    then stop using anything read from the old roster), else None."""
    tls = config.tls
    try:
        pinned_bytes = tls.roster.read_bytes()
        pinned = Roster.from_json(pinned_bytes.decode("utf-8"))
        ca_cert = load_pem_certificate(tls.ca_cert.read_bytes())
        own_cert = load_pem_certificate(tls.cert.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.error("cannot check the roster the coordinator sent: %s", exc)
        return None
    data, signature = bytes(update.roster_json), bytes(update.signature)
    if data == pinned_bytes:
        log.debug("the coordinator's roster is the one pinned (%s)", _pinned(pinned))
        return None
    try:
        change = check_update(pinned, data, signature, ca_cert=ca_cert, own_cert=own_cert)
    except RosterUpdateRefused as exc:
        _log_refusal(exc, pinned, config)
        return None
    offered = describe_roster(change.new.version, change.new.digest())
    if tls.roster_updates == MANUAL:
        _keep_for_review(config, change, data, signature)
        return None
    try:
        backup = backup_path(tls.roster, pinned.version)
        write_atomically(backup, pinned_bytes, mode=ROSTER_MODE)
        write_atomically(signature_path(tls.roster), signature, mode=ROSTER_MODE)
        write_atomically(tls.roster, data, mode=ROSTER_MODE)
    except OSError as exc:
        log.error(
            "could not adopt roster %s: writing %s failed (%s); this silo keeps %s — make the "
            "folder writable for the agent, or install the roster by hand",
            offered,
            tls.roster,
            exc,
            _pinned(pinned),
        )
        return None
    log.info(
        "adopted roster version %d (was %d): %s%s; previous roster kept as %s",
        change.new.version,
        pinned.version,
        change.summary(),
        _ids(change),
        backup,
    )
    try:
        record_roster_adopted(
            config.state_dir / LEDGER_FILENAME,
            at=clock(),
            roster_json=data,
            details=change.to_dict(),
        )
    except OSError as exc:  # the roster is adopted; only its record is missing, say so
        log.error("adopted roster %s but could not record it in the ledger: %s", offered, exc)
    return change


def _keep_for_review(
    config: SiloConfig, change: RosterChange, data: bytes, signature: bytes
) -> None:
    tls = config.tls
    path = offered_path(tls.roster)
    try:
        write_atomically(signature_path(path), signature, mode=ROSTER_MODE)
        write_atomically(path, data, mode=ROSTER_MODE)
    except OSError as exc:
        log.warning("could not save the offered roster to %s: %s", path, exc)
    log.warning(
        "the coordinator delivered roster %s signed by the federation CA (%s%s); [tls] "
        'roster_updates = "manual" in %s, so this silo keeps %s and refuses secure rounds that '
        "use the new roster. To adopt it: review %s, copy it over %s and restart the agent",
        describe_roster(change.new.version, change.new.digest()),
        change.summary(),
        _ids(change),
        config.source,
        _pinned(change.old),
        path,
        tls.roster,
    )


def _log_refusal(exc: RosterUpdateRefused, pinned: Roster, config: SiloConfig) -> None:
    if exc.refusal in (RosterRefusal.SILO_REMOVED, RosterRefusal.SILO_KEY_CHANGED):
        log.error("not adopted: %s (config %s)", exc, config.source)
    elif exc.refusal is RosterRefusal.NOT_NEWER:
        log.warning("not adopted: %s", exc)
    else:
        log.error("not adopted: %s; this silo keeps %s", exc, _pinned(pinned))


def _pinned(roster: Roster) -> str:
    return describe_roster(roster.version, roster.digest())


def _ids(change: RosterChange) -> str:
    parts = [
        f"{what} {', '.join(ids)}"
        for what, ids in (
            ("added", change.added),
            ("changed", change.changed),
            ("removed", change.removed),
        )
        if ids
    ]
    return f" ({'; '.join(parts)})" if parts else ""

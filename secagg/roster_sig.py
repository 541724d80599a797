"""Signed rosters: the federation CA's signature over a roster file, and the rule a silo applies
before it adopts a roster version the coordinator delivered.

Pure: bytes and parsed objects in, values or exceptions out; nothing here reads files, clocks or
sockets. The signer (coordinator.pki.authority) writes the signature beside the roster as
`roster.json.sig`; the coordinator relays both over the stream; the silo checks them with
`check_update` and writes them itself (silo_agent.pki.roster_update).

The signature is ECDSA P-256/SHA-256 (deterministic, RFC 6979) by the federation CA key over
`DOMAIN ‖ the exact roster file bytes`. The domain prefix keeps it from ever being valid as any
other signature made with that key: a certificate's to-be-signed part is DER and starts with
0x30, a secagg message signature starts with b"secagg/v1", this starts with b"silofed/roster".
Signing the file's bytes rather than a re-encoding means the silo stores exactly what was
signed, and anyone can re-check the pair on disk.

A silo adopts a new roster only if (in this order) the signature verifies with the public key of
its pinned CA certificate, the bytes parse as a roster, the federation is the one it pins, the
version is strictly greater than its pinned version (an old signed roster cannot be replayed),
and the silo itself is still on it with the key of its own certificate (otherwise adopting it
would lock this silo out; it must re-enroll instead).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from secagg.errors import DecryptionFailed
from secagg.identity import Roster, SiloId, spki_sha256, uri_san
from secagg.primitives import SigningKey, ecdsa_sign, ecdsa_verify, verifying_key

DOMAIN = b"silofed/roster/v1\x00"
SIGNATURE_SUFFIX = ".sig"  # roster.json -> roster.json.sig


class RosterRefusal(enum.Enum):
    """Why a delivered roster was not adopted; `value` completes "the roster ..."."""

    BAD_SIGNATURE = "is not signed by this silo's pinned federation CA"
    NOT_A_ROSTER = "is not a valid roster file"
    WRONG_FEDERATION = "is for another federation"
    NOT_NEWER = "is not newer than the pinned roster"
    SILO_REMOVED = "no longer lists this silo"
    SILO_KEY_CHANGED = "pins another key for this silo than its certificate's"


class RosterUpdateRefused(Exception):
    """A delivered roster failed a check. `refusal` says which; str() is the operator's sentence
    (what was refused, and what to do)."""

    def __init__(self, refusal: RosterRefusal, detail: str) -> None:
        self.refusal = refusal
        super().__init__(f"the delivered roster {refusal.value}: {detail}")


def _signed_input(roster_bytes: bytes) -> bytes:
    return DOMAIN + roster_bytes


def sign_roster(ca_key: SigningKey, roster_bytes: bytes) -> bytes:
    """The detached signature (DER ECDSA) of a roster file's exact bytes by the CA key."""
    return ecdsa_sign(ca_key, _signed_input(roster_bytes))


def roster_signature_valid(
    ca_cert: x509.Certificate, roster_bytes: bytes, signature: bytes
) -> bool:
    """True when `signature` is the CA key's signature over exactly `roster_bytes`."""
    key = verifying_key(ca_cert.public_key())
    if key is None:
        return False
    try:
        ecdsa_verify(key, signature, _signed_input(roster_bytes))
    except DecryptionFailed:
        return False
    return True


def short_digest(digest: bytes) -> str:
    """The first 12 hex digits of a roster digest, as logs and messages show it."""
    return digest.hex()[:12] + "…" if digest else "(none)"


def describe_roster(version: int, digest: bytes) -> str:
    """`v4 (digest 3f09a1c2b7de…)`."""
    return f"v{version} (digest {short_digest(digest)})"


@dataclass(frozen=True, slots=True)
class RosterChange:
    """What adopting `new` over `old` changes: silos added, re-keyed and removed."""

    old: Roster
    new: Roster
    added: tuple[SiloId, ...]
    changed: tuple[SiloId, ...]
    removed: tuple[SiloId, ...]

    def summary(self) -> str:
        """`added 1, changed 0, removed 0` (counts; the ids are in the fields)."""
        return f"added {len(self.added)}, changed {len(self.changed)}, removed {len(self.removed)}"

    def to_dict(self) -> dict[str, object]:
        """For the silo's ledger: versions, full digests and the silo ids of each change."""
        return {
            "from_version": self.old.version,
            "to_version": self.new.version,
            "from_digest": self.old.digest().hex(),
            "to_digest": self.new.digest().hex(),
            "added": list(self.added),
            "changed": list(self.changed),
            "removed": list(self.removed),
        }


def diff(old: Roster, new: Roster) -> RosterChange:
    """The silos `new` adds, re-keys and removes relative to `old` (each sorted)."""

    def ids(items: Sequence[SiloId] | set[SiloId]) -> tuple[SiloId, ...]:
        return tuple(sorted(items))

    before, after = old.entries, new.entries
    return RosterChange(
        old,
        new,
        added=ids({s for s in after if s not in before}),
        changed=ids({s for s in after if s in before and before[s] != after[s]}),
        removed=ids({s for s in before if s not in after}),
    )


def check_update(
    pinned: Roster,
    roster_bytes: bytes,
    signature: bytes,
    *,
    ca_cert: x509.Certificate,
    own_cert: x509.Certificate,
) -> RosterChange:
    """Check a delivered roster against what this silo pins; return the change it makes.

    Raises RosterUpdateRefused naming the first failed check (see the module's rule). A roster
    equal to the pinned one is NOT_NEWER: callers treat an equal digest as nothing to do first.
    """
    if not roster_signature_valid(ca_cert, roster_bytes, signature):
        raise RosterUpdateRefused(
            RosterRefusal.BAD_SIGNATURE,
            "it was not adopted; ask the federation operator to re-sign roster.json with the "
            "federation CA (silofed-coordinator sign-roster)",
        )
    try:
        new = Roster.from_json(roster_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RosterUpdateRefused(RosterRefusal.NOT_A_ROSTER, str(exc)) from exc
    if new.federation_id != pinned.federation_id:
        raise RosterUpdateRefused(
            RosterRefusal.WRONG_FEDERATION,
            f"it names federation {new.federation_id!r}, this silo pins "
            f"{pinned.federation_id!r}; check [coordinator] address",
        )
    if new.version <= pinned.version:
        raise RosterUpdateRefused(
            RosterRefusal.NOT_NEWER,
            f"the coordinator sent {describe_roster(new.version, new.digest())}, this silo pins "
            f"{describe_roster(pinned.version, pinned.digest())}; a signed roster is adopted only "
            "with a higher version (ask the federation operator to update the coordinator's "
            "[tls] roster to the newest signed roster)",
        )
    silo_id = uri_san(own_cert)
    pin = new.entries.get(SiloId(silo_id)) if silo_id is not None else None
    if pin is None:
        raise RosterUpdateRefused(
            RosterRefusal.SILO_REMOVED,
            f"{describe_roster(new.version, new.digest())} does not list {silo_id}; this silo "
            "kept its pinned roster and cannot take part in rounds that use the new one — "
            "re-enroll it (silofed-silo enroll) or ask the federation operator",
        )
    if pin != spki_sha256(own_cert):
        raise RosterUpdateRefused(
            RosterRefusal.SILO_KEY_CHANGED,
            f"{describe_roster(new.version, new.digest())} pins {pin.hex()[:12]}… for {silo_id}, "
            f"this silo's certificate has {spki_sha256(own_cert).hex()[:12]}…: the silo was "
            "re-enrolled elsewhere; install the new certificate and key here (or re-enroll)",
        )
    return diff(pinned, new)


def roster_mismatch_detail(
    federation_id: str, version: int, digest: bytes, pinned: Roster, *, source: str = ""
) -> str:
    """Why a secure round's roster differs from the silo's pinned one, and what to do.

    `federation_id`, `version`, `digest` are the round configuration's; `source` names the
    silo's config file for the "what to do" part.
    """
    where = f" ({source})" if source else ""
    if federation_id != pinned.federation_id:
        return (
            f"the coordinator's round is for federation {federation_id!r}; this silo pins "
            f"federation {pinned.federation_id!r}: check [coordinator] address{where}"
        )
    theirs = describe_roster(version, digest)
    ours = describe_roster(pinned.version, pinned.digest())
    if version > pinned.version:
        todo = (
            "adopt the newer roster. The agent adopts it by itself when the coordinator delivers "
            'it signed by the federation CA and [tls] roster_updates is "signed" (the agent\'s '
            "log says why it did not); otherwise install the federation's signed roster.json as "
            f"[tls] roster{where} and restart the agent, or ask the federation operator"
        )
    elif version < pinned.version:
        todo = (
            "the coordinator runs an older roster than this silo; ask the federation operator "
            "to install the newest signed roster on the coordinator"
        )
    else:
        todo = (
            "same version, different contents: one of the two roster files was edited without "
            "a new version; ask the federation operator for the signed roster"
        )
    return f"the coordinator's round uses roster {theirs}; this silo pins {ours}: {todo}"

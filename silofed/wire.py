"""Constants both ends of the gRPC stream must agree on, and the wire version rule.

Rule: a figure that the coordinator and the silo agent each configure their side of gRPC with,
and that breaks the link when the two differ, is written once, here. (The messages themselves
are protos/; the protocol's own sizes, such as the chunk size, are secagg's.)

Wire versions are "MAJOR.MINOR". A minor version only adds: fields and messages an older peer
ignores or never receives, never a changed meaning. A major version changes what an existing
message means, so two majors cannot talk. Every silo announces its version in its hello and the
coordinator alone decides: it admits a silo of its own major whose minor is at least
`OLDEST_WIRE_MINOR` (older or newer than its own), and refuses any other silo, one that announces
no version included (an agent from before versioned hellos), with a sentence naming both
versions (`wire_refusal`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The largest gRPC message either side sends or accepts. Payloads (models, masked vectors) travel
# as chunks of at most secagg.chunking.MAX_CHUNK_BYTES (1 MiB), so this stays small whatever the
# model size: a peer cannot make the other buffer a huge message before any check runs.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


@dataclass(frozen=True, order=True, slots=True)
class WireVersion:
    """A wire protocol version; str() is its "MAJOR.MINOR" form, as Hello.wire_version."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str) -> WireVersion:
        """The version "MAJOR.MINOR" names. Raises ValueError for anything else."""
        found = _VERSION.fullmatch(text)
        if found is None:
            raise ValueError(f"a wire version is MAJOR.MINOR (two numbers), not {text!r}")
        return cls(int(found.group(1)), int(found.group(2)))


# What this build speaks: silos announce it, and the coordinator compares it with theirs. Raise
# the minor for an addition an older peer can ignore, the major (minor back to 0) for a change it
# would misread; docs/operations.md "Upgrading" says what each means for operators.
WIRE_VERSION = WireVersion(1, 2)
# The oldest minor of WIRE_VERSION.major a coordinator of this build still admits: raise it when
# the coordinator comes to need something a minor added.
OLDEST_WIRE_MINOR = 0
# 1.1 added upload grants (Welcome.upload_grants, UploadGrant): a silo of 1.1 or later waits for
# one before sending a masked vector's chunks; the coordinator grants only to such silos.
UPLOAD_GRANTS = WireVersion(1, 1)


# 1.2 added Welcome.upload_chunk_bytes: a silo of 1.2 or later cuts its uploads into chunks of
# the size the coordinator names (UPLOAD_CHUNK_BYTES from a coordinator of this build), an older
# one into chunks of secagg.chunking.MAX_CHUNK_BYTES. gRPC keeps, on each connection, a read
# buffer the size of the largest message it received there: with 1 MiB chunks that was about
# 1.2 MiB of the coordinator's memory per silo (docs/benchmarks.md).
UPLOAD_CHUNKS = WireVersion(1, 2)
UPLOAD_CHUNK_BYTES = 128 * 1024


def speaks(announced: str, feature: WireVersion) -> bool:
    """Whether a peer that announced `announced` has `feature` (the version that added it)."""
    try:
        return WireVersion.parse(announced) >= feature
    except ValueError:
        return False


def speaks_upload_grants(announced: str) -> bool:
    """Whether a silo that announced `announced` (already admitted) waits for upload grants."""
    return speaks(announced, UPLOAD_GRANTS)


def upload_chunk_bytes(announced: str) -> int | None:
    """The upload chunk size a coordinator of this build names to a silo that announced
    `announced`; None for a silo before 1.2, which is told none and cuts MAX_CHUNK_BYTES."""
    return UPLOAD_CHUNK_BYTES if speaks(announced, UPLOAD_CHUNKS) else None


def wire_refusal(
    announced: str,
    agent_version: str,
    *,
    silo: str = "the silo",
    ours: WireVersion | None = None,
    oldest_minor: int | None = None,
) -> str | None:
    """Why a coordinator speaking `ours` (default WIRE_VERSION, read at call time) and admitting
    minors from `oldest_minor` (default OLDEST_WIRE_MINOR) refuses `silo` (its id, for the
    sentence), whose hello announced wire version `announced` and agent `agent_version` (both
    already clipped by the caller: they are quoted); None when it admits it. The sentence names
    both versions and who must upgrade."""
    ours = WIRE_VERSION if ours is None else ours
    oldest = WireVersion(ours.major, OLDEST_WIRE_MINOR if oldest_minor is None else oldest_minor)
    agent = f"agent {agent_version!r}" if agent_version else "an agent that names no version"
    admits = f"it admits silos of wire version {oldest} to {ours.major}.x"
    if not announced:
        return (
            f"the hello of {silo} announces no wire version ({agent}), so its agent predates "
            f"versioned hellos; this coordinator speaks wire version {ours} and {admits}: "
            "upgrade the silo agent"
        )
    try:
        theirs = WireVersion.parse(announced)
    except ValueError:
        return (
            f"{silo} announces wire version {announced!r} ({agent}), which is not "
            f"MAJOR.MINOR; this coordinator speaks wire version {ours} and {admits}"
        )
    if theirs.major != ours.major:
        upgrade = "the coordinator" if theirs.major > ours.major else "the silo agent"
        return (
            f"{silo} speaks wire version {theirs} ({agent}) and this coordinator {ours}: "
            f"different major versions cannot interoperate; upgrade {upgrade}"
        )
    if theirs < oldest:
        return (
            f"{silo} speaks wire version {theirs} ({agent}) and this coordinator {ours}, "
            f"which admits silos of wire version {oldest} or newer: upgrade the silo agent"
        )
    return None

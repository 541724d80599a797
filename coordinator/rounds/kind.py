"""One round interface: what the hub gives a round and what it gets back, for every kind of round.

Rule: a round kind (the plaintext baseline in plaintext.py, secure aggregation in secure.py) is
one object behind `RoundKind`, built by `factory.build_round`. It is pure: values in, `Step`s
out (events.py); time comes in as `now` (unix seconds), and no method blocks, sends or writes.
The hub never asks which kind it drives: what a silo may upload now is `status().uploads`,
what the round produced is `outcome()`.

Inputs: `frame` (a message on the silo's stream: a protocol payload, the model reached the
silo, a train report), `upload` (a complete blob, already reassembled and hashed by the
transport), `lost` (the silo will not answer again: its stream ended, or the hub refused what
it sent), `tick` (deadlines), `cancel` (the coordinator stops). A late or stray message (another
round, a phase the silo is not in) is `Ignored` and the silo stays; one that breaks the round's
rules (an update unlike its report, a masked vector of the wrong size) drops the silo (INVALID).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from coordinator.rounds.events import PrivacyRecord, Step, ignoring
from coordinator.rounds.phases import DropReason, RoundId

# ---- what arrives on a silo's stream ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecAggPayload:
    """A secure-aggregation protocol message, opaque to the hub."""

    round_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ModelDelivered:
    """Everything queued for the silo before the round's marker (the model) reached its stream."""

    round_id: int


@dataclass(frozen=True, slots=True)
class Reported:
    """A silo's train report (already cleaned of non-finite metrics by the hub)."""

    round_id: int
    num_examples: int
    update_sha256: bytes
    metrics: Mapping[str, float] = field(default_factory=dict)


Frame = SecAggPayload | ModelDelivered | Reported


@dataclass(frozen=True, slots=True)
class PlaintextUpdate:
    """A complete plaintext update blob (safetensors bytes) and the digest it arrived with: the
    transport hashed it as it arrived; the round compares it with the report's."""

    round_id: int
    data: bytes
    sha256: bytes


@dataclass(frozen=True, slots=True)
class MaskedVector:
    """A complete masked vector: the protocol's signed header, the vector (in the hub's reused
    buffer: the round copies nothing from it after `upload` returns) and its SHA-256."""

    round_id: int
    header: bytes
    vector: np.ndarray
    sha256: bytes


Upload = PlaintextUpdate | MaskedVector


def stray(silo_id: str, item: Frame | Upload, why: str = "no secure round is running") -> Step:
    """The Step of a message no round takes now: another round's, a phase's the silo is not
    in, or any while no round runs (`why`: what a refused masked vector is told)."""
    rid = item.round_id
    if isinstance(item, SecAggPayload):
        template = "ignoring a secagg frame from %s for round %d"
        return ignoring(silo_id, "stray secagg frame", template, silo_id, rid)
    if isinstance(item, Reported):
        template = "ignoring late or stray report from %s for round %d"
        return ignoring(silo_id, "stray report", template, silo_id, rid)
    if isinstance(item, PlaintextUpdate):
        return ignoring(silo_id, "stray blob", "ignoring blob from %s for round %d", silo_id, rid)
    if isinstance(item, MaskedVector):
        template = "refused a masked vector from %s for round %d: %s"
        return ignoring(silo_id, "masked vector refused", template, silo_id, rid, why, warning=True)
    return Step()  # a delivery marker: nothing to say


@dataclass(frozen=True, slots=True)
class Loss:
    """Why a silo will not answer again this round. `refusal` is the reason code the silo itself
    gave when it refused the round (its AbortNotice): the stall diagnosis names it."""

    reason: DropReason
    detail: str
    refusal: str | None = None


# ---- what the hub asks ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadSpec:
    """What one silo may upload now. `exact_bytes`/`dtype`/`length`: a masked vector of exactly
    that many ring elements (the hub reassembles it into a buffer of that shape); else a blob of
    at most `max_bytes` whose SHA-256 must be `sha256` (the digest the silo reported)."""

    max_bytes: int
    exact_bytes: int | None = None
    dtype: np.dtype[Any] | None = None
    length: int | None = None
    sha256: bytes | None = None

    @property
    def buffered(self) -> bool:
        """A vector reassembled into one of the hub's reused buffers (it holds an upload slot)."""
        return self.exact_bytes is not None and self.length is not None


@dataclass(frozen=True, slots=True)
class RoundStatus:
    round_id: int
    phase: str
    since: float  # when the phase began (unix seconds)
    deadline: float  # when it ends at the latest
    over: bool  # completed or aborted: `outcome()` says which
    waiting_for: frozenset[str]  # the silos the phase still waits for
    uploads: Mapping[str, UploadSpec]  # silo -> what it may upload now (absent: nothing)


@dataclass(frozen=True, slots=True)
class Completed:
    """The round produced the next global model. `metrics`: per silo, the metrics of its report
    (the plaintext kind keeps them for accepted updates only, the secure kind for every invited
    silo that reported); `announce(new model sha256)` is the Step that tells the survivors
    (empty for a kind whose silos learn the result from the RoundResult alone)."""

    new_state: dict[str, torch.Tensor]
    weight_sum: float
    survivors: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, float]]
    privacy: PrivacyRecord | None
    announce: Callable[[bytes], Step]


@dataclass(frozen=True, slots=True)
class Aborted:
    """Nothing was aggregated. `blamed`: silo -> its encoded Blame, the proof that it sent an
    out-of-range weight; `refusals`: silo -> the reason code it refused the round with."""

    reason: str
    metrics: Mapping[str, Mapping[str, float]]
    blamed: Mapping[str, bytes] = field(default_factory=dict)
    refusals: Mapping[str, str] = field(default_factory=dict)


Outcome = Completed | Aborted


@dataclass(frozen=True, slots=True)
class CannotStart:
    """The round cannot be configured (too few silos for the threshold, and the like): the
    driver records it as started and aborted with `reason`."""

    reason: str


class RoundKind(Protocol):
    """A round as the hub drives it. Pure: values in, `Step`s out; `now` is an argument."""

    round_id: RoundId
    aggregation: str  # the stored name; the hub maps it to the wire enum
    offer_config: bytes  # the offer's `config` (the round log records its SHA-256)
    train_params_json: str  # the offer's `train_params_json` ("" when `config` carries them)

    def start(self, invited: Sequence[str], now: float) -> Step:
        """The offer is queued: the first phase's deadline begins."""
        ...

    def frame(self, silo_id: str, frame: Frame, now: float) -> Step: ...

    def upload(self, silo_id: str, upload: Upload, now: float) -> Step: ...

    def lost(self, silo_id: str, loss: Loss, now: float) -> Step: ...

    def tick(self, now: float) -> Step: ...

    def cancel(self, why: str, now: float) -> Step:
        """Abort from outside (the coordinator is stopping); a no-op once over."""
        ...

    def outcome(self) -> Outcome | None:
        """None while running. Heavy (decodes, aggregates): the driver's thread calls it once
        the round is over, outside the hub's lock; later calls return the same value."""
        ...

    def status(self) -> RoundStatus: ...

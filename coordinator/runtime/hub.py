"""The coordinator at run time: admits silos, drives rounds, checkpoints and records them.

Rule: this module owns the I/O around the pure pieces. `Hub` keeps the connected silos and
feeds the current round's `RoundMachine` (rounds.py) and aggregation protocol
(aggregation.py) under ONE lock; `Hub.run_rounds` is the single round-driver thread that
starts rounds, ticks deadlines with the real clock, and writes the round log and checkpoints.
The servicer (servicer.py) pumps each silo's stream in and out of the hub.

Resuming: at start, rounds left running by a crash are marked interrupted and the global model
comes from the round log's latest checkpoint, so a restarted coordinator continues until the
log holds `[rounds] count` completed rounds.

Blame: a secure round that aborts with silos proven to have sent an out-of-range weight element
(`CoordinatorRound.blamed`, secagg/blame.py) excludes them from every later round and the final
evaluation of this process (`Hub.excluded`, shown by `status`), and the proofs go with every
later offer of the same model, so the honest silos accept a retry of it without them; a
completed round drops the proofs. Exclusion lasts until the coordinator stops: revoking the
silo's certificate is what keeps it out for good.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography import x509

from coordinator.config import CoordinatorConfig
from coordinator.observability.ratelimit import PeerLog, exception_line
from coordinator.pki.authority import (
    PkiError,
    load_revoked_serials,
    load_signed_roster,
    roster_signature_path,
)
from coordinator.pki.operator import operator_name
from coordinator.rounds.fedavg import AggregationError, AggregationProtocol, make_aggregation
from coordinator.rounds.phases import (
    OFFER_PHASE,
    Dropped,
    Event,
    Phase,
    PhaseEnded,
    RoundId,
    RoundMachine,
    Stage,
)
from coordinator.rounds.secure import PARTICIPANT_SET_OF, PHASE_DEADLINE_KEYS, SecureRound, Step
from coordinator.rounds.secure_config import (
    SECAGG,
    SecureRoundError,
    apply_aggregate,
    build_round_config,
    check_aggregate,
    check_finite,
    layout_of,
)
from coordinator.rounds.stall import Diagnosis, Proceed, RoundEnd, StallWatch, Verdict
from coordinator.runtime import malloc
from coordinator.runtime.debug_pause import DebugPause
from coordinator.runtime.final_evaluation import EVALUATE, FinalEvaluationRun
from coordinator.runtime.outbound import OutboundQueue, Overflow
from coordinator.runtime.peer_input import clean_abort, clean_report, finite_mean
from coordinator.storage.checkpoints import Checkpoint, CheckpointCorrupt, CheckpointStore
from coordinator.storage.rollback import checkpoint_to_resume, take_pending
from coordinator.storage.roundlog import RoundLog
from coordinator.transport.servicer import RefusalCode, Refused
from protos import federation_pb2 as pb
from protos.names import aggregation_value
from secagg.chunking import BlobMeta, ChunkError, Reassembler, describe, split
from secagg.coordinator import Phase as SecAggPhase
from secagg.errors import ConfigError, MalformedMessage
from secagg.identity import (
    CertificateRejected,
    CertProblem,
    Roster,
    check_certificate,
    load_pem_certificate,
    uri_san,
)
from secagg.messages import AbortNotice as SecAggAbort
from secagg.messages import decode_message
from secagg.primitives import ring_dtype
from secagg.roster_sig import describe_roster, short_digest
from secagg.train_params import canonical_train_params
from secagg.trust import Trust
from silofed.tensors import StateDecodeError, sha256_hex, state_from_bytes, state_to_bytes

log = logging.getLogger("silofed.coordinator")

FEDERATION_FINISHED = "FEDERATION_FINISHED"
CANNOT_CONFIGURE = "CANNOT_CONFIGURE"
NOT_ENOUGH_SILOS = "NOT_ENOUGH_SILOS"


class Outcome(enum.Enum):
    """How `Hub.run_rounds` ended; `serve` maps it to the process exit code."""

    FINISHED = 0  # the log holds [rounds] count completed rounds
    NO_SILOS = 1  # too few silos connected within [rounds] start_timeout_s
    STALLED = 4  # the same cause aborted [rounds] max_consecutive_aborts rounds in a row
    STOPPED = 130  # a signal


COORDINATOR_STOPPING = "COORDINATOR_STOPPING"
TICK_S = 0.05
# The slowest upload a slot waits for (besides [deadlines] upload_progress_s): far below any
# network a cross-silo federation runs on, high enough that a trickle cannot hold a slot.
UPLOAD_MIN_RATE = 1 << 20  # bytes per second
UPLOAD_SLOT_POLL_S = 0.2
# The round-log participant set each secagg phase produces, by phase name.
SET_OF_PHASE = {phase.value: name for phase, name in PARTICIPANT_SET_OF.items()}

# Which refusals are "who you are is not allowed" vs "we cannot tell who you are".
_CODE_FOR = {
    CertProblem.NOT_FROM_FEDERATION_CA: RefusalCode.UNAUTHENTICATED,
    CertProblem.NO_URI_SAN: RefusalCode.UNAUTHENTICATED,
    CertProblem.WRONG_KEY_TYPE: RefusalCode.UNAUTHENTICATED,
}


@dataclass(frozen=True, slots=True)
class _Blob:
    """A payload queued for a silo; expanded into header + chunks only as the stream sends it."""

    round_id: int
    kind: pb.BlobKind.ValueType
    data: bytes
    sha256: bytes  # hashed once per round, not once per silo


@dataclass(frozen=True, slots=True)
class _Delivered:
    """Marker: everything queued before it has been handed to the silo's stream."""

    round_id: int


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A silo proven to have sent an out-of-range weight element: never invited again."""

    silo_id: str
    round_id: int  # the aborted round whose evidence names it
    at: float  # unix seconds


_Item = pb.CoordinatorMessage | _Blob | _Delivered | None
# A silo that reconnects only to stop reading again overflows once per round at most; still,
# one line per silo per interval.
_overflow_log = PeerLog(log)


@dataclass(eq=False)
class Session:
    """One admitted silo stream. The hub mutates it only under its lock.

    Its outbound queue is bounded in bytes (coordinator/runtime/outbound.py): past about one model
    the
    session closes itself (`overflow` says why), drops what it queued and cancels its stream when
    the servicer attached one; the hub then drops the silo like a disconnected one."""

    silo_id: str
    connected_since: float
    cert_not_after: float
    on_delivered: Callable[[Session, int], None]
    cert_serial: int = 0  # what `silofed-coordinator revoke --serial` takes
    queue: OutboundQueue[_Item] = field(default_factory=OutboundQueue)
    closed: bool = False
    overflow: Overflow | None = None  # set once the outbound queue passed its bound
    cancel_stream: Callable[[], object] | None = None  # ends the RPC even while a send blocks
    bytes_in: int = 0
    bytes_out: int = 0
    round_bytes_in: int = 0
    round_bytes_out: int = 0
    report: pb.TrainReport | None = None
    upload: Reassembler | None = None
    # The upload the hub's progress watch last saw and when it last moved (a chunk arrived).
    upload_watched: Reassembler | None = None
    upload_moved_at: float = 0.0
    upload_started_at: float = 0.0  # when the watched upload was first seen
    metrics: dict[str, float] = field(default_factory=dict)
    # secagg: the protocol's header of the masked vector being uploaded (from its BlobHeader)
    masked_header: bytes | None = None
    upload_slot: bool = False  # secagg: holds one of the hub's buffered-upload slots
    upload_buffer: np.ndarray | None = None  # secagg: where that upload's chunks are copied

    def upload_moved(self, upload: Reassembler, now: float) -> None:
        """`upload` received its header or a chunk at `now` (the progress and total bounds)."""
        if self.upload_watched is not upload:
            self.upload_started_at = now
        self.upload_watched, self.upload_moved_at = upload, now

    def attach_stream(self, cancel: Callable[[], object]) -> None:
        """The servicer's way to end this stream from the hub's side (`context.cancel`): a
        silo that does not read blocks its stream inside gRPC, where no queued item reaches."""
        self.cancel_stream = cancel
        if self.overflow is not None:
            cancel()

    def send(self, item: _Item) -> None:
        """Queue `item` for the stream. A closed session takes only the end marker (None)."""
        if item is None:
            self.queue.put_last(None)
            return
        if self.closed:
            return
        if isinstance(item, _Blob):
            accepted = self.queue.put(item, len(item.data), blob_bytes=len(item.data))
        elif isinstance(item, _Delivered):
            accepted = self.queue.put(item, 0)
        else:
            accepted = self.queue.put(item, item.ByteSize())
        if not accepted:
            self._overflowed()

    def _overflowed(self) -> None:
        """Past the bound: close now, free the queue, end the stream (its end drops the silo
        from the round, like any disconnection; without a stream to cancel, the hub's next tick
        does: `Hub._watch_streams`)."""
        self.overflow = self.queue.overflow
        self.closed = True
        self.queue.put_last(None)
        _overflow_log.warning(
            "outbound queue overflow",
            self.silo_id,
            "%s: %s; dropped from the round and disconnected",
            self.silo_id,
            self.overflow,
        )
        if self.cancel_stream is not None:
            self.cancel_stream()

    def next_messages(self, timeout_s: float) -> Iterable[pb.CoordinatorMessage] | None:
        """The next message(s) to send; empty when idle for `timeout_s`; None once closed.

        A blob is expanded lazily, chunk by chunk, as the stream sends it: the model's bytes
        are shared by every silo's queue and never copied whole per silo; they count against
        this queue's bound until the stream has taken them.
        """
        try:
            item = self.queue.get(timeout_s)
        except queue.Empty:
            return ()
        if item is None:
            return None
        if isinstance(item, _Delivered):
            self.on_delivered(self, item.round_id)
            return ()
        if isinstance(item, _Blob):
            return self._counted(_blob_messages(item))
        self._count_out(item.ByteSize())
        return (item,)

    def _counted(
        self, messages: Iterator[pb.CoordinatorMessage]
    ) -> Iterator[pb.CoordinatorMessage]:
        for message in messages:
            self._count_out(message.ByteSize())
            if message.HasField("blob_chunk"):
                self.queue.taken(len(message.blob_chunk.data))
            yield message

    def _count_out(self, n: int) -> None:
        self.bytes_out += n
        self.round_bytes_out += n


def _blob_messages(blob: _Blob) -> Iterator[pb.CoordinatorMessage]:
    meta = describe(blob.data, blob.sha256)
    header = pb.BlobHeader(
        round_id=blob.round_id,
        kind=blob.kind,
        total_bytes=meta.total_bytes,
        sha256=meta.sha256,
        chunk_count=meta.chunk_count,
    )
    yield pb.CoordinatorMessage(blob_header=header)
    for index, data in enumerate(split(blob.data)):
        chunk = pb.BlobChunk(round_id=blob.round_id, kind=blob.kind, index=index, data=data)
        yield pb.CoordinatorMessage(blob_chunk=chunk)


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


class Hub:
    """Connected silos + the round in progress, behind one lock."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        model_factory: Callable[[], torch.nn.Module],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.sessions: dict[str, Session] = {}
        self.ca_cert = load_pem_certificate(config.tls.ca_cert.read_bytes())
        self._roster_watch = _FileWatch(config.tls.roster)
        self._revoked_watch = _FileWatch(config.tls.revoked)
        self.roster = Roster.from_json(config.tls.roster.read_text())
        self.revoked: frozenset[int] = frozenset()
        # Roster delivery: the signed roster silos are sent when they pin another one.
        self._roster_sig_watch = _FileWatch(roster_signature_path(config.tls.roster))
        self._roster_update: pb.RosterUpdate | None = None
        self._refresh_trust()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.roundlog = RoundLog(config.state_dir / "rounds.sqlite")
        self.checkpoints = CheckpointStore(config.state_dir / "checkpoints")
        self.global_state = self._resume(model_factory)
        self.machine: RoundMachine | None = None  # plaintext-insecure rounds
        self.aggregation: AggregationProtocol | None = None
        self.secure: SecureRound | None = None  # secagg rounds
        # At most P masked vectors are buffered at once (docs/secagg-protocol.md §5 step 3.8):
        # memory stays (P+1)·L words for any number of silos; other uploads wait, held by flow
        # control.
        self.upload_slots = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self._free_buffers: list[np.ndarray] = []  # reused round after round (at most P)
        self._next_offer: bytes | None = None  # the last checkpoint's bytes = the next offer
        self.phase_started = 0.0
        self.stopping = threading.Event()
        self._model_len = 0  # size of the offered model: bounds what an update may be
        self._ran_any = False
        rc = config.rounds
        self.stall = StallWatch(
            rc.max_consecutive_aborts, rc.abort_backoff_initial_s, rc.abort_backoff_max_s
        )
        self.verdict: Verdict = Proceed(0.0, 0)  # how the last round ended, for status
        self._refusals: dict[str, str] = {}  # this round: silo -> the reason code it sent
        self.pause = DebugPause.from_config(config, self.stopping)  # [debug]: tests only
        self._final: FinalEvaluationRun | None = None  # while the final evaluation runs
        # What silos do wrong is logged at most once per (cause, silo) per 10 s, with counts.
        self.peer_log = PeerLog(log)
        # Silos proven to have sent an out-of-range weight element, and the proofs (encoded
        # secagg Blame messages) for the model `_blame_model` that go with each offer of it.
        self.excluded: dict[str, Exclusion] = {}
        self._blame_model = b""
        self._blame_evidence: list[bytes] = []

    # ---- trust -----------------------------------------------------------------------------

    def _refresh_trust(self) -> None:
        """Reload roster and revocations when their files change: no restart needed."""
        roster_changed = self._roster_watch.changed()
        if self._roster_sig_watch.changed() or roster_changed:
            self._reload_roster()
        if self._revoked_watch.changed():
            self.revoked = load_revoked_serials(self.config.tls.revoked)
            log.info("revocation list loaded: %d revoked serials", len(self.revoked))

    def _reload_roster(self) -> None:
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
        live = [s for s in self.sessions.values() if not s.closed]
        for s in live:
            s.send(pb.CoordinatorMessage(roster_update=self._roster_update))
        if live:
            log.info(
                "sent the signed roster version %d to %d connected silos",
                self.roster.version,
                len(live),
            )

    def _send_roster(self, session: Session, pinned_digest: bytes) -> None:
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

    def check_peer(self, cert_pem: bytes | None) -> str:
        """The silo id of the TLS peer `cert_pem` if it may open a stream: the servicer asks
        when the stream opens, before reading anything. Raises Refused saying why not."""
        return self._checked_peer(cert_pem)[1]

    def _checked_peer(self, cert_pem: bytes | None) -> tuple[x509.Certificate, str]:
        """The peer's certificate and silo id after the federation CA, key, validity,
        revocation and roster checks (trust files reread when they changed). Raises Refused."""
        if cert_pem is None:
            raise Refused(
                RefusalCode.UNAUTHENTICATED,
                "no client certificate was presented; configure the silo's [tls] cert and key",
            )
        try:
            cert = load_pem_certificate(cert_pem)
        except ValueError:
            raise Refused(
                RefusalCode.UNAUTHENTICATED, "the client certificate could not be parsed"
            ) from None
        with self.lock:
            self._refresh_trust()
            roster, revoked = self.roster, tuple(self.revoked)
        try:
            silo_id = check_certificate(
                cert, self.ca_cert, now=dt.datetime.now(dt.UTC), roster=roster,
                revoked_serials=revoked,
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
        return cert, silo_id

    def admit(self, cert_pem: bytes | None, hello: pb.Hello) -> Session:
        """Check the TLS peer (again: the servicer checked it when the stream opened, and the
        trust files may have changed) and its hello, and start its session, replacing the
        silo's previous one. Raises Refused with an operator-readable detail."""
        cert, silo_id = self._checked_peer(cert_pem)
        with self.lock:
            if hello.silo_id and hello.silo_id != silo_id:
                raise Refused(
                    RefusalCode.PERMISSION_DENIED,
                    f"hello claims silo id {hello.silo_id} but the certificate is {silo_id}; "
                    "a silo may only speak for itself",
                )
            old = self.sessions.get(silo_id)
            if old is not None:
                log.info("%s reconnected; closing its previous stream", silo_id)
                self._replace(old)
            session = Session(
                silo_id=silo_id,
                connected_since=self.clock(),
                cert_not_after=cert.not_valid_after_utc.timestamp(),
                on_delivered=self._delivered,
                cert_serial=cert.serial_number,
            )
            self.sessions[silo_id] = session
            log.info("silo connected: %s (%d connected)", silo_id, len(self.sessions))
            if hello.roster_digest != self.roster.digest():
                # Not a refusal (a silo may lag a roster version behind): send it the signed one.
                self._send_roster(session, hello.roster_digest)
            self.changed.notify_all()
            return session

    def welcome(self, session: Session) -> pb.Welcome:
        return pb.Welcome(federation_id=self.config.federation_id, silo_id=session.silo_id)

    # ---- stream events ---------------------------------------------------------------------

    def on_disconnect(self, session: Session, why: str) -> None:
        # Called up to three times per stream (reader, generator, RPC callback): idempotent.
        with self.lock:
            current = self.sessions.get(session.silo_id) is session
            if current:
                del self.sessions[session.silo_id]
                log.info("silo disconnected: %s (%s)", session.silo_id, why)
            if not session.closed:
                session.closed = True
                session.send(None)
            self._end_upload(session)
            # A replaced stream must not drop the silo's new stream from the round.
            if current:
                self._lost(session.silo_id, why)

    def _replace(self, session: Session) -> None:
        """Close a silo's previous stream; its work in the current round is lost with it."""
        session.closed = True
        session.send(None)
        if session.cancel_stream is not None:  # it may be stuck sending to a silo gone silent
            session.cancel_stream()
        self._end_upload(session)
        self._lost(session.silo_id, "replaced by a new stream")

    def _lost(self, silo_id: str, why: str) -> None:
        if self.machine is not None:
            self._apply(self.machine.disconnected(silo_id, self.clock()))
        if self.secure is not None:
            self._apply_secure(self.secure.lost(silo_id, self.clock(), why))

    def _delivered(self, session: Session, round_id: int) -> None:
        with self.lock:
            if self.machine is not None:
                _, events = self.machine.done(session.silo_id, round_id, OFFER_PHASE, self.clock())
                self._apply(events)

    def on_message(self, session: Session, message: pb.SiloMessage) -> None:
        """Handle one message from `session`'s stream. Whatever a silo sends, this raises only
        Refused: an unexpected error while handling it is that silo's protocol violation, it
        drops out of the round, and the servicer ends its stream (INVALID_ARGUMENT); the
        coordinator and the round go on."""
        self.peer_log.flush()  # counts of suppressed lines whose interval is over
        try:
            self._handle(session, message)
        except Refused:
            raise
        except Exception as exc:
            detail = f"protocol violation: {exception_line(exc)}"
            with self.lock:
                try:
                    self._failed(session, detail)
                except Exception as again:  # the round's state is broken: the stream still ends
                    self.peer_log.warning(
                        "cannot drop after a violation",
                        session.silo_id,
                        "%s: could not drop it from the round after %s: %s",
                        session.silo_id,
                        detail,
                        exception_line(again),
                    )
            raise Refused(RefusalCode.INVALID_ARGUMENT, detail) from exc

    def _handle(self, session: Session, message: pb.SiloMessage) -> None:
        kind = message.WhichOneof("kind")
        size = message.ByteSize()
        # Checked before anything stores or logs it (metrics, abort texts): peer_input.py.
        if kind == "train_report":
            report, metrics = clean_report(message.train_report)
            message = pb.SiloMessage(train_report=report)
            if metrics.dropped:
                self.peer_log.warning(
                    "metrics dropped",
                    session.silo_id,
                    "%s: report for round %d: %s",
                    session.silo_id,
                    report.round_id,
                    metrics.describe(),
                )
        elif kind == "abort":
            message = pb.SiloMessage(abort=clean_abort(message.abort))
        if kind == "blob_header" and message.blob_header.kind == pb.MASKED_VECTOR:
            # Before the lock: holds only this stream.
            self._wait_for_upload_slot(session, message.blob_header)
        with self.lock:
            session.bytes_in += size
            session.round_bytes_in += size
            if self._final is not None and self._final.take(session.silo_id, message):
                return  # an answer to the final evaluation (run_final_evaluation)
            if kind == "hello":
                self._reject(session, "hello sent twice on one stream")
            elif kind == "train_report":
                self._on_report(session, message.train_report)
            elif kind == "blob_header":
                self._on_blob_header(session, message.blob_header)
            elif kind == "blob_chunk":
                self._on_chunk(session, message.blob_chunk)
            elif kind == "secagg":
                self._on_secagg(session, message.secagg)
            elif kind == "abort":
                self.peer_log.warning(
                    "silo aborted",
                    session.silo_id,
                    "%s aborted round %d: %s %s",
                    session.silo_id,
                    message.abort.round_id,
                    message.abort.reason,
                    message.abort.detail,
                )
                self._note_refusal(session, message.abort.round_id, message.abort.reason)
                self._failed(session, f"silo aborted: {message.abort.reason}")
            else:
                self._reject(session, f"unexpected message {kind!r}")

    def _note_refusal(self, session: Session, round_id: int, reason: str) -> None:
        """Remember why a silo refused the current round (the stall diagnosis names it)."""
        current = self._current_round_id()
        if current is not None and round_id == current:
            self._refusals[session.silo_id] = reason[:64]

    def _current_round_id(self) -> int | None:
        if self.secure is not None:
            return self.secure.config.round_id
        return None if self.machine is None else self.machine.round_id

    def _reject(self, session: Session, detail: str) -> None:
        # The cause is the detail up to its first colon ("bad update chunk: ...").
        self.peer_log.warning(
            detail.split(":", 1)[0][:64], session.silo_id, "%s: %s", session.silo_id, detail
        )
        self._failed(session, detail)

    def _failed(self, session: Session, detail: str) -> None:
        if self.machine is not None:
            self._apply(self.machine.failed(session.silo_id, detail, self.clock()))
        if self.secure is not None:
            self._apply_secure(self.secure.failed(session.silo_id, self.clock(), detail))

    def _current_phase(self, session: Session, round_id: int) -> bool:
        m = self.machine
        return m is not None and m.expects(session.silo_id, round_id, "train")

    def _on_report(self, session: Session, report: pb.TrainReport) -> None:
        sr = self.secure
        if sr is not None:
            # Under secagg a report carries evaluation metrics only (plaintext by design: they
            # are the silo's score of the global model it received, not its update).
            if report.round_id == sr.config.round_id and session.silo_id in sr.config.invited:
                session.metrics = dict(report.metrics)
            return
        m = self.machine
        if m is not None and m.expects(session.silo_id, report.round_id, OFFER_PHASE):
            # A report proves the model arrived, even if the stream's delivery marker has not
            # been processed yet.
            self._apply(m.done(session.silo_id, report.round_id, OFFER_PHASE, self.clock())[1])
        if not self._current_phase(session, report.round_id):
            self.peer_log.info(
                "stray report",
                session.silo_id,
                "ignoring late or stray report from %s for round %d",
                session.silo_id,
                report.round_id,
            )
            return
        session.report = report
        session.upload = None

    def _on_blob_header(self, session: Session, header: pb.BlobHeader) -> None:
        if header.kind == pb.MASKED_VECTOR:
            self._on_masked_header(session, header)
            return
        report = session.report
        if report is None or not self._current_phase(session, header.round_id):
            self.peer_log.info(
                "stray blob",
                session.silo_id,
                "ignoring blob from %s for round %d",
                session.silo_id,
                header.round_id,
            )
            session.upload = None
            return
        if header.kind != pb.PLAINTEXT_UPDATE or header.sha256 != report.update_sha256:
            self._reject(session, "update blob does not match its train report")
            return
        try:
            meta = BlobMeta(header.total_bytes, header.sha256, header.chunk_count)
            limit = 2 * self._model_len + (1 << 20)
            session.upload = Reassembler(meta, max_total_bytes=limit)
        except ChunkError as exc:
            self._reject(session, f"bad update header: {exc}")

    def _on_chunk(self, session: Session, chunk: pb.BlobChunk) -> None:
        upload = session.upload
        if upload is None:
            return  # a blob we decided to ignore
        masked = session.upload_buffer is not None
        try:
            upload.add(chunk.index, chunk.data)
            session.upload_moved(upload, self.clock())  # it moves
            if not upload.complete:
                return
            data = upload.finish_into() if masked else upload.finish()
        except ChunkError as exc:
            self._cancel_upload(session)
            self._reject(session, f"bad update chunk: {exc}")
            return
        session.upload = None
        if masked:
            self._on_masked_vector(session, upload.sha256)
        else:
            assert isinstance(data, bytes)
            self._on_update(session, chunk.round_id, data)

    def _on_update(self, session: Session, round_id: int, data: bytes) -> None:
        m, agg, report = self.machine, self.aggregation, session.report
        if m is None or agg is None or report is None or not self._current_phase(session, round_id):
            return
        try:
            update = state_from_bytes(data)
            # Checked whole before any of it is added (aggregation.check_update): a refused
            # update drops this silo from the round (INVALID) and leaves the accumulator as it was.
            agg.contribute(session.silo_id, int(report.num_examples), update)
        except (AggregationError, StateDecodeError) as exc:
            self._reject(session, f"update refused: {exc}")
            return
        session.metrics = dict(report.metrics)
        _, events = m.done(session.silo_id, round_id, "train", self.clock())
        self._apply(events)

    # ---- secure aggregation: frames and masked vectors ----------------------------------------

    def _on_secagg(self, session: Session, frame: pb.SecAggFrame) -> None:
        sr = self.secure
        if sr is None or frame.round_id != sr.config.round_id:
            self.peer_log.info(
                "stray secagg frame",
                session.silo_id,
                "ignoring a secagg frame from %s for round %d",
                session.silo_id,
                frame.round_id,
            )
            return
        try:
            decoded = decode_message(frame.payload)
        except MalformedMessage:
            decoded = None  # the protocol refuses it below, with the reason
        if isinstance(decoded, SecAggAbort):
            self._note_refusal(session, frame.round_id, decoded.reason.name)
        self._apply_secure(sr.handle(session.silo_id, frame.payload, self.clock()))

    def _wait_for_upload_slot(self, session: Session, header: pb.BlobHeader) -> None:
        """Block this silo's reader until a buffered-upload slot frees, for a silo the masked
        phase waits for only: anyone else (or a header without its protocol header) returns at
        once, without a slot, and `_on_masked_header` refuses its vector. The wait ends with
        the phase (its deadline)."""
        while True:
            with self.lock:
                if (
                    session.upload_slot
                    or not header.protocol_header
                    or self._upload_refusal(session) is not None
                ):
                    return
            if self.upload_slots.acquire(timeout=UPLOAD_SLOT_POLL_S):
                with self.lock:
                    if session.upload_slot or self._upload_refusal(session) is not None:
                        self.upload_slots.release()  # the phase or the stream ended meanwhile
                    else:
                        session.upload_slot = True
                return

    def _upload_refusal(self, session: Session) -> str | None:
        """Why `session` may not upload a masked vector now; None when the masked phase of the
        current round waits for its vector (it is in U2, not dropped, not uploaded yet)."""
        sr = self.secure
        if session.closed or self.stopping.is_set():
            return "its stream is closing"
        if sr is None:
            return "no secure round is running"
        if sr.round.phase is not SecAggPhase.MASKED:
            return f"round {sr.config.round_id} is in phase {sr.phase_name}, not masked"
        if session.silo_id not in sr.round.waiting_for():
            return (
                f"round {sr.config.round_id} waits for no masked vector from it (not in U2, "
                "dropped, or already uploaded)"
            )
        return None

    def _end_upload(self, session: Session) -> None:
        """Give back the session's upload slot and buffer (the vector was added or refused)."""
        session.upload_watched, session.masked_header = None, None
        if session.upload_buffer is not None:
            self._free_buffers.append(session.upload_buffer)
            session.upload_buffer = None
        if session.upload_slot:
            session.upload_slot = False
            self.upload_slots.release()

    def _on_masked_header(self, session: Session, header: pb.BlobHeader) -> None:
        sr = self.secure
        refusal = self._upload_refusal(session)
        if sr is None or refusal is not None:
            # Not an upload this round waits for: no slot, no buffer; its chunks are ignored.
            self.peer_log.warning(
                "masked vector refused",
                session.silo_id,
                "refused a masked vector from %s for round %d: %s",
                session.silo_id,
                header.round_id,
                refusal or "no secure round is running",
            )
            self._cancel_upload(session)  # whatever it was uploading, nothing waits for it
            return
        if not header.protocol_header:
            self._cancel_upload(session)
            self._reject(session, "masked vector header without its protocol_header")
            return
        if session.upload is not None:
            self._cancel_upload(session)
            self._reject(session, "a second masked vector began before the first was complete")
            return
        if header.round_id != sr.config.round_id:
            self._cancel_upload(session)
            self._reject(
                session,
                f"masked vector for round {header.round_id} during round {sr.config.round_id}",
            )
            return
        if not session.upload_slot:  # the stream or the coordinator is stopping
            return
        dtype = ring_dtype(sr.config.ring_bits)
        try:
            meta = BlobMeta(header.total_bytes, header.sha256, header.chunk_count)
            limit = sr.config.length * dtype.itemsize
            if meta.total_bytes != limit:
                raise ChunkError(
                    f"a masked vector has {limit} bytes, the header says {meta.total_bytes}"
                )
            buffer = self._take_buffer(sr.config.length, dtype)
            session.upload_buffer = buffer
            session.upload = Reassembler(meta, max_total_bytes=limit, into=buffer.data)
            # Opaque here: secagg checks it (signature, session, length, digest) with the vector.
            session.masked_header = bytes(header.protocol_header)
        except ChunkError as exc:
            self._cancel_upload(session)
            self._reject(session, f"bad masked vector header: {exc}")
            return
        # The slot is held from here: the progress watch (`_watch_streams`) frees it when
        # chunks stop arriving.
        if session.upload is not None:
            session.upload_moved(session.upload, self.clock())

    def _cancel_upload(self, session: Session) -> None:
        session.upload = None
        self._end_upload(session)

    def _watch_streams(self, now: float) -> None:
        """Every tick: drop the silos whose outbound queue overflowed (they do not read) like
        disconnected ones, and the uploads that received no chunk for [deadlines]
        upload_progress_s (the silo drops out of the round; its slot and buffer are freed)."""
        limit = self.config.deadlines.upload_progress_s
        for s in list(self.sessions.values()):
            if s.overflow is not None:  # logged when it happened (Session._overflowed)
                self.on_disconnect(s, f"outbound queue overflow: {s.overflow}")
                continue
            upload = s.upload
            if upload is None:
                continue
            if upload is not s.upload_watched:  # an update whose header just arrived
                s.upload_moved(upload, now)
                continue
            idle = now - s.upload_moved_at
            # A slot is also bounded in total: a chunk every (limit - 1) s must not hold it for
            # the whole phase. Allowed: the progress limit plus the size at UPLOAD_MIN_RATE.
            allowed = limit + upload.meta.total_bytes / UPLOAD_MIN_RATE
            held = now - s.upload_started_at
            if held >= allowed:
                self._cancel_upload(s)
                self._reject(
                    s,
                    f"upload too slow: {held:.1f} s for {upload.meta.total_bytes} bytes (at most "
                    f"[deadlines] upload_progress_s = {limit:g} s plus "
                    f"{UPLOAD_MIN_RATE / 2**20:g} MiB/s); its upload slot is freed",
                )
            elif idle >= limit:
                self._cancel_upload(s)
                self._reject(
                    s,
                    f"upload stalled: no chunk for {idle:.1f} s ([deadlines] upload_progress_s "
                    f"= {limit:g}); its upload slot is freed",
                )

    def _take_buffer(self, length: int, dtype: np.dtype[Any]) -> np.ndarray:
        while self._free_buffers:
            buffer = self._free_buffers.pop()
            if buffer.shape == (length,) and buffer.dtype == dtype:
                return buffer
        return np.empty(length, dtype=dtype)

    def _on_masked_vector(self, session: Session, sha256: bytes) -> None:
        sr, masked_header, vector = self.secure, session.masked_header, session.upload_buffer
        session.masked_header = None
        try:
            if sr is None or masked_header is None or vector is None:
                return
            # The transport hashed exactly these bytes as they arrived: no second pass.
            step = sr.masked_vector(
                session.silo_id, masked_header, vector, self.clock(), vector_sha256=sha256
            )
        finally:
            self._end_upload(session)  # added into the accumulator (or refused): reused
        self._apply_secure(step)

    def _apply_secure(self, step: Step) -> None:
        """Send what the protocol produced and record what happened (under the lock)."""
        sr = self.secure
        if sr is None:
            return
        round_id = sr.config.round_id
        for silo_id, payload in step.sends:
            s = self.sessions.get(silo_id)
            if s is not None and not s.closed:
                frame = pb.SecAggFrame(round_id=round_id, payload=payload)
                s.send(pb.CoordinatorMessage(secagg=frame))
        self._record_events(round_id, step.events)
        self.pause.after_phases(step.events)

    # ---- the round driver ------------------------------------------------------------------

    def _apply(self, events: Sequence[Event]) -> None:
        """Record what the machine decided (called under the lock)."""
        if self.machine is not None:
            self._record_events(self.machine.round_id, events)

    def _record_events(self, round_id: int, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, Dropped):
                log.warning(
                    "round %d: %s dropped in phase %s (%s: %s)",
                    round_id,
                    event.silo_id,
                    event.phase,
                    event.reason.value,
                    event.detail,
                )
                self.roundlog.record_dropout(
                    round_id, event.silo_id, phase=event.phase, reason=event.reason.value
                )
                s = self.sessions.get(event.silo_id)
                if s is not None and not s.closed:
                    s.send(
                        pb.CoordinatorMessage(
                            abort=pb.AbortNotice(
                                round_id=round_id, reason=event.reason.value, detail=event.detail
                            )
                        )
                    )
            elif isinstance(event, PhaseEnded):
                self.roundlog.record_phase(
                    round_id, event.phase, started_at=event.started_at, ended_at=event.ended_at
                )
                if self.secure is not None and event.phase in SET_OF_PHASE:
                    self.roundlog.record_participants(
                        round_id, SET_OF_PHASE[event.phase], event.survivors
                    )
                log.info(
                    "round %d: phase %s ended with %d silos (%.2f s)",
                    round_id,
                    event.phase,
                    len(event.survivors),
                    event.ended_at - event.started_at,
                )
        self.changed.notify_all()

    def completed_rounds(self) -> int:
        return sum(1 for r in self.roundlog.rounds() if r.status.value == "completed")

    def wait_for_silos(self, n: int, timeout_s: float) -> bool:
        """Wait until `n` silos that may be invited (connected, not excluded) are connected."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while len(self._eligible()) < n and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.5))
            return len(self._eligible()) >= n

    def _eligible(self) -> list[str]:
        """The connected silos a round may invite, sorted: all but the excluded ones."""
        return sorted(k for k in self.sessions if k not in self.excluded)

    def run_rounds(self) -> Outcome:
        """Run rounds until the log holds `[rounds] count` completed ones.

        After an aborted round the next waits (exponential backoff, or until a silo that was
        away connects); the same cause `[rounds] max_consecutive_aborts` times in a row ends
        the run as STALLED with a diagnosis (logged, and kept in that round's log entry)."""
        cfg = self.config.rounds
        while not self.stopping.is_set():
            done = self.completed_rounds()
            if done >= cfg.count:
                log.info("federation finished: %d completed rounds in the log", done)
                self.run_final_evaluation()
                # A signal during the final evaluation: the silos reconnect to the next start.
                return Outcome.STOPPED if self.stopping.is_set() else Outcome.FINISHED
            first = not self._ran_any  # the first round of this process, also after a restart
            need = (cfg.start_silos or cfg.min_silos) if first else cfg.min_silos
            if not self.wait_for_silos(need, cfg.start_timeout_s):
                if self.stopping.is_set():
                    break
                if not self.roundlog.last_round_id():  # the federation never started
                    log.error(
                        "gave up: fewer than %d silos connected within %.0f s "
                        "([rounds] start_timeout_s)",
                        need,
                        cfg.start_timeout_s,
                    )
                    return Outcome.NO_SILOS
                # Silos that took part are gone: an attempt that counts towards the stall
                # diagnosis (which names them), after waiting start_timeout_s for them.
                self._record_missing_silos(need)
            else:
                self.run_one_round(done)
            self._ran_any = True
            malloc.trim()
            verdict = self.verdict
            if isinstance(verdict, Diagnosis):
                log.error("stopping: %s", verdict)
                return Outcome.STALLED
            if verdict.wait_s > 0:
                log.warning(
                    "%d aborted rounds in a row; next attempt in %.1f s (sooner if a silo "
                    "reconnects)",
                    verdict.aborted_in_a_row,
                    verdict.wait_s,
                )
                self._back_off(verdict.wait_s)
        return Outcome.STOPPED

    # ---- the final evaluation (not a round; coordinator/runtime/final_evaluation.py)
    # ----------------------

    def run_final_evaluation(self) -> None:
        """Have the connected silos evaluate the last completed round's model, and record it in
        the round log, once per model. Skipped when the log already holds it; not recorded when
        the coordinator stops meanwhile (the next start runs it). Never raises for a silo's or a
        checkpoint's fault: the federation's rounds are done whatever happens here."""
        target = self.roundlog.latest_checkpoint()
        if target is None or target.round_id < 1:
            return
        if self.roundlog.final_evaluation(target.round_id) is not None:
            log.info("the final model (round %d) was already evaluated", target.round_id)
            return
        if not self._ran_any:  # restarted after the last round: wait for the silos to return
            cfg = self.config.rounds
            self.wait_for_silos(cfg.start_silos or cfg.min_silos, cfg.start_timeout_s)
        if self.stopping.is_set():
            return
        try:
            model = self.checkpoints.load_bytes(target.path, target.sha256)
        except CheckpointCorrupt as exc:
            log.error("final evaluation not run: %s", exc)
            return
        with self.lock:
            # An excluded silo's figures would enter the global metrics: it is not asked.
            asked = {k: self.sessions[k] for k in self._eligible()}
            if not asked:
                log.warning(
                    "final evaluation not run: no silo connected; start the coordinator again "
                    "to run it"
                )
                return
            d = self.config.deadlines
            now = self.clock()
            run = FinalEvaluationRun(
                target.round_id, target.sha256, frozenset(asked), now, now + d.offer_s + d.train_s
            )
            digest = bytes.fromhex(target.sha256)
            offer = pb.RoundOffer(
                round_id=target.round_id,
                aggregation=aggregation_value(EVALUATE),
                model_sha256=digest,
                model_bytes=len(model),
            )
            for s in asked.values():
                s.send(pb.CoordinatorMessage(round_offer=offer))
                s.send(_Blob(target.round_id, pb.GLOBAL_MODEL, model, digest))
            del model
            self._final = run
            log.info(
                "final evaluation of round %d's model %s: asking %d silos",
                target.round_id,
                target.sha256[:12],
                len(asked),
            )
            try:
                while not self.stopping.is_set():
                    # A silo that left or reconnected (a new stream never got the offer) is
                    # no longer waited for.
                    same = [k for k, s in self.sessions.items() if asked.get(k) is s]
                    if run.over(self.clock(), same):
                        break
                    self.changed.wait(TICK_S)
            finally:
                self._final = None
            if self.stopping.is_set():
                log.warning("final evaluation interrupted; the next start runs it")
                return
            self._record_final_evaluation(run)

    def _record_final_evaluation(self, run: FinalEvaluationRun) -> None:
        global_metrics = run.global_metrics()
        self.roundlog.record_final_evaluation(
            run.round_id,
            model_sha256=run.model_sha256,
            started_at=run.started_at,
            ended_at=self.clock(),
            asked=run.asked,
            silo_metrics=run.answers,
            refusals=run.refusals,
            global_metrics=global_metrics,
        )
        for silo_id, reason in sorted(run.refusals.items()):
            log.warning("final evaluation: %s declined (%s)", silo_id, reason)
        silent = sorted(run.asked - set(run.answers) - set(run.refusals))
        if silent:
            log.warning("final evaluation: no answer from %s", ", ".join(silent))
        shown = " ".join(f"{k}={v:.4f}" for k, v in global_metrics.items())
        log.info(
            "final evaluation of round %d's model: %d of %d silos answered %s",
            run.round_id,
            len(run.answers),
            len(run.asked),
            shown,
        )

    def _record_missing_silos(self, need: int) -> None:
        """An attempt that could not start: fewer than `need` silos came back within
        [rounds] start_timeout_s. Logged as an aborted round naming the missing roster members,
        so the stall watch counts it and its diagnosis says whom to bring back."""
        cfg = self.config.rounds
        with self.lock:
            self._refresh_trust()
            connected = self._eligible()
            missing = sorted(set(self.roster.entries) - set(connected) - set(self.excluded))
            round_id = RoundId(self.roundlog.last_round_id() + 1)
            model = self._next_offer or state_to_bytes(self.global_state)
            self._refusals = {}
            self.roundlog.start_round(
                round_id,
                started_at=self.clock(),
                aggregation=cfg.aggregation,
                config_digest=hashlib.sha256(b"").hexdigest(),
                model_in_sha256=hashlib.sha256(model).hexdigest(),
                invited=connected,
            )
        reason = (
            f"{NOT_ENOUGH_SILOS}: {len(connected)} silos connected, {need} needed ([rounds] "
            f"min_silos) after waiting {cfg.start_timeout_s:.0f} s; missing: "
            + (", ".join(missing) or "none of the roster")
        )
        self._finish_aborted(round_id, connected, reason, missing=missing)

    def _back_off(self, wait_s: float) -> None:
        """Wait `wait_s` before the next attempt, or less: until a silo that was not connected
        connects (a restarted silo is what most aborted rounds wait for)."""
        deadline = time.monotonic() + wait_s
        with self.lock:
            before = set(self._eligible())
            while not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or set(self._eligible()) - before:
                    return
                self.changed.wait(min(left, 0.5))

    def run_one_round(self, completed_before: int) -> None:
        """One round, start to end; `self.verdict` says what should happen next."""
        cfg = self.config.rounds
        round_id = RoundId(self.roundlog.last_round_id() + 1)
        model_bytes = self._next_offer or state_to_bytes(self.global_state)
        self._next_offer = None
        self._model_len = len(model_bytes)
        model_sha = hashlib.sha256(model_bytes).digest()
        with self.lock:
            self._refresh_trust()
            invited = self._eligible()[: cfg.silos_per_round or None]
            now = self.clock()
            for s in self.sessions.values():  # a stalled upload of an earlier round holds no slot
                s.upload = None
                self._end_upload(s)
            cannot_start = ""
            self._refusals = {}
            if cfg.aggregation == SECAGG:
                try:
                    round_config = self._begin_secure(round_id, invited, model_sha, now)
                except SecureRoundError as exc:  # too few silos for the threshold, and the like
                    round_config, cannot_start = b"", f"{CANNOT_CONFIGURE}: {exc}"
            else:
                round_config = self._begin_plaintext(round_id)
            self.roundlog.start_round(
                round_id,
                started_at=now,
                aggregation=cfg.aggregation,
                config_digest=hashlib.sha256(round_config).hexdigest(),
                model_in_sha256=model_sha.hex(),
                invited=invited,
                rollback_of=take_pending(self.config.state_dir),  # `rollback --to N`, once
            )
            self.roundlog.record_participants(round_id, "invited", invited)
            log.info(
                "round %d (%d/%d, %s): offering the model to %d silos: %s",
                round_id,
                completed_before + 1,
                cfg.count,
                cfg.aggregation,
                len(invited),
                ", ".join(invited),
            )
            if cannot_start:
                self._finish_aborted(round_id, invited, cannot_start)
                return
            offer = pb.RoundOffer(
                round_id=round_id,
                aggregation=aggregation_value(cfg.aggregation),
                config=round_config,
                model_sha256=model_sha,
                model_bytes=len(model_bytes),
                # Plaintext rounds only: a secure round's parameters are in its signed config.
                train_params_json=""
                if cfg.aggregation == SECAGG
                else canonical_train_params(self.config.train).decode(),
                # Why the honest silos may retry this model without the silos excluded in an
                # earlier attempt on it (each silo verifies the proofs itself).
                blame_evidence=self._blame_evidence if model_sha == self._blame_model else (),
            )
            for silo_id in invited:
                s = self.sessions[silo_id]
                s.round_bytes_in = s.round_bytes_out = 0
                s.report, s.metrics, s.masked_header = None, {}, None
                s.send(pb.CoordinatorMessage(round_offer=offer))
                s.send(_Blob(round_id, pb.GLOBAL_MODEL, model_bytes, model_sha))
                s.send(_Delivered(round_id))
            self.pause.at("offer")
            # The streams hold the bytes until sent; dropping ours frees them during the round.
            del model_bytes
            if self.machine is not None:
                self._apply(self.machine.start(invited, now))
            while not self._round_over() and not self.stopping.is_set():
                self.changed.wait(TICK_S)
                self._tick(self.clock())
            self._cancel("the coordinator is stopping")
        if self.secure is not None:
            self._finish_secure(round_id, self.secure, invited)
        elif self.machine is not None and self.aggregation is not None:
            self._finish(round_id, self.machine, self.aggregation, invited)

    def _begin_plaintext(self, round_id: RoundId) -> bytes:
        cfg, deadlines = self.config.rounds, self.config.deadlines
        aggregation = make_aggregation(cfg.aggregation, self.config.plaintext)
        phases = [Phase(OFFER_PHASE, deadlines.offer_s)] + [
            Phase(p.name, float(getattr(deadlines, p.deadline_key))) for p in aggregation.phases
        ]
        self.machine = RoundMachine(round_id, phases, cfg.min_silos)
        self.aggregation = aggregation
        aggregation.begin(self.global_state)
        return json.dumps({"aggregation": cfg.aggregation}).encode()

    def _begin_secure(
        self, round_id: RoundId, invited: Sequence[str], model_sha: bytes, now: float
    ) -> bytes:
        """The round's secagg configuration (the offer's `config`). Raises SecureRoundError when
        the round cannot be configured (the caller records it as started and aborted)."""
        settings = self.config.secagg
        assert settings is not None  # the config loader requires [secagg] for secagg
        d = self.config.deadlines
        try:
            config = build_round_config(
                settings,
                federation_id=self.config.federation_id,
                roster_version=self.roster.version,
                roster_digest=self.roster.digest(),
                round_id=round_id,
                invited=invited,
                model_version=round_id - 1,
                model_sha256=model_sha,
                layout=layout_of(self.global_state),
                deadlines_s=(
                    _whole_s(d.offer_s),
                    _whole_s(d.share_keys_s),
                    _whole_s(d.train_s),
                    _whole_s(d.consistency_s),
                    _whole_s(d.unmask_s),
                ),
                # Inside the signed configuration: every silo checks that all others trained
                # with the same parameters (the consistency digest covers the config).
                train_params=canonical_train_params(self.config.train),
                roster_size=len(self.roster.entries),
            )
        except ConfigError as exc:  # RoundConfig's own checks
            raise SecureRoundError(str(exc)) from exc
        trust = Trust(self.ca_cert, self.roster, tuple(self.revoked))
        self.secure = SecureRound(
            config,
            trust,
            {k: float(getattr(d, k)) for k in PHASE_DEADLINE_KEYS.values()},
            now=now,
            dp_rounds_before=self.roundlog.private_rounds_completed(),
        )
        return config.encode()

    def _round_over(self) -> bool:
        if self.secure is not None:
            return self.secure.over
        return self.machine is None or self.machine.over

    def _tick(self, now: float) -> None:
        self._watch_streams(now)
        if self.machine is not None:
            self._apply(self.machine.tick(now))
        if self.secure is not None:
            self._apply_secure(self.secure.tick(now))

    def _cancel(self, why: str) -> None:
        if self.machine is not None:
            self._apply(self.machine.cancel(why))
        if self.secure is not None:
            self._apply_secure(self.secure.cancel(self.clock(), why))

    def _finish_secure(self, round_id: RoundId, sr: SecureRound, invited: Sequence[str]) -> None:
        outcome = sr.result
        if outcome is None:
            # silo id -> its encoded Blame: empty unless the round proved who sent a bad weight
            blamed = {str(k): v for k, v in sr.round.blamed.items()}
            with self.lock:
                self.secure = None
                self._exclude(round_id, sr.config.model_sha256, blamed)
            self._finish_aborted(
                round_id, invited, sr.abort_reason or "aborted", blamed=sorted(blamed)
            )
            return
        self.pause.at("unmask")
        cfg = sr.config
        survivors = [str(s) for s in outcome.survivors]
        try:
            # ḡ is the weighted mean of the survivors' updates: all the coordinator ever
            # decodes. Applied only if clipped inputs can produce it (docs/secagg-protocol.md
            # §2.5) and the new model is finite; else the round is aborted, the model kept.
            check_aggregate(cfg, outcome.aggregate, outcome.weight_sum, len(survivors))
            new_state = apply_aggregate(self.global_state, outcome.aggregate, cfg.layout)
            check_finite(new_state)
        except SecureRoundError as exc:
            sr.round.result = dataclasses.replace(outcome, aggregate=np.empty(0, np.float32))
            with self.lock:
                self.secure = None
            self._finish_aborted(round_id, invited, str(exc))
            return
        weight_sum = outcome.weight_sum / cfg.weight_scale * cfg.weight_max
        report = outcome.dp_report
        # Free the accumulator (ḡ lives in it) before serialising the new model.
        sr.round.result = dataclasses.replace(outcome, aggregate=np.empty(0, np.float32))
        del outcome
        data = state_to_bytes(new_state)
        ckpt = self.checkpoints.save_bytes(round_id, data)
        self.pause.at("checkpoint")
        self._next_offer = data
        del data
        with self.lock:
            if report is not None:
                self.roundlog.record_privacy(
                    round_id,
                    mechanism="distributed discrete Gaussian",
                    noise_multiplier=report.noise_multiplier,
                    clip_norm=cfg.clip_l2,
                    epsilon=report.epsilon,
                    delta=report.delta,
                    details={
                        "noise_divisor": report.noise_divisor,
                        "honest_survivors": report.honest_survivors,
                        "effective_multiplier": report.effective_multiplier,
                        "rounds_composed": report.rounds,
                    },
                )
            self._apply_secure(Step(sr.round.announce(bytes.fromhex(ckpt.sha256))))
            self.secure = None
            self._complete(round_id, invited, survivors, new_state, ckpt, weight_sum)

    def _exclude(self, round_id: RoundId, model_sha: bytes, blamed: Mapping[str, bytes]) -> None:
        """Exclude the silos `blamed` proves sent an out-of-range weight element, and keep the
        proofs for the offers of `model_sha` (under the lock)."""
        if not blamed:
            return
        if model_sha != self._blame_model:
            self._blame_model, self._blame_evidence = model_sha, []
        now = self.clock()
        for silo_id, evidence in sorted(blamed.items()):
            self._blame_evidence.append(evidence)
            self.excluded.setdefault(silo_id, Exclusion(silo_id, round_id, now))
            s = self.sessions.get(silo_id)
            which = (
                f"--serial {s.cert_serial:x}" if s is not None and s.cert_serial else "--cert FILE"
            )
            log.error(
                "round %d: %s sent an out-of-range weight element, proven by its own signed "
                "masked-input header and key commitment (a Blame, sent to the other silos with "
                "the next offers of this model); excluded from every later round until this "
                "coordinator restarts. Revoke it to keep it out: silofed-coordinator revoke "
                "--dir <federation dir> %s --reason 'blamed in round %d'",
                round_id,
                silo_id,
                which,
                round_id,
            )

    def _finish(
        self,
        round_id: RoundId,
        machine: RoundMachine,
        aggregation: AggregationProtocol,
        invited: Sequence[str],
    ) -> None:
        if machine.stage is not Stage.READY:
            with self.lock:
                self.machine, self.aggregation = None, None
            self._finish_aborted(round_id, invited, machine.abort_reason or "aborted")
            return
        try:
            result = aggregation.finish()
        except AggregationError as exc:  # NON_FINITE_MODEL: the old model is kept, no checkpoint
            with self.lock:
                self.machine, self.aggregation = None, None
            self._finish_aborted(round_id, invited, str(exc))
            return
        data = state_to_bytes(result.new_state)
        ckpt = self.checkpoints.save_bytes(round_id, data)
        self.pause.at("checkpoint")
        self._next_offer = data
        del data
        with self.lock:
            self.machine, self.aggregation = None, None
            self._complete(
                round_id,
                invited,
                list(result.contributors),
                result.new_state,
                ckpt,
                result.weight_sum,
            )

    def _complete(
        self,
        round_id: RoundId,
        invited: Sequence[str],
        survivors: list[str],
        new_state: dict[str, torch.Tensor],
        ckpt: Checkpoint,
        weight_sum: float,
    ) -> None:
        """Record a completed round and tell the silos (under the lock)."""
        self.verdict = self.stall.observe(RoundEnd(round_id, completed=True))
        # The next model is a new one: no silo needs the proofs of this one's attempts.
        self._blame_model, self._blame_evidence = b"", []
        metrics = {s: self.sessions[s].metrics for s in survivors if s in self.sessions}
        global_metrics = _mean_eval(metrics.values())
        self._record_stats(round_id, invited)
        self.roundlog.record_participants(round_id, "finished", survivors)
        self.roundlog.finish_round(
            round_id,
            status="completed",
            ended_at=self.clock(),
            model_out_sha256=ckpt.sha256,
            checkpoint_path=str(ckpt.path),
            checkpoint_sha256=ckpt.sha256,
            weight_sum=weight_sum,
            global_metrics=global_metrics,
        )
        self.pause.at("roundlog")
        self.global_state = new_state
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(global_metrics.items()))
        log.info(
            "round %d completed: %d silos, weight %g, model %s %s",
            round_id,
            len(survivors),
            weight_sum,
            ckpt.sha256[:12],
            shown,
        )
        self._broadcast_result(
            pb.RoundResult(
                round_id=round_id,
                status=pb.ROUND_STATUS_COMPLETED,
                new_model_sha256=bytes.fromhex(ckpt.sha256),
                survivors=survivors,
            ),
            invited,
        )

    def _finish_aborted(
        self,
        round_id: RoundId,
        invited: Sequence[str],
        reason: str,
        *,
        missing: Sequence[str] = (),
        blamed: Sequence[str] = (),
    ) -> None:
        with self.lock:
            self._record_stats(round_id, invited)
            detail = self.roundlog.round_detail(round_id)
            dropped = (*(d.silo_id for d in detail.dropouts), *missing)
            absent = tuple(s for s in dropped if s not in self.sessions)
            end = RoundEnd(
                round_id, False, reason, dict(self._refusals), dropped, absent, tuple(blamed)
            )
            self.verdict = verdict = self.stall.observe(end)
            # The log says what happens next: the backoff, or why the federation stopped.
            extra: dict[str, object] = (
                {"stalled": verdict.to_dict()}
                if isinstance(verdict, Diagnosis)
                else {
                    "cause": end.cause,
                    "aborted_in_a_row": verdict.aborted_in_a_row,
                    "next_attempt_in_s": verdict.wait_s,
                }
            )
            if blamed:
                extra["blamed"] = list(blamed)  # proven, and excluded from later rounds
            self.roundlog.finish_round(
                round_id, status="aborted", ended_at=self.clock(), abort_reason=reason, extra=extra
            )
            log.warning("round %d aborted: %s; nothing was aggregated", round_id, reason)
            self._broadcast_result(
                pb.RoundResult(
                    round_id=round_id, status=pb.ROUND_STATUS_ABORTED, abort_reason=reason
                ),
                invited,
            )

    def _record_stats(self, round_id: int, invited: Sequence[str]) -> None:
        for silo_id in invited:
            s = self.sessions.get(silo_id)
            if s is None:
                continue
            self.roundlog.record_silo_stats(
                round_id,
                silo_id,
                bytes_in=s.round_bytes_in,
                bytes_out=s.round_bytes_out,
                metrics=s.metrics,
            )

    def _broadcast_result(self, result: pb.RoundResult, invited: Sequence[str]) -> None:
        for silo_id in invited:
            s = self.sessions.get(silo_id)
            if s is not None and not s.closed:
                s.send(pb.CoordinatorMessage(round_result=result))

    def close_all(self, *, finished: bool) -> None:
        """Close every silo stream. With `finished`, tell the silos the federation is over so
        they exit; otherwise (the coordinator is stopping) they reconnect with backoff."""
        reason, detail = (
            (FEDERATION_FINISHED, "the federation finished all its rounds")
            if finished
            else (COORDINATOR_STOPPING, "the coordinator is stopping; reconnect later")
        )
        with self.lock:
            for s in list(self.sessions.values()):
                s.send(pb.CoordinatorMessage(abort=pb.AbortNotice(reason=reason, detail=detail)))
                s.closed = True
                s.send(None)

    def status(self) -> pb.StatusReply:
        with self.lock:
            round_id, phase, since = 0, "", 0.0
            if self.machine is not None:
                m = self.machine
                round_id, phase, since = m.round_id, m.phase.name, m.phase_started_at
            if self.secure is not None:
                sr = self.secure
                round_id, phase, since = sr.config.round_id, sr.phase_name, sr.phase_started_at
            verdict = self.verdict
            if isinstance(verdict, Proceed) and verdict.aborted_in_a_row and not round_id:
                phase = f"backoff after {verdict.aborted_in_a_row} aborted rounds ({verdict.cause})"
            return pb.StatusReply(
                aborted_in_a_row=verdict.aborted_in_a_row if isinstance(verdict, Proceed) else 0,
                abort_cause=verdict.cause,
                federation_id=self.config.federation_id,
                silos=[
                    pb.SiloStatus(
                        silo_id=s.silo_id,
                        connected_since_unix=s.connected_since,
                        cert_not_after_unix=s.cert_not_after,
                        bytes_in=s.bytes_in,
                        bytes_out=s.bytes_out,
                    )
                    for s in self.sessions.values()
                ],
                current_round=round_id,
                phase=phase,
                phase_started_unix=since,
                rounds_completed=self.completed_rounds(),
                excluded=[
                    pb.ExcludedSilo(silo_id=e.silo_id, round_id=e.round_id, excluded_at_unix=e.at)
                    for _, e in sorted(self.excluded.items())
                ],
            )

    # ---- resume ----------------------------------------------------------------------------

    def _resume(self, model_factory: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
        interrupted = self.roundlog.mark_interrupted(ended_at=self.clock())
        if interrupted:
            log.warning(
                "rounds %s were interrupted by a previous stop; marked as such", interrupted
            )
        latest = checkpoint_to_resume(self.roundlog, self.config.state_dir)  # or rollback's N
        if latest is None:
            state = {k: v.detach().clone() for k, v in model_factory().state_dict().items()}
            ckpt = self.checkpoints.save(0, state)
            self.roundlog.record_checkpoint(0, ckpt.path, ckpt.sha256)
            log.info("initial model saved as round 0 checkpoint %s", ckpt.sha256[:12])
            return state
        state = self.checkpoints.load(Path(latest.path), latest.sha256)
        # A checkpoint stores its tensors sorted by name, but a secure round's layout is in the
        # model's own state-dict order (each silo checks it against its model): restore it.
        order = list(model_factory().state_dict())
        if sorted(order) == list(state):
            state = {name: state[name] for name in order}
        log.info(
            "resuming from the checkpoint of round %d (%s)", latest.round_id, latest.sha256[:12]
        )
        return state


def _whole_s(seconds: float) -> int:
    """A deadline as whole seconds for the round config (silos time out a little later)."""
    return max(1, math.ceil(seconds))


def _mean_eval(per_silo: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Global metric = unweighted mean over silos of each `eval_*` metric they reported, over
    finite values only (the edge drops the others; a metric with none is left out)."""
    sums: dict[str, list[float]] = {}
    for metrics in per_silo:
        for key, value in metrics.items():
            if key.startswith("eval_"):
                sums.setdefault(key, []).append(float(value))
    means = {k: finite_mean(v) for k, v in sums.items()}
    return {k: m for k, m in means.items() if m is not None}


__all__ = ["FEDERATION_FINISHED", "Hub", "Session", "sha256_hex"]


def write_port_file(state_dir: Path, port: int) -> Path:
    """Write the bound port atomically, so a reader never sees a half-written number."""
    path = state_dir / "coordinator.port"
    tmp = path.with_suffix(".port.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)
    return path


def serve(config: CoordinatorConfig, *, keep_serving: bool = False) -> int:
    """Run the coordinator until its rounds are done (or forever with `keep_serving`).

    Returns the process exit code (`Outcome`): 0 when the log holds `[rounds] count` completed
    rounds, 1 when too few silos connected in time, 4 when the federation stalled (the same
    cause aborted `[rounds] max_consecutive_aborts` rounds in a row; the diagnosis is logged and
    kept in the round log). Stops cleanly on SIGTERM/SIGINT (exit code 130 for the signal).
    """
    import signal

    from coordinator.observability.metrics import start_metrics_from_config
    from coordinator.observability.progress import start_live_status
    from coordinator.transport.server import ListenError, start_server
    from coordinator.transport.servicer import FederationServicer
    from silofed.task import load_model_factory

    malloc.limit_arenas()
    hub = Hub(config, model_factory=load_model_factory(config.task_spec))
    servicer = FederationServicer(
        hub,
        limits=config.server,
        # One stream per roster member, with room for the roster to grow while serving.
        max_silos=max(64, 2 * len(hub.roster.entries)),
    )
    try:
        running = start_server(
            servicer,
            listen=config.listen,
            ca_cert=config.tls.ca_cert,
            cert=config.tls.cert,
            key=config.tls.key,
            limits=config.server,
        )
    except ListenError as exc:
        hub.roundlog.close()
        raise ListenError(f"{exc}; change [server] listen in {config.source}") from None
    try:
        start_metrics_from_config(config, hub.status)  # [metrics] listen; a daemon thread
    except OSError as exc:
        running.stop()
        hub.roundlog.close()
        raise ListenError(
            f"cannot serve metrics: {exc.strerror or exc}; change [metrics] listen in "
            f"{config.source}"
        ) from None
    live = start_live_status(hub.status)  # round/phase line on a terminal; else a no-op
    interrupted = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("received signal %d: stopping", signum)
        interrupted.set()
        hub.stopping.set()
        with hub.lock:
            hub.changed.notify_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port_file = write_port_file(config.state_dir, running.port)
    log.info(
        "coordinator for federation %s listening on %s (port %d written to %s); aggregation %s",
        config.federation_id,
        config.listen,
        running.port,
        port_file,
        config.rounds.aggregation,
    )
    outcome = Outcome.STOPPED
    try:
        outcome = hub.run_rounds()
        if outcome is Outcome.FINISHED and keep_serving:
            log.info("all rounds done; --keep-serving: streams stay open until a signal")
            hub.stopping.wait()
    finally:
        live.stop()
        hub.close_all(finished=outcome is Outcome.FINISHED)
        running.stop()
        hub.roundlog.close()
    if interrupted.is_set() and outcome is not Outcome.FINISHED:
        return Outcome.STOPPED.value
    return outcome.value

"""The coordinator at run time: admits silos, feeds their messages to the round in progress.

Rule: `Hub` is the façade the servicer (transport/servicer.py) and the driver share: the
connected silos' streams (stream.py), trust (trust.py) and the current round, one `RoundKind`
(rounds/kind.py) whichever kind it is, all under ONE lock, and the clock everything reads
(clock.py). Heavy work is kept off the silos' reader threads under that lock: an upload's chunks
are copied and hashed on their stream's reader thread without it (uploads.on_chunk, under the
stream's own lock); a secure round unmasks at the driver's tick, and every round's outcome is
built on the driver's thread outside the lock (driver.finish). The hub never asks which kind of
round runs: it hands the round what arrived (`on_frame`, `on_upload`, `on_loss`) and carries
out the `Step` it answers (`apply`: frames to send, messages it ignored to log, events to
record). The work is in the modules beside it, each
given the hub: uploads.py (slots, buffers, reassembly), recorder.py (the round log, results,
blame exclusions), driver.py (the round-driver thread), final_evaluation.py, resume.py;
serve.py is the process around it.

Resuming: at start, rounds left running by a crash are marked interrupted and the global model
comes from the round log's latest checkpoint, so a restarted coordinator continues until the
log holds `[rounds] count` completed rounds. Blame exclusions (`excluded`): recorder.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from cryptography import x509

from coordinator.config import CoordinatorConfig
from coordinator.observability.ratelimit import PeerLog, exception_line
from coordinator.rounds.events import Step
from coordinator.rounds.kind import (
    Frame,
    Loss,
    ModelDelivered,
    RoundKind,
    SecAggPayload,
    Upload,
    stray,
)
from coordinator.rounds.phases import DropReason
from coordinator.rounds.server_optimizer import build_server_optimizer
from coordinator.rounds.stall import Proceed, StallWatch, Verdict
from coordinator.runtime import driver, final_evaluation, recorder, resume, status, uploads
from coordinator.runtime.clock import SYSTEM_CLOCK, Clock
from coordinator.runtime.debug_pause import DebugPause
from coordinator.runtime.downloads import DownloadSlots
from coordinator.runtime.final_evaluation import FinalEvaluationRun
from coordinator.runtime.peer_input import clean_abort, clean_report
from coordinator.runtime.recorder import Exclusion
from coordinator.runtime.serve import Outcome
from coordinator.runtime.stream import SiloStream
from coordinator.runtime.trust import TrustStore, peer_certificate
from coordinator.storage.checkpoints import CheckpointStore, ModelBytes
from coordinator.storage.roundlog import RoundLog
from coordinator.transport.servicer import RefusalCode, Refused
from protos import federation_pb2 as pb
from protos.names import abort_name
from secagg.identity import Roster
from silofed import wire

log = logging.getLogger("silofed.coordinator")
CHURN_LINES = 5  # connect/disconnect lines per silo and minute before they are only counted


class Hub:
    """Connected silos + the round in progress, behind one lock."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        model_factory: Callable[[], torch.nn.Module],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.sessions: dict[str, SiloStream] = {}
        self.trust = TrustStore(config)  # CA, roster, revocations; reread when they change
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.roundlog = RoundLog(config.state_dir / "rounds.sqlite")
        self.checkpoints = CheckpointStore(config.state_dir / "checkpoints")
        # How the next model is made from a round's FedAvg result ([server_optimizer]), and its
        # state (moments), saved beside each checkpoint.
        self.server_optimizer = build_server_optimizer(config)
        self.global_state, self.server_opt_state = resume.resume_global_state(
            self.roundlog,
            self.checkpoints,
            config.state_dir,
            model_factory,
            self.server_optimizer,
            now=clock.now(),
        )
        self.round: RoundKind | None = None  # the round in progress, of whichever kind
        self.slots = uploads.Slots(self._upload_slots())  # buffered uploads
        self.downloads = DownloadSlots(  # streams sending the model at once (downloads.py)
            config.server.max_concurrent_downloads,
            clock=clock,
            progress_s=config.deadlines.upload_progress_s,
        )
        self.next_offer: ModelBytes | None = None  # the last checkpoint's = the next offer
        self.stopping = threading.Event()
        self.ran_any = False
        rc = config.rounds
        self.stall = StallWatch(
            rc.max_consecutive_aborts, rc.abort_backoff_initial_s, rc.abort_backoff_max_s
        )
        self.verdict: Verdict = Proceed(0.0, 0)  # how the last round ended, for status
        self.pause = DebugPause.from_config(config, self.stopping)  # [debug]: tests only
        self.final: FinalEvaluationRun | None = None  # while the final evaluation runs
        # What silos do wrong is logged at most once per (cause, silo) per 10 s, with counts.
        self.peer_log = PeerLog(log, clock=clock.monotonic)
        # Connects and disconnects are normal, but a silo reconnecting in a loop must not grow
        # the log with it: a few lines per silo a minute, then a count.
        self.churn_log = PeerLog(log, clock=clock.monotonic, interval_s=60.0, burst=CHURN_LINES)
        # Silos proven to have sent an out-of-range weight element, and the proofs (encoded
        # secagg Blame messages) for the model `blame_model` that go with each offer of it.
        self.excluded: dict[str, Exclusion] = {}
        self.blame_model = b""
        self.blame_evidence: list[bytes] = []

    @property
    def roster(self) -> Roster:
        return self.trust.roster

    @property
    def revoked(self) -> frozenset[int]:
        return self.trust.revoked

    @revoked.setter
    def revoked(self, serials: frozenset[int]) -> None:
        self.trust.revoked = serials

    def refresh_trust(self) -> None:
        """Reload roster and revocations when their files change: no restart needed."""
        self.trust.refresh(self.sessions.values())

    def check_peer(self, cert_pem: bytes | None) -> str:
        """The silo id of the TLS peer `cert_pem` if it may open a stream: the servicer asks
        when the stream opens, before reading anything. Raises Refused saying why not."""
        return self._checked_peer(cert_pem)[1]

    def _checked_peer(self, cert_pem: bytes | None) -> tuple[x509.Certificate, str]:
        """The peer's certificate and silo id after the federation CA, key, validity,
        revocation and roster checks (trust files reread when they changed). Raises Refused."""
        cert = peer_certificate(cert_pem)
        with self.lock:
            self.refresh_trust()
            roster, revoked = self.roster, tuple(self.revoked)
        return cert, self.trust.check(cert, roster, revoked, now=self.clock.now())

    def admit(self, cert_pem: bytes | None, hello: pb.Hello) -> SiloStream:
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
                self.churn_log.info(
                    "reconnected", silo_id, "%s reconnected; closing its previous stream", silo_id
                )
                self._replace(old)
            session = SiloStream(
                silo_id=silo_id,
                connected_since=self.clock.now(),
                cert_not_after=cert.not_valid_after_utc.timestamp(),
                on_delivered=self._delivered,
                cert_serial=cert.serial_number,
                downloads=self.downloads,
                upload_grants=wire.speaks_upload_grants(hello.wire_version),
                upload_chunk_bytes=wire.upload_chunk_bytes(hello.wire_version),
            )
            self.sessions[silo_id] = session
            self.churn_log.info(
                "connected", silo_id, "silo connected: %s (%d connected)", silo_id,
                len(self.sessions),
            )  # fmt: skip
            if hello.roster_digest != self.roster.digest():
                # Not a refusal (a silo may lag a roster version behind): send it the signed one.
                self.trust.send_roster(session, hello.roster_digest)
            self.changed.notify_all()
            return session

    def _upload_slots(self) -> int:
        """P: `[secagg] max_concurrent_uploads`, or chosen from the masked vector's size."""
        secagg, configured = self.config.secagg, self.config.max_concurrent_uploads
        if secagg is None:  # the plaintext baseline buffers no vector
            return configured or 2
        elements = 1 + sum(t.numel() for t in self.global_state.values())  # weight + model
        vector_bytes = elements * secagg.ring_bits // 8
        slots = uploads.upload_slots(configured, vector_bytes)
        if configured is None:
            log.info(
                "upload buffers: %d (a masked vector has %.1f MiB; [secagg] "
                "max_concurrent_uploads sets another number)",
                slots,
                vector_bytes / (1 << 20),
            )
        return slots

    def welcome(self, session: SiloStream) -> pb.Welcome:
        return pb.Welcome(
            federation_id=self.config.federation_id,
            silo_id=session.silo_id,
            upload_grants=session.upload_grants,  # only to a silo that announced 1.1 or later
            # the size a silo of 1.2 or later cuts its uploads into (an older one ignores it)
            upload_chunk_bytes=session.upload_chunk_bytes or 0,
        )

    def on_disconnect(self, session: SiloStream, why: str) -> None:
        # Called up to three times per stream (reader, generator, RPC callback): idempotent.
        with self.lock:
            current = self.sessions.get(session.silo_id) is session
            if current:
                del self.sessions[session.silo_id]
                self.churn_log.info(
                    "disconnected", session.silo_id, "silo disconnected: %s (%s)",
                    session.silo_id, why,
                )  # fmt: skip
            if not session.closed:
                session.closed = True
                session.send(None)
            uploads.end_upload(self, session)
            self.downloads.release(session)
            # A replaced stream must not drop the silo's new stream from the round.
            if current:
                self.on_loss(session.silo_id, Loss(DropReason.DISCONNECTED, why))

    def _replace(self, session: SiloStream) -> None:
        """Close a silo's previous stream; its work in the current round is lost with it."""
        session.closed = True
        session.send(None)
        if session.cancel_stream is not None:  # it may be stuck sending to a silo gone silent
            session.cancel_stream()
        uploads.end_upload(self, session)
        self.downloads.release(session)
        self.on_loss(session.silo_id, Loss(DropReason.DISCONNECTED, "replaced by a new stream"))

    def _delivered(self, session: SiloStream, round_id: int) -> None:
        with self.lock:
            self.on_frame(session.silo_id, ModelDelivered(round_id))

    def on_message(self, session: SiloStream, message: pb.SiloMessage) -> None:
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

    def _handle(self, session: SiloStream, message: pb.SiloMessage) -> None:
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
            uploads.wait_for_upload_slot(self, session, message.blob_header)
        elif kind == "blob_chunk":
            # Copied and hashed without the lock (this stream's own lock only); the lock is
            # taken when the upload is complete or broken. No final-evaluation answer is a chunk.
            uploads.on_chunk(self, session, message.blob_chunk, size)
            return
        with self.lock:
            with session.upload_lock:  # the counters chunks update off the lock (on_chunk)
                session.bytes_in += size
                session.round_bytes_in += size
            if self.final is not None and self.final.take(session.silo_id, message):
                return  # an answer to the final evaluation (run_final_evaluation)
            if kind == "hello":
                self.reject(session, "hello sent twice on one stream")
            elif kind == "train_report":
                uploads.on_report(self, session, message.train_report)
            elif kind == "blob_header":
                uploads.on_blob_header(self, session, message.blob_header)
            elif kind == "secagg":
                frame = message.secagg
                self.on_frame(session.silo_id, SecAggPayload(frame.round_id, frame.payload))
            elif kind == "abort":
                self._aborted(session, message.abort)
            else:
                self.reject(session, f"unexpected message {kind!r}")

    def _aborted(self, session: SiloStream, abort: pb.AbortNotice) -> None:
        """The silo refused the round: it drops out, and its reason code, if it names the
        round in progress, is kept for the stall diagnosis."""
        reason = abort_name(abort.code)  # "UNKNOWN(n)" for a code this version does not know
        self.peer_log.warning(
            "silo aborted",
            session.silo_id,
            "%s aborted round %d: %s %s",
            session.silo_id,
            abort.round_id,
            reason,
            abort.detail,
        )
        current = self.round is not None and abort.round_id == self.round.round_id
        why = f"silo aborted: {reason}"
        self.on_loss(session.silo_id, Loss(DropReason.INVALID, why, reason if current else None))

    def reject(self, session: SiloStream, detail: str) -> None:
        # The cause is the detail up to its first colon ("bad update chunk: ...").
        self.peer_log.warning(
            detail.split(":", 1)[0][:64], session.silo_id, "%s: %s", session.silo_id, detail
        )
        self._failed(session, detail)

    def _failed(self, session: SiloStream, detail: str) -> None:
        self.on_loss(session.silo_id, Loss(DropReason.INVALID, detail))

    # ---- the round in progress: what arrived goes in, its Step comes out (under the lock) ----

    def on_frame(self, silo_id: str, frame: Frame) -> bool:
        """Whether the round took `frame` (a stray one is logged and ignored)."""
        rnd, now = self.round, self.clock.now()
        step = stray(silo_id, frame) if rnd is None else rnd.frame(silo_id, frame, now)
        self.apply(step)
        return not step.ignored

    def on_upload(self, silo_id: str, upload: Upload) -> None:
        """A complete upload (uploads.py reassembled and hashed it)."""
        rnd, now = self.round, self.clock.now()
        self.apply(stray(silo_id, upload) if rnd is None else rnd.upload(silo_id, upload, now))

    def on_loss(self, silo_id: str, loss: Loss) -> None:
        if self.round is not None:
            self.apply(self.round.lost(silo_id, loss, self.clock.now()))

    def apply(self, step: Step) -> None:
        """Carry out what the round answered: log what it ignored (rate-limited per cause and
        silo), send its protocol frames, record its events."""
        for ignored in step.ignored:
            level = logging.WARNING if ignored.warning else logging.INFO
            self.peer_log.log(
                level, ignored.cause, ignored.silo_id, ignored.template, *ignored.args
            )
        rnd = self.round
        if rnd is None:
            return
        for silo_id, payload in step.sends:
            s = self.sessions.get(silo_id)
            if s is not None and not s.closed:
                frame = pb.SecAggFrame(round_id=rnd.round_id, payload=payload)
                s.send(pb.CoordinatorMessage(secagg=frame))
        recorder.record_events(self, rnd.round_id, step.events)
        self.pause.after_phases(step.events)

    # ---- the round driver (driver.py) and the final evaluation (final_evaluation.py) ------

    def wait_for_silos(self, n: int, timeout_s: float) -> bool:
        """Wait until `n` silos that may be invited (connected, not excluded) are connected."""
        return driver.wait_for_silos(self, n, timeout_s)

    def run_rounds(self) -> Outcome:
        """Run rounds until the log holds `[rounds] count` completed ones (driver.py)."""
        return driver.run_rounds(self)

    def run_final_evaluation(self) -> None:
        """Have the connected silos evaluate the last completed round's model, once per model."""
        final_evaluation.run_final_evaluation(self)

    def completed_rounds(self) -> int:
        return self.roundlog.count_completed()  # O(1): status and each scrape ask for it

    def eligible(self) -> list[str]:
        """The connected silos a round may invite, sorted: all but the excluded ones."""
        return sorted(k for k in self.sessions if k not in self.excluded)

    def broadcast_result(self, result: pb.RoundResult, invited: Sequence[str]) -> None:
        for silo_id in invited:
            s = self.sessions.get(silo_id)
            if s is not None and not s.closed:
                s.send(pb.CoordinatorMessage(round_result=result))

    def close_all(self, *, finished: bool) -> None:
        """Close every silo stream. With `finished`, tell the silos the federation is over so
        they exit; otherwise (the coordinator is stopping) they reconnect with backoff."""
        code, detail = (
            (pb.ABORT_REASON_FEDERATION_FINISHED, "the federation finished all its rounds")
            if finished
            else (
                pb.ABORT_REASON_COORDINATOR_STOPPING,
                "the coordinator is stopping; reconnect later",
            )
        )
        with self.lock:
            for s in list(self.sessions.values()):
                self.send_abort(s, 0, code, detail)
                s.closed = True
                s.send(None)

    @property
    def federation_id(self) -> str:
        return self.config.federation_id

    def status(self) -> pb.StatusReply:
        return status.status_reply(self)

    def send_abort(
        self, stream: SiloStream, round_id: int, code: pb.AbortReason.ValueType, detail: str
    ) -> None:
        """Tell a silo that its round (`round_id`), or with 0 its stream, ends and why: the
        one place the coordinator builds an AbortNotice."""
        notice = pb.AbortNotice(round_id=round_id, code=code, detail=detail)
        stream.send(pb.CoordinatorMessage(abort=notice))

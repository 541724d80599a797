"""The silo agent's main loop: dial out, take rounds, train and evaluate locally, upload.

Rule: the runner knows rounds and tasks, never grpc (that is `connection.py`). Its own
certificate is checked against the pinned CA and roster before it dials
(`silo_agent.pki.preflight`). It dispatches each offer to the round that takes it
(`secure_round.py`, `plaintext_round.py`, `final_model.py`). It reconnects with exponential
backoff and full jitter; it stops on `stop`, after `max_rounds` completed rounds, or when the
coordinator says the federation finished.

Per round it reports `eval_*` = its evaluation, on its local held-out data, of the global model
it RECEIVED this round, and `train_*` from local training. The update is `trained - received`.
Each upload is appended to `<state_dir>/ledger.jsonl` so the silo operator can check what left
the site. While connected it renews its certificate when due (silo_agent.pki.renewal) and, once a
renewed one is installed, reconnects after the round in progress to present it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protos import federation_pb2 as pb
from protos.names import abort_name, aggregation_name
from secagg.chunking import BlobMeta, ChunkError, Reassembler
from secagg.identity import Roster
from secagg.silo import SiloPolicy, SiloSession
from secagg.trust import SiloIdentity, Trust
from silo_agent.config import SiloConfig
from silo_agent.pki.preflight import secagg_credentials
from silo_agent.pki.renewal import RenewalError, renew_if_due
from silo_agent.pki.roster_update import on_roster_update
from silo_agent.runtime.backoff import Backoff
from silo_agent.runtime.final_model import FinalModel
from silo_agent.runtime.local_model import LocalModel, LocalTraining
from silo_agent.runtime.plaintext_round import PlaintextRound
from silo_agent.runtime.secure_round import Pause, SiloSecureRound, TrainJob
from silo_agent.runtime.secure_session import SecureSession
from silo_agent.storage.ledger import LEDGER_FILENAME, SentLedger
from silo_agent.storage.silo_state import SiloStateStore
from silo_agent.transport.connection import Link, LinkError, TlsMaterial
from silofed.task import Task

log = logging.getLogger("silofed.silo")

AGENT_VERSION = "silofed-silo/0.1"

EXIT_OK = 0
EXIT_REFUSED = 3  # the coordinator or our own pre-flight check refused this identity
EXIT_STOPPED = 130
FLUSH_TIMEOUT_S = 30.0
RENEW_TIMEOUT_S = 30.0


@dataclass
class _RoundState:
    offer: pb.RoundOffer | None = None
    download: Reassembler | None = None
    secure: SiloSecureRound | None = None

    def end_secure(self, round_id: int | None = None) -> None:
        """The secure round (`round_id`'s, or whichever) is over: erase its secrets."""
        if self.secure is not None and round_id in (None, self.secure.round_id):
            self.secure.round_over()
            self.secure = None


@dataclass
class SiloRunner:
    config: SiloConfig
    task: Task
    data: Any
    silo_id: str
    max_rounds: int | None = None
    serve_forever: bool = False  # a finished federation run: wait for the next, do not exit
    stop: threading.Event = field(default_factory=threading.Event)
    rng: Callable[[], float] = random.random
    clock: Callable[[], float] = time.time
    rounds_done: int = 0
    _link: Link | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _credentials: tuple[SiloIdentity, Trust] | None = None  # read once, for secure rounds
    _model_profile: LocalModel | None = None  # built once, at the first offer
    _training: LocalTraining | None = None  # [train] workers: built once, at the start
    _sent_ledger: SentLedger | None = None  # what left the site; made by run()
    _final: FinalModel | None = (
        None  # the final evaluation's rules (silo_agent/runtime/final_model.py)
    )
    # Set when a renewed certificate was installed: reconnect after this round to present it.
    _renewed: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        """Stop from another thread (signal handler): closes the stream so reading returns."""
        self.stop.set()
        with self._lock:
            if self._link is not None:
                self._link.close()

    def run(self) -> int:
        self._local_training()  # a [train] the task cannot use is refused before dialling
        backoff = Backoff(self.config.reconnect.initial_s, self.config.reconnect.max_s, self.rng)
        ledger = SentLedger(self.config.state_dir / LEDGER_FILENAME, self.clock)
        self._sent_ledger = ledger
        while not self.stop.is_set():
            # Read at every connection: a renewed certificate replaces the file
            # (silo_agent.pki.renewal), and this connection presents it.
            self._renewed.clear()
            tls = TlsMaterial(
                ca_pem=self.config.tls.ca_cert.read_bytes(),
                cert_pem=self.config.tls.cert.read_bytes(),
                key_pem=self.config.tls.key.read_bytes(),
            )
            link = Link(
                self.config.address,
                tls,
                server_name=self.config.server_name,
                proxy=self.config.proxy,
                on_sent=ledger.on_sent,  # each message is recorded once gRPC has taken it
            )
            with self._lock:
                self._link = link
            try:
                finished = self._session(link.open(self._hello()), link, backoff)
                if not finished and self._renewed.is_set():
                    log.info("reconnecting to present the renewed certificate")
                elif not finished:
                    log.warning("coordinator closed the stream")
                elif not self._wait_for_next_run():
                    return EXIT_OK
            except LinkError as exc:
                if self.stop.is_set():
                    break
                if exc.fatal:
                    log.error("coordinator refused this silo (%s): %s", exc.code, exc.detail)
                    return EXIT_REFUSED
                log.warning("connection to %s failed: %s", self.config.address, exc)
            finally:
                with self._lock:
                    self._link = None
                link.close()
            if self.stop.is_set():
                break
            delay = backoff.next_delay()
            log.info("reconnecting in %.2f s (attempt %d)", delay, backoff.attempt)
            self.stop.wait(delay)
        log.info("stopped after %d completed rounds", self.rounds_done)
        return EXIT_STOPPED

    def _hello(self) -> pb.Hello:
        # Read at every connection: an adopted roster update replaces the pinned file.
        roster = Roster.from_json(self.config.tls.roster.read_text())
        return pb.Hello(
            silo_id=self.silo_id, agent_version=AGENT_VERSION, roster_digest=roster.digest()
        )

    def _wait_for_next_run(self) -> bool:
        """After a finished run (or --rounds reached): True when --serve-forever keeps the
        agent up to reconnect (with backoff) for the coordinator's next run."""
        limit_reached = self.max_rounds is not None and self.rounds_done >= self.max_rounds
        if not self.serve_forever or limit_reached:
            return False
        log.info("the federation run finished; --serve-forever: waiting for the next run")
        return True

    def _session(
        self, messages: Iterator[pb.CoordinatorMessage], link: Link, backoff: Backoff
    ) -> bool:
        """Handle one stream. True when done for good (finished or round limit reached)."""
        state = _RoundState()
        pause = Pause(
            self.config.pause_after_phase,
            self.config.pause_in_round,
            self.config.state_dir,
            self.stop,
            lambda: link.flush(FLUSH_TIMEOUT_S),
        )
        ended = threading.Event()  # ends this connection's renewal checks
        try:
            return self._pump(messages, link, backoff, state, pause, ended)
        finally:
            ended.set()
            state.end_secure()  # the stream is gone: erase the round's secrets

    def _renewals(self, link: Link, ended: threading.Event) -> None:
        """While connected: renew the certificate when it is due (silo_agent.pki.renewal),
        looking again every `[pki] renew_check_s` (a queued request is asked for again)."""

        def call(request: pb.RenewRequest) -> pb.RenewReply:
            # The unary Renew rides the stream's own channel: the same mutual TLS identity.
            return link.renew(request, RENEW_TIMEOUT_S)

        while not ended.is_set() and not self.stop.is_set():
            try:
                result = renew_if_due(self.config, call, now=self.clock())
            except RenewalError as exc:
                log.error("certificate renewal failed: %s", exc)
            except LinkError as exc:  # refused or unreachable: say it, try again later
                log.warning("certificate renewal was not granted: %s", exc)
            else:
                if result is not None and result.installed:
                    self._credentials = None  # secure rounds sign with the new certificate
                    self._renewed.set()
                    return
            ended.wait(self.config.pki.renew_check_s)

    def _pump(
        self,
        messages: Iterator[pb.CoordinatorMessage],
        link: Link,
        backoff: Backoff,
        state: _RoundState,
        pause: Pause,
        ended: threading.Event,
    ) -> bool:
        welcomed = False
        for message in messages:
            pause.wait_if_frozen()
            kind = message.WhichOneof("kind")
            if kind == "welcome" and welcomed:  # once per stream: each would start a thread
                log.warning("the coordinator sent Welcome again on this stream; ignored")
            elif kind == "welcome":
                welcomed = True
                backoff.reset()
                log.info(
                    "connected to federation %s as %s",
                    message.welcome.federation_id,
                    message.welcome.silo_id,
                )
                threading.Thread(
                    target=self._renewals, args=(link, ended), name="renewal", daemon=True
                ).start()
            elif kind == "round_offer":
                state.end_secure()
                state.offer, state.download = message.round_offer, None
                log.info(
                    "round %d offered (%s, model %d bytes)",
                    state.offer.round_id,
                    aggregation_name(state.offer.aggregation),
                    state.offer.model_bytes,
                )
                if not self._offer_size_ok(link, state.offer) or not self._final_model().screen(
                    state.offer, link.send
                ):  # too large, or a final evaluation of another model than the announced
                    state.offer = None
            elif kind == "blob_header":
                self._on_header(state, message.blob_header)
            elif kind == "blob_chunk":
                data = self._on_chunk(state, message.blob_chunk)
                if data is not None and state.offer is not None:
                    self._take_part(link, state, data, pause)
            elif kind == "secagg":
                frame = message.secagg
                if state.secure is not None and frame.round_id == state.secure.round_id:
                    state.secure.on_frame(frame.payload)
            elif kind == "round_result":
                state.end_secure(message.round_result.round_id)
                if self._on_result(message.round_result):
                    return True
                if self._renewed.is_set():  # between rounds: present the renewed certificate
                    return False
            elif kind == "roster_update":
                if on_roster_update(self.config, message.roster_update, clock=self.clock):
                    self._credentials = None  # the next secure round reads the adopted roster
            elif kind == "abort":
                notice = message.abort
                reason = _coordinator_abort_name(notice)
                if reason == abort_name(pb.ABORT_REASON_FEDERATION_FINISHED):
                    log.info("the coordinator says the federation finished")
                    return True
                log.warning(
                    "round %d aborted by the coordinator: %s (%s)",
                    notice.round_id,
                    reason,
                    notice.detail,
                )
                state.end_secure(notice.round_id)
        return False

    def _take_part(self, link: Link, state: _RoundState, model_bytes: bytes, pause: Pause) -> None:
        offer = state.offer
        assert offer is not None
        if self._sent_ledger is not None:
            # The ledger keeps the name the coordinator's round log and export use.
            name = aggregation_name(offer.aggregation)
            self._sent_ledger.note_round(offer.round_id, name, offer.model_sha256)
        if offer.aggregation == pb.AGGREGATION_EVALUATE:
            self._final_model().evaluate(offer, model_bytes, link.send)
        elif offer.aggregation == pb.AGGREGATION_SECAGG:
            state.secure = self._secure_round(link, offer, model_bytes, pause)
            state.secure.start()
        elif (
            offer.aggregation == pb.AGGREGATION_PLAINTEXT_INSECURE
            and self.config.secagg.allow_plaintext_insecure
        ):
            PlaintextRound(
                self.task,
                self.data,
                self.config.secagg.train_limits,
                link.send,
                self._local_training(),
            ).take_part(offer, model_bytes)
        else:
            # Never send the update in the clear unless this silo's operator said so.
            log.warning(
                "round %d: declining aggregation %r: this silo only sends masked updates "
                "(to take part in the insecure baseline set [secagg] allow_plaintext_insecure "
                "= true in %s)",
                offer.round_id,
                aggregation_name(offer.aggregation),
                self.config.source,
            )
            detail = (
                f"this silo does not take part in {aggregation_name(offer.aggregation)!r} rounds"
            )
            notice = pb.AbortNotice(
                round_id=offer.round_id, code=pb.ABORT_REASON_DECLINED, detail=detail
            )
            link.send(pb.SiloMessage(abort=notice))

    def _secure_round(
        self, link: Link, offer: pb.RoundOffer, model_bytes: bytes, pause: Pause
    ) -> SiloSecureRound:
        policy = self.config.secagg
        store = SiloStateStore(self.config.state_dir, policy.remembered_models)
        base = SiloPolicy(
            last_round_id=0,
            t_floor=policy.t_floor,
            n_colluders_max=policy.n_colluders_max,
            n_colluders_min=policy.n_colluders_min,
            max_masked_inputs_per_model=policy.max_masked_inputs_per_model,
            expected_layout_sha256=self._local_model().layout_sha256,
            train_limits=policy.train_limits,
            max_round_step=policy.max_round_step,
            min_noise_multiplier=policy.min_noise_multiplier,
            allow_sparse_graph=policy.allow_sparse_graph,
            allow_example_weighting=policy.allow_example_weighting,
        )
        identity, trust = self._secagg_credentials()
        session = SiloSession(
            identity,
            trust,
            store.state.policy(base),
            random_bytes=os.urandom,
            rng=np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "big"))),
            journal=store.journal,
        )
        job = TrainJob(
            self.task,
            self.data,
            self._sent_ledger,
            self.clock,
            self._local_model().layout,
            self._local_training(),
        )
        return SiloSecureRound(
            offer, model_bytes, SecureSession(session), job, link.send, pause, link.give_up
        )

    def _local_model(self) -> LocalModel:
        """This silo's own model, built once: the layout a round must have and the largest
        model download it accepts ([secagg] max_model_bytes, default 2 × its size + 1 MiB)."""
        if self._model_profile is None:
            self._model_profile = LocalModel.of(self.task, self.config.secagg.max_model_bytes)
        return self._model_profile

    def _local_training(self) -> LocalTraining:
        """How this silo runs `train` ([train] workers), built once (TaskLoadError if the task
        cannot train on the workers asked for)."""
        if self._training is None:
            self._training = LocalTraining.of(self.config, self.task, self.data)
        return self._training

    def _secagg_credentials(self) -> tuple[SiloIdentity, Trust]:
        """This silo's signing identity and its pinned CA + roster (the same files as its TLS)."""
        if self._credentials is None:
            self._credentials = secagg_credentials(self.config, self.silo_id)
        return self._credentials

    def _offer_size_ok(self, link: Link, offer: pb.RoundOffer) -> bool:
        """Refuse, before buffering a byte, a model larger than this silo accepts."""
        limit = self._local_model().max_model_bytes
        if offer.model_bytes <= limit:
            return True
        detail = (
            f"the offered model has {offer.model_bytes} bytes; this silo accepts at most {limit} "
            "([secagg] max_model_bytes)"
        )
        log.warning("round %d: declined: %s", offer.round_id, detail)
        notice = pb.AbortNotice(
            round_id=offer.round_id, code=pb.ABORT_REASON_MODEL_TOO_LARGE, detail=detail
        )
        link.send(pb.SiloMessage(abort=notice))
        return False

    def _on_header(self, state: _RoundState, header: pb.BlobHeader) -> None:
        offer = state.offer
        if offer is None or header.round_id != offer.round_id or header.kind != pb.GLOBAL_MODEL:
            log.warning("ignoring an unexpected blob for round %d", header.round_id)
            state.download = None
            return
        if header.total_bytes != offer.model_bytes:
            log.warning("model blob size differs from the round offer; ignoring the round")
            state.download = None
            return
        if header.sha256 != offer.model_sha256:
            log.warning("model blob hash differs from the round offer; ignoring the round")
            state.download = None
            return
        try:
            meta = BlobMeta(header.total_bytes, header.sha256, header.chunk_count)
            state.download = Reassembler(meta, max_total_bytes=offer.model_bytes)
        except ChunkError as exc:
            log.warning("bad model header: %s", exc)
            state.download = None

    def _on_chunk(self, state: _RoundState, chunk: pb.BlobChunk) -> bytes | None:
        download = state.download
        if download is None:
            return None
        try:
            download.add(chunk.index, chunk.data)
            if not download.complete:
                return None
            data = download.finish()
        except ChunkError as exc:
            log.warning("model download failed: %s", exc)
            state.download = None
            return None
        state.download = None
        return data

    def _final_model(self) -> FinalModel:
        if self._final is None:
            self._final = FinalModel(
                self.config.state_dir,
                keep=self.config.keep_final_model,
                task=self.task,
                data=self.data,
            )
        return self._final

    def _on_result(self, result: pb.RoundResult) -> bool:
        self._final_model().on_result(result)  # the one model a final evaluation may use
        if result.status == pb.ROUND_STATUS_COMPLETED:
            took_part = self.silo_id in result.survivors
            if took_part:
                self.rounds_done += 1
            log.info(
                "round %d completed with %d silos (%s); new model %s",
                result.round_id,
                len(result.survivors),
                "included us" if took_part else "without us",
                result.new_model_sha256.hex()[:12],
            )
        else:
            log.warning("round %d aborted: %s", result.round_id, result.abort_reason)
        if self.max_rounds is not None and self.rounds_done >= self.max_rounds:
            log.info("reached --rounds %d; stopping", self.max_rounds)
            return True
        return False


def _coordinator_abort_name(notice: pb.AbortNotice) -> str:
    """The name of the coordinator's abort code ("UNKNOWN(n)" for one this version does not
    know: never the finished code, so the silo does not exit on it)."""
    return abort_name(notice.code)

"""One secure-aggregation round on the silo: the protocol frames, local training, masked upload.

Rule: the runner hands this object the round's offer and model, then every SecAggFrame of the
round; it answers through `send` (the stream). Training runs on its own thread from the moment
the offer is checked, so the silo keeps answering the key exchange while it trains, and the
pairwise masks are computed (SecureSession) while training still runs. What leaves the site:
the signed key advertisement, the encrypted shares, the evaluation metrics of the RECEIVED
model, the masked vector (indistinguishable from random without the other silos' masks) and
the unmasking shares the protocol allows (docs/secagg-protocol.md §5 step 5.3) — never the
update itself. Every message is recorded in the ledger once gRPC has taken it.

`[debug] pause_after_phase` freezes the silo at one point (tests kill it there for real).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protos import federation_pb2 as pb
from protos.names import abort_name
from secagg.config import RoundConfig, TensorSpec
from secagg.errors import ProtocolAbort, SecAggError
from secagg.messages import masked_header_of
from secagg.silo import TERMINAL, SiloStage
from silo_agent.observability.progress import training_progress
from silo_agent.runtime.local_model import (
    LocalTraining,
    fresh_seed,
    layout_differences,
    model_digest,
    prefixed,
)
from silo_agent.runtime.secure_session import SecureSession, flatten_update
from silo_agent.storage.ledger import SentLedger
from silo_agent.transport.connection import OutBlob
from silofed.task import Task, TrainingCancelled
from silofed.tensors import state_views

log = logging.getLogger("silofed.silo")

KEYS_POLL_S = 0.05
WATCH_POLL_S = 0.5
# How long the silo waits in each stage (docs/secagg-protocol.md §5, "Deadlines and state"), as the
# round config's deadline indices (offer, share_keys, train, consistency, unmask): the phase whose
# message it waits for.
_WAITING_FOR = {
    SiloStage.ADVERTISED: (0, 1),  # M2 comes once every invited silo advertised
    SiloStage.SHARED: (1,),  # M4
    SiloStage.KEYS_RECEIVED: (2,),  # local training and our own upload
}

Send = Callable[[pb.SiloMessage | OutBlob], None]


@dataclass(frozen=True, slots=True)
class Pause:
    """`[debug] pause_after_phase` (in round `pause_in_round`, or any round when unset): freeze
    everything at one point until the process is killed.

    `freeze(point, round_id)` first (so no other thread moves the protocol on), then send the
    message of that point, then `hold(point)`: flush the stream, write
    `<state_dir>/paused-<point>` for the test to see, and block until the runner stops."""

    point: str | None
    round_id: int | None
    state_dir: Path
    stop: threading.Event
    flush: Callable[[], object]
    frozen: threading.Event = field(default_factory=threading.Event)

    def freeze(self, point: str, round_id: int) -> bool:
        if point != self.point or self.round_id not in (None, round_id):
            return False
        self.frozen.set()
        return True

    def hold(self, point: str) -> None:
        if point != self.point or not self.frozen.is_set():
            return
        self.flush()
        # The marker first: a test that sees the log line may look for the file at once.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / f"paused-{point}").write_text(f"{time.time()}\n")
        log.warning("[debug] pause_after_phase = %s: paused; this silo does nothing more", point)
        self.stop.wait()

    def at(self, point: str, round_id: int) -> None:
        if self.freeze(point, round_id):
            self.hold(point)

    def wait_if_frozen(self) -> None:
        if self.frozen.is_set():
            self.stop.wait()


@dataclass
class TrainJob:
    task: Task
    data: Any
    ledger: SentLedger | None  # records what leaves; told the round's index -> silo id map
    clock: Callable[[], float]
    layout: tuple[TensorSpec, ...]  # this silo's own model: the received one must match it
    training: LocalTraining | None = None  # None: `task.train` in this process


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def overdue(
    stage: SiloStage, in_stage_s: float, in_round_s: float, deadlines_s: tuple[int, ...]
) -> str | None:
    """The silo's own deadlines (docs/secagg-protocol.md §5, "Deadlines and state"), so a
    stalling coordinator cannot keep it holding its secrets: "abort" when it has waited in a
    stage before its upload for twice the phase deadlines it waits on (the coordinator should
    have closed them by then), "erase" when, its input committed, the whole round has lasted
    twice the sum of the deadlines; else None."""
    waits = _WAITING_FOR.get(stage)
    if waits is not None:
        return "abort" if in_stage_s > 2 * sum(deadlines_s[i] for i in waits) else None
    if stage in (SiloStage.MASKED_SENT, SiloStage.SIGNED, SiloStage.UNMASKED):
        return "erase" if in_round_s > 2 * sum(deadlines_s) else None
    return None


class SiloSecureRound:
    """The silo's part in one secure round; `start` once, then `on_frame` per SecAggFrame."""

    def __init__(
        self,
        offer: pb.RoundOffer,
        model_bytes: bytes,
        session: SecureSession,
        job: TrainJob,
        send: Send,
        pause: Pause,
        give_up: Callable[[int], None] | None = None,
    ) -> None:
        """`give_up(round_id)`: the round is over for this silo; the link drops an upload of it
        still waiting for its grant (connection.Link.give_up)."""
        self._give_up = give_up
        self.offer = offer
        self.round_id = offer.round_id
        self.session = session
        self.job = job
        self._send = send
        self.pause = pause
        self._model_bytes: bytes | None = model_bytes
        self._received: dict[str, torch.Tensor] | None = None
        self._over = threading.Event()
        self._trainer: threading.Thread | None = None
        self.config: RoundConfig | None = None

    # ---- driven by the runner --------------------------------------------------------------

    def start(self) -> None:
        """Check the offer (phase 0) and advertise keys; training starts alongside."""
        assert self._model_bytes is not None
        self.pause.at("offer", self.round_id)
        if not self._offer_ids_agree():
            return
        # The download checked these bytes against the offer's SHA-256 (the runner takes a model
        # blob only under the offer's digest, and the reassembly hashes every byte it got): the
        # digest the signed configuration is checked against is theirs, not hashed again.
        model_sha = self.offer.model_sha256
        try:
            # Keyed on the tensors, not the file: a re-serialised model is the same model.
            # Views into the received bytes, not a copy: the round only reads them.
            self._received = state_views(self._model_bytes)
        except Exception as exc:  # undecodable model bytes from the coordinator
            self._refuse(pb.ABORT_REASON_MODEL_HASH_MISMATCH, f"the model does not decode: {exc}")
            return
        # The same names, shapes and dtypes as this silo's own model (a float64 copy of the
        # same values would otherwise be a "new" model to the differencing guard).
        differs = layout_differences(self._received, self.job.layout)
        if differs:
            self._refuse(
                pb.ABORT_REASON_LAYOUT_MISMATCH, f"the model is not this silo's model: {differs}"
            )
            return
        digest = model_digest(self._received)
        # Proofs that silos of an earlier attempt on this model sent out-of-range weights: the
        # session verifies each (unverifiable ones are ignored) before its retry rule runs.
        # Duplicates are dropped; the offer's size bounds the rest.
        blame = tuple(dict.fromkeys(self.offer.blame_evidence))
        try:
            m1 = self.session.handle_offer(
                self.offer.config, model_sha, now=_now(), model_digest=digest, blame=blame
            )
        except ProtocolAbort as exc:
            self._aborted(exc)
            return
        self.config = self.session.session.config
        self._frame(m1)
        self._trainer = threading.Thread(
            target=self._train_and_upload, name=f"train round {self.round_id}", daemon=True
        )
        self._trainer.start()
        threading.Thread(
            target=self._watch, name=f"deadlines round {self.round_id}", daemon=True
        ).start()
        self.pause.at("advertise", self.round_id)

    def on_frame(self, payload: bytes) -> None:
        before = self.session.stage
        try:
            replies = self.session.handle(payload, now=_now())
        except ProtocolAbort as exc:
            self._aborted(exc)
            return
        stage = self.session.stage
        if stage is SiloStage.SHARED and stage is not before and self.job.ledger is not None:
            # U1 is known now: the ledger names share recipients by silo id, not index.
            peers = self.session.session.u1
            self.job.ledger.note_indices(self.round_id, {i: p.silo_id for i, p in peers.items()})
        point = {SiloStage.SHARED: "share_keys", SiloStage.SIGNED: "consistency"}.get(stage)
        frozen = (
            point is not None and stage is not before and self.pause.freeze(point, self.round_id)
        )
        for reply in replies:
            self._frame(reply)
        if frozen and point is not None:
            self.pause.hold(point)
        if stage is SiloStage.COMPLETED and before is not SiloStage.COMPLETED:
            result = self.session.session.result
            if result is not None:
                log.info(
                    "round %d: secure aggregation completed over %d silos (we are in U3)",
                    self.round_id,
                    len(result.u3),
                )

    def round_over(self) -> None:
        """The coordinator ended the round (result or abort): stop waiting, erase secrets."""
        self._over.set()
        if self._give_up is not None:
            self._give_up(self.round_id)
        # The session erases its secrets; there is nothing to tell a round that is over.
        with contextlib.suppress(ProtocolAbort):
            self.session.deadline_passed(round_over=True)

    # ---- internals -------------------------------------------------------------------------

    def _watch(self) -> None:
        """Apply `overdue` until the round is over (bounded: it ends by "erase" at the latest)."""
        cfg = self.config
        assert cfg is not None
        started = stage_since = time.monotonic()
        stage = self.session.stage
        while not self._over.wait(WATCH_POLL_S) and stage not in TERMINAL:
            now = time.monotonic()
            if self.session.stage is not stage:
                stage, stage_since = self.session.stage, now
                continue
            verdict = overdue(stage, now - stage_since, now - started, cfg.deadlines_s)
            if verdict == "abort":
                try:
                    self.session.deadline_passed()
                except ProtocolAbort as exc:
                    self._aborted(exc)
                return
            if verdict == "erase":
                log.warning("round %d: the coordinator never finished; erasing", self.round_id)
                self.round_over()
                return

    def _offer_ids_agree(self) -> bool:
        """The offer's round id is the one the silo uses on the wire and in its ledger: it must
        be the signed configuration's, or the silo's records would disagree with what it signed."""
        try:
            signed_round = RoundConfig.decode(self.offer.config).round_id
        except SecAggError:
            return True  # the session refuses undecodable configurations with its reason code
        if signed_round == self.round_id:
            return True
        self._refuse(
            pb.ABORT_REASON_CONFIG_REJECTED,
            f"the offer says round {self.round_id}, its signed configuration round {signed_round}",
        )
        return False

    def _refuse(self, code: pb.AbortReason.ValueType, detail: str) -> None:
        """Refuse the offer before any session exists (nothing secret to erase)."""
        log.warning("round %d: refused the offer: %s (%s)", self.round_id, abort_name(code), detail)
        notice = pb.AbortNotice(round_id=self.round_id, code=code, detail=detail)
        self._send(pb.SiloMessage(abort=notice))
        self._over.set()

    def _frame(self, payload: bytes) -> None:
        frame = pb.SecAggFrame(round_id=self.round_id, payload=payload)
        self._send(pb.SiloMessage(secagg=frame))

    def _aborted(self, exc: ProtocolAbort) -> None:
        log.warning(
            "round %d: secure aggregation aborted on this silo: %s (%s)",
            self.round_id,
            exc.reason.name,
            exc,
        )
        if self._give_up is not None:  # else the notice would wait behind an ungranted upload
            self._give_up(self.round_id)
        notice = self.session.session.abort_notice
        if notice is not None:
            self._frame(notice)
        self._over.set()

    def _train_and_upload(self) -> None:
        try:
            self._train_and_upload_inner()
        except TrainingCancelled:
            log.info("round %d: the round ended; local training stopped", self.round_id)
        except Exception as exc:  # a task bug must not kill the agent; the round drops this silo
            log.exception("round %d: local training failed", self.round_id)
            detail = f"local training failed: {type(exc).__name__}: {exc}"
            notice = pb.AbortNotice(
                round_id=self.round_id, code=pb.ABORT_REASON_TRAINING_FAILED, detail=detail
            )
            self._send(pb.SiloMessage(abort=notice))

    def _train_and_upload_inner(self) -> None:
        job, cfg, received = self.job, self.config, self._received
        assert cfg is not None and received is not None
        self._model_bytes = self._received = None
        model = job.task.build_model()
        model.load_state_dict(received)
        started = time.monotonic()
        evaluated = prefixed(job.task.evaluate(model, job.data), "eval_")
        with training_progress(self.round_id) as tick:  # a bar on a terminal; else a no-op
            # The signed parameters (every silo checked they are the same for all), plus what
            # is the silo's own: the round, fresh randomness, and a progress hook that stops
            # training once the round is over.
            own = {"round": cfg.round_id, "seed": fresh_seed(), "progress": self._progress(tick)}
            training = job.training or LocalTraining(job.task, job.data)
            # Workers (if any) stop when the round is over, and by the time the coordinator
            # closes the training phase (offer, share_keys and train deadlines from now).
            result = training.train(
                model,
                {**self.session.train_params, **own},
                cancelled=self._over.is_set,
                deadline_s=float(sum(cfg.deadlines_s[:3])),
            )
        with torch.no_grad():
            delta = flatten_update(model.state_dict(), received, cfg.layout)
        metrics = {**evaluated, **prefixed(result.metrics, "train_")}
        report = pb.TrainReport(round_id=self.round_id, num_examples=0, metrics=metrics)
        self._send(pb.SiloMessage(train_report=report))
        trained_s = time.monotonic() - started
        if not self._wait_for_keys():
            return
        frozen = self.pause.freeze("masked", self.round_id)
        try:
            upload = self.session.submit_update(delta, result.num_examples)
        except ProtocolAbort as exc:
            self._aborted(exc)
            return
        del delta
        data = upload.vector.data.cast("B")
        header = masked_header_of(upload.header)  # inside the signed envelope secagg made
        assert header is not None, "secagg made an upload header that is no MaskedHeader"
        digest = header.vector_sha256  # hashed once, by secagg
        # One message announces the vector: its blob header carries secagg's signed header.
        self._send(OutBlob(self.round_id, pb.MASKED_VECTOR, data, digest, upload.header))
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        log.info(
            "round %d: trained on %d examples in %.2f s; %s; uploading a %d-byte masked vector",
            self.round_id,
            result.num_examples,
            trained_s,
            shown,
            data.nbytes,
        )
        if frozen:
            self.pause.hold("masked")

    def _progress(self, tick: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """The task's progress hook: draws the bar, and raises TrainingCancelled once the round
        is over (aborted, finished without us, stream lost), so training stops promptly."""

        def progress(done: int, total: int) -> None:
            if self._over.is_set():
                raise TrainingCancelled(f"round {self.round_id} is over")
            tick(done, total)

        return progress

    def _wait_for_keys(self) -> bool:
        """Training may finish before the shares (M4) arrive: wait for them, bounded by the
        round's deadlines for the phases before the upload."""
        cfg = self.config
        assert cfg is not None
        limit = time.monotonic() + sum(cfg.deadlines_s[:3])
        while time.monotonic() < limit and not self._over.is_set():
            stage = self.session.stage
            if stage is SiloStage.KEYS_RECEIVED:
                return True
            if stage in TERMINAL:
                return False
            self._over.wait(KEYS_POLL_S)
        if not self._over.is_set():
            log.warning("round %d: the shares never arrived; not uploading", self.round_id)
        return False

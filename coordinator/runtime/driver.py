"""The round driver: waits for silos, starts each round, ticks it until it is over, finishes it.

Rule: one thread (`run_rounds`) drives the rounds; it takes the hub's lock to start, tick and
record, and finishes a round (aggregate, checkpoint) outside it. After an aborted round the next
waits (backoff, or until a silo that was away connects); the stall watch decides when to stop.
The round is one `RoundKind` (coordinator.rounds.kind), built by `rounds.factory.build_round`;
the driver never asks which kind: it starts, ticks and cancels it and acts on its `outcome()`
(Completed: checkpoint, record, announce; Aborted: record, exclude the blamed). One round can
also be stepped (tests): `begin_round`, then `poll` until it returns True (each call is one tick
at the hub clock's time), then `finish`; `run_one_round` is exactly that loop with
`clock.wait(TICK_S)` between the polls.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.rounds.factory import build_round
from coordinator.rounds.kind import Aborted, CannotStart, Completed
from coordinator.rounds.phases import RoundId
from coordinator.rounds.server_optimizer import ServerOptimizerError
from coordinator.rounds.stall import Diagnosis, Verdict
from coordinator.runtime import malloc, recorder, uploads
from coordinator.runtime.serve import Outcome
from coordinator.runtime.stream import Blob, Delivered
from coordinator.storage.rollback import take_pending
from protos import federation_pb2 as pb
from protos.names import aggregation_value
from secagg.trust import Trust

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub

log = logging.getLogger("silofed.coordinator")

TICK_S = 0.05


def wait_for_silos(hub: Hub, n: int, timeout_s: float) -> bool:
    """Wait until `n` silos that may be invited (connected, not excluded) are connected."""
    deadline = hub.clock.monotonic() + timeout_s
    with hub.lock:
        while len(hub.eligible()) < n and not hub.stopping.is_set():
            left = deadline - hub.clock.monotonic()
            if left <= 0:
                return False
            hub.clock.wait(hub.changed, min(left, 0.5))
        return len(hub.eligible()) >= n


def run_rounds(hub: Hub) -> Outcome:
    """Run rounds until the log holds `[rounds] count` completed ones.

    After an aborted round the next waits (exponential backoff, or until a silo that was
    away connects); the same cause `[rounds] max_consecutive_aborts` times in a row ends
    the run as STALLED with a diagnosis (logged, and kept in that round's log entry)."""
    cfg = hub.config.rounds
    while not hub.stopping.is_set():
        done = hub.completed_rounds()
        if done >= cfg.count:
            log.info("federation finished: %d completed rounds in the log", done)
            hub.run_final_evaluation()
            # A signal during the final evaluation: the silos reconnect to the next start.
            return Outcome.STOPPED if hub.stopping.is_set() else Outcome.FINISHED
        first = not hub.ran_any  # the first round of this process, also after a restart
        need = (cfg.start_silos or cfg.min_silos) if first else cfg.min_silos
        if not hub.wait_for_silos(need, cfg.start_timeout_s):
            if hub.stopping.is_set():
                break
            if not hub.roundlog.last_round_id():  # the federation never started
                log.error(
                    "gave up: fewer than %d silos connected within %.0f s "
                    "([rounds] start_timeout_s)",
                    need,
                    cfg.start_timeout_s,
                )
                return Outcome.NO_SILOS
            # Silos that took part are gone: an attempt that counts towards the stall
            # diagnosis (which names them), after waiting start_timeout_s for them.
            recorder.record_missing_silos(hub, need)
        else:
            run_one_round(hub, done)
        hub.ran_any = True
        malloc.trim()
        verdict = hub.verdict
        if isinstance(verdict, Diagnosis):
            log.error("stopping: %s", verdict)
            return Outcome.STALLED
        if verdict.wait_s > 0:
            log.warning(
                "%d aborted rounds in a row; next attempt in %.1f s (sooner if a silo reconnects)",
                verdict.aborted_in_a_row,
                verdict.wait_s,
            )
            back_off(hub, verdict.wait_s)
    return Outcome.STOPPED


def back_off(hub: Hub, wait_s: float) -> None:
    """Wait `wait_s` before the next attempt, or less: until a silo that was not connected
    connects (a restarted silo is what most aborted rounds wait for)."""
    deadline = hub.clock.monotonic() + wait_s
    with hub.lock:
        before = set(hub.eligible())
        while not hub.stopping.is_set():
            left = deadline - hub.clock.monotonic()
            if left <= 0 or set(hub.eligible()) - before:
                return
            hub.clock.wait(hub.changed, min(left, 0.5))


@dataclass(frozen=True, slots=True)
class StartedRound:
    """A round `begin_round` offered: what `finish` needs to record its end."""

    round_id: RoundId
    invited: tuple[str, ...]
    model_sha256: bytes  # the model offered: blame proofs go with its later offers


def run_one_round(hub: Hub, completed_before: int) -> None:
    """One round, start to end; `hub.verdict` says what should happen next."""
    started = begin_round(hub, completed_before)
    if started is None:
        return
    with hub.lock:
        while not _over(hub):
            hub.clock.wait(hub.changed, TICK_S)
            poll(hub)
    finish(hub, started)


def _over(hub: Hub) -> bool:
    return hub.round is None or hub.round.status().over or hub.stopping.is_set()


def poll(hub: Hub) -> bool:
    """One tick at the clock's time (deadlines, stalled uploads, silos that do not read).
    True once the round is over or the coordinator is stopping: then call `finish`."""
    with hub.lock:
        if not _over(hub):
            now = hub.clock.now()
            uploads.watch_streams(hub, now)
            if hub.round is not None:
                hub.apply(hub.round.tick(now))
        return _over(hub)


def begin_round(hub: Hub, completed_before: int) -> StartedRound | None:
    """Invite the eligible silos, build the round, record its start and queue the offers.
    None when it cannot start (too few silos for the secure threshold and the like): it is
    then recorded as started and aborted, and `hub.verdict` says what next."""
    cfg = hub.config.rounds
    round_id = RoundId(hub.roundlog.last_round_id() + 1)
    offered = hub.next_offer or hub.checkpoints.offer_of(hub.global_state)
    hub.next_offer = None
    model_bytes, model_sha = offered.data, offered.sha256  # hashed once, when it was saved
    del offered
    with hub.lock:
        hub.refresh_trust()
        invited = hub.eligible()[: cfg.silos_per_round or None]
        now = hub.clock.now()
        for s in hub.sessions.values():  # a stalled upload of an earlier round holds no slot
            uploads.cancel_upload(hub, s)
        trust = Trust(hub.trust.ca_cert, hub.roster, tuple(hub.revoked))
        rnd = build_round(
            hub.config,
            trust,
            hub.global_state,
            round_id,
            invited,
            model_sha256=model_sha,
            model_bytes=len(model_bytes),
            now=now,
            dp_rounds_before=hub.roundlog.private_rounds_completed(),
        )
        offer_config = b"" if isinstance(rnd, CannotStart) else rnd.offer_config
        hub.roundlog.start_round(
            round_id,
            started_at=now,
            aggregation=cfg.aggregation,
            config_digest=hashlib.sha256(offer_config).hexdigest(),
            model_in_sha256=model_sha.hex(),
            invited=invited,
            rollback_of=take_pending(hub.config.state_dir),  # `rollback --to N`, once
        )
        hub.roundlog.record_participants(round_id, "invited", invited)
        log.info(
            "round %d (%d/%d, %s): offering the model to %d silos: %s",
            round_id,
            completed_before + 1,
            cfg.count,
            cfg.aggregation,
            len(invited),
            ", ".join(invited),
        )
        if isinstance(rnd, CannotStart):
            recorder.finish_aborted(hub, round_id, invited, rnd.reason)
            return None
        offer = pb.RoundOffer(
            round_id=round_id,
            aggregation=aggregation_value(cfg.aggregation),
            config=offer_config,
            model_sha256=model_sha,
            model_bytes=len(model_bytes),
            train_params_json=rnd.train_params_json,  # "": inside a signed config
            # Why the honest silos may retry this model without the silos excluded in an
            # earlier attempt on it (each silo verifies the proofs itself).
            blame_evidence=hub.blame_evidence if model_sha == hub.blame_model else (),
        )
        hub.round = rnd
        for silo_id in invited:
            s = hub.sessions[silo_id]
            with s.upload_lock:  # chunks count their bytes without the hub lock
                s.round_bytes_in = s.round_bytes_out = 0
            s.send(pb.CoordinatorMessage(round_offer=offer))
            s.send(Blob(round_id, pb.GLOBAL_MODEL, model_bytes, model_sha))
            s.send(Delivered(round_id))
        hub.pause.at("offer")
        # The streams hold the bytes until sent; dropping ours frees them during the round.
        del model_bytes
        hub.apply(rnd.start(invited, now))
        return StartedRound(round_id, tuple(invited), model_sha)


def finish(hub: Hub, started: StartedRound) -> Verdict:
    """End the round `begin_round` started (cancelled if the coordinator is stopping): its
    outcome outside the lock (aggregating is heavy), then checkpoint, record, tell the
    silos. Returns what should happen next (also `hub.verdict`)."""
    round_id, invited = started.round_id, list(started.invited)
    with hub.lock:
        rnd = hub.round
        if rnd is not None:
            hub.apply(rnd.cancel("the coordinator is stopping", hub.clock.now()))
    with hub.lock:  # the upload buffers wait for the next masked phase outside the peak
        uploads.release_buffers(hub)
    outcome = None if rnd is None else rnd.outcome()
    if not isinstance(outcome, Completed):
        aborted = outcome if isinstance(outcome, Aborted) else Aborted("aborted", {})
        with hub.lock:
            hub.round = None
            recorder.exclude(hub, round_id, started.model_sha256, aborted.blamed)
        recorder.finish_aborted(
            hub,
            round_id,
            invited,
            aborted.reason,
            metrics=aborted.metrics,
            refusals=aborted.refusals,
            blamed=sorted(aborted.blamed),
        )
        return hub.verdict
    hub.pause.at("unmask")
    try:
        # The server optimizer makes the next model from the round's FedAvg result (FedAvg
        # itself passes it through); it sees only the aggregate, never a silo's update.
        new_state, opt_state = hub.server_optimizer.step(
            hub.global_state, outcome.new_state, hub.server_opt_state
        )
    except ServerOptimizerError as exc:  # NON_FINITE_MODEL: the model and its state are kept
        with hub.lock:
            hub.round = None
        recorder.finish_aborted(hub, round_id, invited, str(exc), metrics=outcome.metrics)
        return hub.verdict
    # Streamed from the tensors to the file, and hashed once (the file read back): the model
    # is never serialised into memory. The next offer and the next global state are mappings
    # of that file: the round's memory holding the new model (the accumulator) goes with it.
    ckpt = hub.checkpoints.save(round_id, new_state)
    hub.checkpoints.save_server_state(round_id, opt_state.to_saved(), model_sha256=ckpt.sha256)
    hub.pause.at("checkpoint")
    hub.next_offer = hub.checkpoints.offer(ckpt)
    new_state = hub.checkpoints.mapped(ckpt).in_order(new_state)
    with hub.lock:
        if outcome.privacy is not None:
            p = outcome.privacy
            hub.roundlog.record_privacy(
                round_id,
                mechanism=p.mechanism,
                noise_multiplier=p.noise_multiplier,
                clip_norm=p.clip_norm,
                epsilon=p.epsilon,
                delta=p.delta,
                details=p.details,
            )
        hub.apply(outcome.announce(bytes.fromhex(ckpt.sha256)))
        hub.round = None
        survivors, weight = list(outcome.survivors), outcome.weight_sum
        hub.server_opt_state = opt_state
        recorder.complete(
            hub, round_id, invited, survivors, new_state, ckpt, weight, outcome.metrics
        )
    return hub.verdict

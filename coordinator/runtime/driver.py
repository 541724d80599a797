"""The round driver: waits for silos, starts each round, ticks it until it is over, finishes it.

Rule: one thread (`run_rounds`) drives the rounds; it takes the hub's lock to start, tick and
record, and finishes a round (aggregate, checkpoint) outside it. After an aborted round the next
waits (backoff, or until a silo that was away connects); the stall watch decides when to stop.
One round can also be stepped (tests): `begin_round`, then `poll` until it returns True (each
call is one tick at the hub clock's time), then `finish`; `run_one_round` is exactly that loop
with `clock.wait(TICK_S)` between the polls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.rounds.fedavg import AggregationError, AggregationProtocol, make_aggregation
from coordinator.rounds.phases import OFFER_PHASE, Phase, RoundId, RoundMachine, Stage
from coordinator.rounds.secure import PHASE_DEADLINE_KEYS, SecureRound, Step
from coordinator.rounds.secure_config import (
    SECAGG,
    SecureRoundError,
    apply_aggregate,
    build_round_config,
    check_aggregate,
    check_finite,
    layout_of,
)
from coordinator.rounds.stall import Diagnosis, Verdict
from coordinator.runtime import malloc, recorder, uploads
from coordinator.runtime.recorder import CANNOT_CONFIGURE
from coordinator.runtime.serve import Outcome
from coordinator.runtime.stream import Blob, Delivered
from coordinator.storage.rollback import take_pending
from protos import federation_pb2 as pb
from protos.names import aggregation_value
from secagg.errors import ConfigError
from secagg.train_params import canonical_train_params
from secagg.trust import Trust
from silofed.tensors import state_to_bytes

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
            hub.run_one_round(done)
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
    return round_over(hub) or hub.stopping.is_set()


def poll(hub: Hub) -> bool:
    """One tick at the clock's time (deadlines, stalled uploads, silos that do not read).
    True once the round is over or the coordinator is stopping: then call `finish`."""
    with hub.lock:
        if not _over(hub):
            tick(hub, hub.clock.now())
        return _over(hub)


def finish(hub: Hub, started: StartedRound) -> Verdict:
    """End the round `begin_round` started (cancelled if the coordinator is stopping):
    aggregate outside the lock, checkpoint, record, tell the silos. Returns what should
    happen next (also `hub.verdict`)."""
    round_id, invited = started.round_id, list(started.invited)
    with hub.lock:
        cancel(hub, "the coordinator is stopping")
    if hub.secure is not None:
        finish_secure(hub, round_id, hub.secure, invited)
    elif hub.machine is not None and hub.aggregation is not None:
        finish_plaintext(hub, round_id, hub.machine, hub.aggregation, invited)
    return hub.verdict


def begin_round(hub: Hub, completed_before: int) -> StartedRound | None:
    """Invite the eligible silos, build the round, record its start and queue the offers.
    None when it cannot start (too few silos for the secure threshold and the like): it is
    then recorded as started and aborted, and `hub.verdict` says what next."""
    cfg = hub.config.rounds
    round_id = RoundId(hub.roundlog.last_round_id() + 1)
    model_bytes = hub.next_offer or state_to_bytes(hub.global_state)
    hub.next_offer = None
    hub.model_len = len(model_bytes)
    model_sha = hashlib.sha256(model_bytes).digest()
    with hub.lock:
        hub.refresh_trust()
        invited = hub.eligible()[: cfg.silos_per_round or None]
        now = hub.clock.now()
        for s in hub.sessions.values():  # a stalled upload of an earlier round holds no slot
            s.upload = None
            uploads.end_upload(hub, s)
        cannot_start = ""
        hub.refusals = {}
        if cfg.aggregation == SECAGG:
            try:
                round_config = begin_secure(hub, round_id, invited, model_sha, now)
            except SecureRoundError as exc:  # too few silos for the threshold, and the like
                round_config, cannot_start = b"", f"{CANNOT_CONFIGURE}: {exc}"
        else:
            round_config = begin_plaintext(hub, round_id)
        hub.roundlog.start_round(
            round_id,
            started_at=now,
            aggregation=cfg.aggregation,
            config_digest=hashlib.sha256(round_config).hexdigest(),
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
        if cannot_start:
            recorder.finish_aborted(hub, round_id, invited, cannot_start)
            return None
        offer = pb.RoundOffer(
            round_id=round_id,
            aggregation=aggregation_value(cfg.aggregation),
            config=round_config,
            model_sha256=model_sha,
            model_bytes=len(model_bytes),
            # Plaintext rounds only: a secure round's parameters are in its signed config.
            train_params_json=""
            if cfg.aggregation == SECAGG
            else canonical_train_params(hub.config.train).decode(),
            # Why the honest silos may retry this model without the silos excluded in an
            # earlier attempt on it (each silo verifies the proofs itself).
            blame_evidence=hub.blame_evidence if model_sha == hub.blame_model else (),
        )
        for silo_id in invited:
            s = hub.sessions[silo_id]
            s.round_bytes_in = s.round_bytes_out = 0
            s.report, s.metrics, s.masked_header = None, {}, None
            s.send(pb.CoordinatorMessage(round_offer=offer))
            s.send(Blob(round_id, pb.GLOBAL_MODEL, model_bytes, model_sha))
            s.send(Delivered(round_id))
        hub.pause.at("offer")
        # The streams hold the bytes until sent; dropping ours frees them during the round.
        del model_bytes
        if hub.machine is not None:
            hub.apply(hub.machine.start(invited, now))
        return StartedRound(round_id, tuple(invited))


def begin_plaintext(hub: Hub, round_id: RoundId) -> bytes:
    cfg, deadlines = hub.config.rounds, hub.config.deadlines
    aggregation = make_aggregation(cfg.aggregation, hub.config.plaintext)
    phases = [Phase(OFFER_PHASE, deadlines.offer_s)] + [
        Phase(p.name, float(getattr(deadlines, p.deadline_key))) for p in aggregation.phases
    ]
    hub.machine = RoundMachine(round_id, phases, cfg.min_silos)
    hub.aggregation = aggregation
    aggregation.begin(hub.global_state)
    return json.dumps({"aggregation": cfg.aggregation}).encode()


def begin_secure(
    hub: Hub, round_id: RoundId, invited: Sequence[str], model_sha: bytes, now: float
) -> bytes:
    """The round's secagg configuration (the offer's `config`). Raises SecureRoundError when
    the round cannot be configured (the caller records it as started and aborted)."""
    settings = hub.config.secagg
    assert settings is not None  # the config loader requires [secagg] for secagg
    d = hub.config.deadlines
    try:
        config = build_round_config(
            settings,
            federation_id=hub.config.federation_id,
            roster_version=hub.roster.version,
            roster_digest=hub.roster.digest(),
            round_id=round_id,
            invited=invited,
            model_version=round_id - 1,
            model_sha256=model_sha,
            layout=layout_of(hub.global_state),
            deadlines_s=(
                _whole_s(d.offer_s),
                _whole_s(d.share_keys_s),
                _whole_s(d.train_s),
                _whole_s(d.consistency_s),
                _whole_s(d.unmask_s),
            ),
            # Inside the signed configuration: every silo checks that all others trained
            # with the same parameters (the consistency digest covers the config).
            train_params=canonical_train_params(hub.config.train),
            roster_size=len(hub.roster.entries),
        )
    except ConfigError as exc:  # RoundConfig's own checks
        raise SecureRoundError(str(exc)) from exc
    trust = Trust(hub.ca_cert, hub.roster, tuple(hub.revoked))
    hub.secure = SecureRound(
        config,
        trust,
        {k: float(getattr(d, k)) for k in PHASE_DEADLINE_KEYS.values()},
        now=now,
        dp_rounds_before=hub.roundlog.private_rounds_completed(),
    )
    return config.encode()


def round_over(hub: Hub) -> bool:
    if hub.secure is not None:
        return hub.secure.over
    return hub.machine is None or hub.machine.over


def tick(hub: Hub, now: float) -> None:
    uploads.watch_streams(hub, now)
    if hub.machine is not None:
        hub.apply(hub.machine.tick(now))
    if hub.secure is not None:
        hub.apply_secure(hub.secure.tick(now))


def cancel(hub: Hub, why: str) -> None:
    if hub.machine is not None:
        hub.apply(hub.machine.cancel(why))
    if hub.secure is not None:
        hub.apply_secure(hub.secure.cancel(hub.clock.now(), why))


def finish_secure(hub: Hub, round_id: RoundId, sr: SecureRound, invited: Sequence[str]) -> None:
    outcome = sr.result
    if outcome is None:
        # silo id -> its encoded Blame: empty unless the round proved who sent a bad weight
        blamed = {str(k): v for k, v in sr.round.blamed.items()}
        with hub.lock:
            hub.secure = None
            recorder.exclude(hub, round_id, sr.config.model_sha256, blamed)
        recorder.finish_aborted(
            hub, round_id, invited, sr.abort_reason or "aborted", blamed=sorted(blamed)
        )
        return
    hub.pause.at("unmask")
    cfg = sr.config
    survivors = [str(s) for s in outcome.survivors]
    try:
        # ḡ is the weighted mean of the survivors' updates: all the coordinator ever
        # decodes. Applied only if clipped inputs can produce it (docs/secagg-protocol.md
        # §2.5) and the new model is finite; else the round is aborted, the model kept.
        check_aggregate(cfg, outcome.aggregate, outcome.weight_sum, len(survivors))
        new_state = apply_aggregate(hub.global_state, outcome.aggregate, cfg.layout)
        check_finite(new_state)
    except SecureRoundError as exc:
        sr.round.result = dataclasses.replace(outcome, aggregate=np.empty(0, np.float32))
        with hub.lock:
            hub.secure = None
        recorder.finish_aborted(hub, round_id, invited, str(exc))
        return
    weight_sum = outcome.weight_sum / cfg.weight_scale * cfg.weight_max
    report = outcome.dp_report
    # Free the accumulator (ḡ lives in it) before serialising the new model.
    sr.round.result = dataclasses.replace(outcome, aggregate=np.empty(0, np.float32))
    del outcome
    data = state_to_bytes(new_state)
    ckpt = hub.checkpoints.save_bytes(round_id, data)
    hub.pause.at("checkpoint")
    hub.next_offer = data
    del data
    with hub.lock:
        if report is not None:
            hub.roundlog.record_privacy(
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
        hub.apply_secure(Step(sr.round.announce(bytes.fromhex(ckpt.sha256))))
        hub.secure = None
        recorder.complete(hub, round_id, invited, survivors, new_state, ckpt, weight_sum)


def finish_plaintext(
    hub: Hub,
    round_id: RoundId,
    machine: RoundMachine,
    aggregation: AggregationProtocol,
    invited: Sequence[str],
) -> None:
    if machine.stage is not Stage.READY:
        with hub.lock:
            hub.machine, hub.aggregation = None, None
        recorder.finish_aborted(hub, round_id, invited, machine.abort_reason or "aborted")
        return
    try:
        result = aggregation.finish()
    except AggregationError as exc:  # NON_FINITE_MODEL: the old model is kept, no checkpoint
        with hub.lock:
            hub.machine, hub.aggregation = None, None
        recorder.finish_aborted(hub, round_id, invited, str(exc))
        return
    data = state_to_bytes(result.new_state)
    ckpt = hub.checkpoints.save_bytes(round_id, data)
    hub.pause.at("checkpoint")
    hub.next_offer = data
    del data
    with hub.lock:
        hub.machine, hub.aggregation = None, None
        recorder.complete(
            hub,
            round_id,
            invited,
            list(result.contributors),
            result.new_state,
            ckpt,
            result.weight_sum,
        )


def _whole_s(seconds: float) -> int:
    """A deadline as whole seconds for the round config (silos time out a little later)."""
    return max(1, math.ceil(seconds))

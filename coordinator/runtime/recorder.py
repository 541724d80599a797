"""What the round log, the silos and the operator are told when a round moves or ends.

Rule: these functions write the round log (dropouts, phases, participants, per-silo stats, the
end of a round), broadcast the round's result, and keep the blame exclusions; they run under the
hub's lock (`finish_aborted` and `record_missing_silos` take it). What to record comes with the
events and the outcome of the round (coordinator.rounds.kind), whichever kind it is.

Blame: a round that aborts with silos proven to have sent an out-of-range weight element
(`Aborted.blamed`, secagg/blame.py) excludes them from every later round and the final
evaluation of this process (`Hub.excluded`, shown by `status`), and the proofs go with every
later offer of the same model, so the honest silos accept a retry of it without them; a
completed round drops the proofs. Exclusion lasts until the coordinator stops: revoking the
silo's certificate is what keeps it out for good.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from coordinator.rounds.phases import Dropped, Event, PhaseEnded, RoundId
from coordinator.rounds.stall import Diagnosis, RoundEnd
from coordinator.runtime.peer_input import finite_mean
from coordinator.storage.checkpoints import Checkpoint
from protos import federation_pb2 as pb
from protos.names import abort_code_in, abort_value

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub

log = logging.getLogger("silofed.coordinator")

NOT_ENOUGH_SILOS = "NOT_ENOUGH_SILOS"
# Per silo, the metrics of its report the round kept (`Completed.metrics`, `Aborted.metrics`).
Metrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A silo proven to have sent an out-of-range weight element: never invited again."""

    silo_id: str
    round_id: int  # the aborted round whose evidence names it
    at: float  # unix seconds


def record_events(hub: Hub, round_id: int, events: Sequence[Event]) -> None:
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
            hub.roundlog.record_dropout(
                round_id, event.silo_id, phase=event.phase, reason=event.reason.value
            )
            s = hub.sessions.get(event.silo_id)
            if s is not None and not s.closed:
                hub.send_abort(s, round_id, abort_value(event.reason.value), event.detail)
        elif isinstance(event, PhaseEnded):
            hub.roundlog.record_phase(
                round_id, event.phase, started_at=event.started_at, ended_at=event.ended_at
            )
            if event.participant_set:
                hub.roundlog.record_participants(round_id, event.participant_set, event.survivors)
            log.info(
                "round %d: phase %s ended with %d silos (%.2f s)",
                round_id,
                event.phase,
                len(event.survivors),
                event.ended_at - event.started_at,
            )
    hub.changed.notify_all()


def complete(
    hub: Hub,
    round_id: RoundId,
    invited: Sequence[str],
    survivors: list[str],
    new_state: dict[str, torch.Tensor],
    ckpt: Checkpoint,
    weight_sum: float,
    metrics: Metrics,
) -> None:
    """Record a completed round and tell the silos (under the lock)."""
    hub.verdict = hub.stall.observe(RoundEnd(round_id, completed=True))
    # The next model is a new one: no silo needs the proofs of this one's attempts.
    hub.blame_model, hub.blame_evidence = b"", []
    global_metrics = _mean_eval(metrics.get(s, {}) for s in survivors if s in hub.sessions)
    record_stats(hub, round_id, invited, metrics)
    hub.roundlog.record_participants(round_id, "finished", survivors)
    hub.roundlog.finish_round(
        round_id,
        status="completed",
        ended_at=hub.clock.now(),
        model_out_sha256=ckpt.sha256,
        checkpoint_path=str(ckpt.path),
        checkpoint_sha256=ckpt.sha256,
        weight_sum=weight_sum,
        global_metrics=global_metrics,
    )
    hub.pause.at("roundlog")
    hub.global_state = new_state
    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(global_metrics.items()))
    log.info(
        "round %d completed: %d silos, weight %g, model %s %s",
        round_id,
        len(survivors),
        weight_sum,
        ckpt.sha256[:12],
        shown,
    )
    hub.broadcast_result(
        pb.RoundResult(
            round_id=round_id,
            status=pb.ROUND_STATUS_COMPLETED,
            new_model_sha256=bytes.fromhex(ckpt.sha256),
            survivors=survivors,
        ),
        invited,
    )


def finish_aborted(
    hub: Hub,
    round_id: RoundId,
    invited: Sequence[str],
    reason: str,
    *,
    metrics: Metrics | None = None,
    refusals: Mapping[str, str] | None = None,
    missing: Sequence[str] = (),
    blamed: Sequence[str] = (),
) -> None:
    """Record an aborted round (`refusals`: silo -> the reason code it refused the round
    with, for the stall diagnosis) and tell the silos."""
    with hub.lock:
        record_stats(hub, round_id, invited, metrics or {})
        detail = hub.roundlog.round_detail(round_id)
        dropped = (*(d.silo_id for d in detail.dropouts), *missing)
        absent = tuple(s for s in dropped if s not in hub.sessions)
        why = dict(refusals or {})
        end = RoundEnd(round_id, False, reason, why, dropped, absent, tuple(blamed))
        hub.verdict = verdict = hub.stall.observe(end)
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
        hub.roundlog.finish_round(
            round_id, status="aborted", ended_at=hub.clock.now(), abort_reason=reason, extra=extra
        )
        log.warning("round %d aborted: %s; nothing was aggregated", round_id, reason)
        hub.broadcast_result(
            pb.RoundResult(
                round_id=round_id,
                status=pb.ROUND_STATUS_ABORTED,
                abort_reason=reason,
                abort_code=abort_code_in(reason),
            ),
            invited,
        )


def record_stats(hub: Hub, round_id: int, invited: Sequence[str], metrics: Metrics) -> None:
    for silo_id in invited:
        s = hub.sessions.get(silo_id)
        if s is None:
            continue
        hub.roundlog.record_silo_stats(
            round_id,
            silo_id,
            bytes_in=s.round_bytes_in,
            bytes_out=s.round_bytes_out,
            metrics=metrics.get(silo_id, {}),
        )


def exclude(hub: Hub, round_id: RoundId, model_sha: bytes, blamed: Mapping[str, bytes]) -> None:
    """Exclude the silos `blamed` proves sent an out-of-range weight element, and keep the
    proofs for the offers of `model_sha` (under the lock)."""
    if not blamed:
        return
    if model_sha != hub.blame_model:
        hub.blame_model, hub.blame_evidence = model_sha, []
    now = hub.clock.now()
    for silo_id, evidence in sorted(blamed.items()):
        hub.blame_evidence.append(evidence)
        hub.excluded.setdefault(silo_id, Exclusion(silo_id, round_id, now))
        s = hub.sessions.get(silo_id)
        which = f"--serial {s.cert_serial:x}" if s is not None and s.cert_serial else "--cert FILE"
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


def record_missing_silos(hub: Hub, need: int) -> None:
    """An attempt that could not start: fewer than `need` silos came back within
    [rounds] start_timeout_s. Logged as an aborted round naming the missing roster members,
    so the stall watch counts it and its diagnosis says whom to bring back."""
    cfg = hub.config.rounds
    with hub.lock:
        hub.refresh_trust()
        connected = hub.eligible()
        missing = sorted(set(hub.roster.entries) - set(connected) - set(hub.excluded))
        round_id = RoundId(hub.roundlog.last_round_id() + 1)
        model = hub.next_offer or hub.checkpoints.offer_of(hub.global_state)
        hub.roundlog.start_round(
            round_id,
            started_at=hub.clock.now(),
            aggregation=cfg.aggregation,
            config_digest=hashlib.sha256(b"").hexdigest(),
            model_in_sha256=model.sha256.hex(),
            invited=connected,
        )
    reason = (
        f"{NOT_ENOUGH_SILOS}: {len(connected)} silos connected, {need} needed ([rounds] "
        f"min_silos) after waiting {cfg.start_timeout_s:.0f} s; missing: "
        + (", ".join(missing) or "none of the roster")
    )
    finish_aborted(hub, round_id, connected, reason, missing=missing)


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

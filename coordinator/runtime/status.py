"""What `GetStatus` answers: the hub's state in one reply, built under the hub's lock.

Rule: O(1) reads only (the round's own `status()`, the connected streams' counters, the round
log's completed-round counter): the live progress line and every metrics scrape ask for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.rounds.stall import Proceed
from protos import federation_pb2 as pb

if TYPE_CHECKING:
    from coordinator.runtime.hub import Hub


def status_reply(hub: Hub) -> pb.StatusReply:
    with hub.lock:
        round_id, phase, since = 0, "", 0.0
        if hub.round is not None:
            st = hub.round.status()
            round_id, phase, since = st.round_id, st.phase, st.since
        verdict = hub.verdict
        if isinstance(verdict, Proceed) and verdict.aborted_in_a_row and not round_id:
            phase = f"backoff after {verdict.aborted_in_a_row} aborted rounds ({verdict.cause})"
        return pb.StatusReply(
            aborted_in_a_row=verdict.aborted_in_a_row if isinstance(verdict, Proceed) else 0,
            abort_cause=verdict.cause,
            federation_id=hub.config.federation_id,
            silos=[
                pb.SiloStatus(
                    silo_id=s.silo_id,
                    connected_since_unix=s.connected_since,
                    cert_not_after_unix=s.cert_not_after,
                    bytes_in=s.bytes_in,
                    bytes_out=s.bytes_out,
                )
                for s in hub.sessions.values()
            ],
            current_round=round_id,
            phase=phase,
            phase_started_unix=since,
            rounds_completed=hub.completed_rounds(),
            excluded=[
                pb.ExcludedSilo(silo_id=e.silo_id, round_id=e.round_id, excluded_at_unix=e.at)
                for _, e in sorted(hub.excluded.items())
            ],
        )

"""When the federation cannot make progress: back off, then stop with a diagnosis.

Rule: pure (no clock, no I/O). The round driver reports how each round ended (`RoundEnd`);
`StallWatch.observe` answers how long to wait before the next round (exponential backoff after
an aborted round, bounded) or, once the SAME cause has aborted `limit` rounds in a row, a
`Diagnosis` naming the cause, the rounds, the silos involved and what the operator can do. A
completed round resets everything. So an ordinary failure heals by itself (a restarted silo
joins the next attempt), and one that cannot heal stops instead of filling the round log.

A round's cause is what the silos said when most of the silos that refused agree (a silo knows
why it refused: REPLAY, ROSTER_MISMATCH, ...), else the coordinator's own abort code. A round
whose culprits were proven and excluded (`RoundEnd.blamed`) is not a stall: the next attempt
follows at once, and the count starts afresh.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# What the coordinator operator can do about each cause (shown in the diagnosis).
OPTIONS: Mapping[str, str] = {
    "REPLAY": (
        "the silos already sent the allowed number of masked inputs for this global model "
        "(silo [secagg] max_masked_inputs_per_model, default 3); a retry is only possible with "
        "the same survivors. Roll back to an earlier round (`silofed-coordinator rollback --to "
        "N`) only if the silos' operators raise that limit, or start a new training run. If the "
        "rounds before these aborted with AGGREGATE_OUT_OF_BOUND or OVERFLOW_RULE (`rounds "
        "list`), a silo sabotages them: see the options for those causes"
    ),
    "CONSISTENCY_FAILED": (
        "the silos refuse a second masked input for this model with different survivors (the "
        "differencing guard); bring back the silos of the earlier attempt, or roll back"
    ),
    "ROSTER_MISMATCH": (
        "the silos pin another roster version than the coordinator's; distribute the current "
        "signed roster (the coordinator sends it on connect) or have the silo operators update "
        "[tls] roster"
    ),
    "THRESHOLD_VIOLATION": (
        "too few silos survived a phase for the threshold; bring the missing silos back, or "
        "lower [secagg] threshold if the silos' policy (t_floor) allows"
    ),
    "TIMEOUT": "silos miss a deadline; check the silos' logs, or raise the [deadlines]",
    "DISCONNECTED": "silos drop their streams mid-round; check the silos' logs and network",
    "NOT_ENOUGH_SILOS": (
        "silos that took part are not connected; start their agents again (they reconnect by "
        "themselves, also as a service with --serve-forever), or lower [rounds] min_silos and "
        "[secagg] threshold if the silos' policy allows running without them"
    ),
    "LAYOUT_MISMATCH": (
        "the silos' task builds a model with another layout than the coordinator's: run the same "
        "task version on both sides"
    ),
    "CANNOT_CONFIGURE": (
        "no secure round can be configured for the silos connected; fix [secagg] (threshold, "
        "clip_l2) or bring more silos online"
    ),
    "OVERFLOW_RULE": (
        "if the silos refused the offer with it, the configured sum could wrap around: lower "
        "[secagg] clip_l2 or set ring_bits = 64. In phase unmask, a silo that sends an "
        "out-of-range weight element is named with a proof (the round's `blamed` in `rounds "
        "show N`, an ERROR line) and excluded automatically, and the next attempt runs without "
        "it, so such rounds do not stop the federation: this diagnosis means no silo could be "
        "blamed, i.e. every survivor's weight was in range but their sum was 0 (under example "
        "weighting, no silo trained on any example): check the silos' data and their logs. "
        "Revoke a blamed silo (`silofed-coordinator revoke`) so a restarted coordinator does "
        "not invite it again"
    ),
    "AGGREGATE_OUT_OF_BOUND": (
        "the decoded aggregate is longer than clipped inputs can produce, so one silo sends "
        "unclipped input (a modified agent or host) and masking cannot say which "
        "(docs/secagg-protocol.md §2.5); nothing was applied. Have each silo's operator check "
        "its agent and its ledger (`silofed-silo ledger`), revoke the silo that cannot account "
        "for its inputs (`silofed-coordinator revoke`), then continue from a model it never "
        "trained on (`rollback --to N` to before it joined, or a new run): the others refuse "
        "this model without it"
    ),
    "NON_FINITE_MODEL": (
        "the aggregate would put NaN or infinity in the model (nothing was applied): with "
        "plaintext-insecure set [plaintext] clip_l2; check the model's dtype range (float16) "
        "and the checkpoint the coordinator resumed from (`rollback --to N`)"
    ),
}
DEFAULT_OPTION = "read the silos' logs for the reason they give, and `rounds show` for each round"


@dataclass(frozen=True, slots=True)
class RoundEnd:
    """How one round ended, as the driver saw it."""

    round_id: int
    completed: bool
    abort_reason: str = ""  # e.g. "THRESHOLD_VIOLATION in phase share_keys"
    refusals: Mapping[str, str] = field(default_factory=dict)  # silo -> reason code it sent
    dropped: tuple[str, ...] = ()  # silos that dropped out (refused, timed out, disconnected)
    absent: tuple[str, ...] = ()  # of those, the ones not connected when the round ended
    blamed: tuple[str, ...] = ()  # silos proven to have caused the abort, now excluded

    @property
    def cause(self) -> str:
        if self.refusals:
            (code, count), *_ = Counter(self.refusals.values()).most_common(1)
            if 2 * count >= len(self.refusals):
                return code
        found = re.match(r"[A-Z][A-Z_]*", self.abort_reason)
        code = found.group(0) if found else "ABORTED"
        # Too few survivors because silos are gone (not merely slow): the same cause as a round
        # that could not start for want of silos, so a silo gone for good is counted once.
        if self.absent and code == "THRESHOLD_VIOLATION":
            return "NOT_ENOUGH_SILOS"
        return code


@dataclass(frozen=True, slots=True)
class Diagnosis:
    cause: str
    rounds: tuple[int, ...]
    silos: tuple[str, ...]
    last_reason: str

    @property
    def options(self) -> str:
        return OPTIONS.get(self.cause, DEFAULT_OPTION)

    def __str__(self) -> str:
        silos = ", ".join(self.silos) or "none named"
        return (
            f"the federation cannot make progress: {len(self.rounds)} rounds in a row "
            f"({self.rounds[0]}-{self.rounds[-1]}) aborted with cause {self.cause} "
            f"(last: {self.last_reason}); silos involved: {silos}. What to do: {self.options}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "cause": self.cause,
            "rounds": list(self.rounds),
            "silos": list(self.silos),
            "last_reason": self.last_reason,
            "options": self.options,
        }


@dataclass(frozen=True, slots=True)
class Proceed:
    """Start the next round after `wait_s` (0 after a completed round)."""

    wait_s: float
    aborted_in_a_row: int
    cause: str = ""


Verdict = Proceed | Diagnosis


@dataclass
class StallWatch:
    """Counts aborted rounds of one cause in a row. `limit` >= 1; 0 < initial_s <= max_s."""

    limit: int
    initial_s: float
    max_s: float
    _run: list[RoundEnd] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit < 1 or not 0 < self.initial_s <= self.max_s:
            raise ValueError("StallWatch needs limit >= 1 and 0 < initial_s <= max_s")

    @property
    def aborted_in_a_row(self) -> int:
        return len(self._run)

    def observe(self, end: RoundEnd) -> Verdict:
        if end.completed:
            self._run.clear()
            return Proceed(0.0, 0)
        if end.blamed:
            # Its cause is proven and out of the federation (the driver excludes the blamed
            # silos): the next attempt runs at once without them and this round counts towards
            # no stall. Each such round excludes a silo for good, so they cannot repeat forever.
            self._run.clear()
            return Proceed(0.0, 0, end.cause)
        if self._run and self._run[-1].cause != end.cause:
            self._run.clear()  # a new cause: the old one healed, this one gets its own count
        self._run.append(end)
        if len(self._run) >= self.limit:
            silos = sorted({s for e in self._run for s in (*e.refusals, *e.dropped)})
            return Diagnosis(
                end.cause, tuple(e.round_id for e in self._run), tuple(silos), end.abort_reason
            )
        wait = min(self.max_s, self.initial_s * 2 ** (len(self._run) - 1))
        return Proceed(wait, len(self._run), end.cause)

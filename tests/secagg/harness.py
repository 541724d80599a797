"""In-memory round: N SiloSessions and one CoordinatorRound as plain objects, joined by a fake
link. Also the reference of the message flow for the drivers' authors:

    coordinator.handle(M1) -> M2 to all U1 -> silo.handle(M2) -> M3 -> coordinator -> M4 ...
    silo.submit_update() -> coordinator.add_masked_vector() -> M6 -> M7 -> M8 -> M9
    coordinator.unmask_ready -> coordinator.finish() (the driver's thread) -> result

The harness calls `finish` as soon as the round is ready, before delivering anything else.

`drop_at[silo_id] = phase` makes that silo go silent instead of sending its message of that
phase ("advertise", "share_keys", "masked", "consistency", "unmask"); the harness then plays
the driver's deadline by calling `deadline_passed`. A silo that refuses the offer sends its
AbortNotice, as the driver does; `sent[silo_id]` lists every message a silo sent.
`corrupt_upload[silo_id]` rewrites that silo's masked upload before the coordinator sees it (a
patched agent); `blame` is the evidence every offer carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from secagg.config import RoundConfig, TensorSpec
from secagg.coordinator import CoordinatorRound, Phase
from secagg.errors import ProtocolAbort
from secagg.silo import JournalEntry, MaskedUpload, SiloPolicy, SiloSession, SiloStage
from secagg.trust import SiloIdentity
from tests.secagg.pki import NOW, Federation

PHASES = ("advertise", "share_keys", "masked", "consistency", "unmask")
MODEL = b"global model bytes"
MODEL_SHA = hashlib.sha256(MODEL).digest()


def round_floor(policy: SiloPolicy, n_invited: int) -> SiloPolicy:
    """The test federation pins MAX_SILOS members and its rounds invite a few of them; a silo's
    default collusion floor follows the roster (⌊(members − 1)/3⌋), which would refuse them all.
    Tests of everything else run as if the roster were the invited set: a policy with no
    `n_colluders_min` gets the invited set's floor. Tests of the floor itself build sessions
    without this."""
    if policy.n_colluders_min is not None:
        return policy
    floor = (n_invited - 1) // 3
    if policy.n_colluders_max is not None:
        floor = min(floor, policy.n_colluders_max)
    return dataclasses.replace(policy, n_colluders_min=floor)


def make_config(fed: Federation, n: int, d: int, **over: object) -> RoundConfig:
    invited = tuple(sorted((s.silo_id for s in fed.silos[:n]), key=lambda s: s.encode()))
    n_c = (n - 1) // 3
    fields: dict[str, object] = dict(
        federation_id=fed.roster.federation_id,
        roster_version=fed.roster.version,
        roster_digest=fed.roster.digest(),
        round_id=7,
        invited=invited,
        model_version=1,
        model_sha256=MODEL_SHA,
        layout=(TensorSpec("w", (d,)),),
        scale=2.0**16,
        clip_l2=1e3,
        threshold=max(3, (n + n_c) // 2 + 1),
        n_colluders=n_c,
    )
    fields.update(over)
    return RoundConfig(**fields)  # type: ignore[arg-type]


@dataclass
class Round:
    fed: Federation
    config: RoundConfig
    inputs: dict[str, np.ndarray]
    drop_at: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    journal: dict[str, list[JournalEntry]] = field(default_factory=dict)
    aborts: dict[str, ProtocolAbort] = field(default_factory=dict)
    # coordinator -> silo messages pass through tamper(recipient, bytes) -> bytes (adversary)
    tamper: Callable[[str, bytes], bytes] | None = None
    policies: dict[str, SiloPolicy] = field(default_factory=dict)
    # the policy of every silo not in `policies`
    # Example-weighted rounds need the silos' opt-in; the harness's silos give it.
    default_policy: SiloPolicy = field(
        default_factory=lambda: SiloPolicy(last_round_id=0, allow_example_weighting=True)
    )
    # silo id -> the digest of the model's tensors the driver would pass (None: the file hash)
    model_digests: dict[str, bytes] = field(default_factory=dict)
    keep_ring_sum: bool = True  # tests check the exact ring sum; benchmarks turn it off
    # A silo that goes silent is reported with `silo_lost` (as the driver does when its
    # stream breaks) instead of waiting for the phase deadline.
    report_lost: bool = False
    # silo id -> how it rewrites its own upload after submit_update (a cheating agent)
    corrupt_upload: dict[str, Callable[[MaskedUpload], MaskedUpload]] = field(default_factory=dict)
    # the blame evidence the offer carries to every silo
    blame: tuple[bytes, ...] = ()
    # silo id -> the example count it reports (1 when absent)
    examples: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coordinator = CoordinatorRound(
            self.config, self.fed.trust, now=NOW, keep_ring_sum=self.keep_ring_sum
        )
        self.sessions: dict[str, SiloSession] = {}
        by_id: dict[str, SiloIdentity] = {s.silo_id: s for s in self.fed.silos}
        for k, sid in enumerate(self.config.invited):
            log: list[JournalEntry] = []
            self.journal[sid] = log
            self.sessions[sid] = SiloSession(
                by_id[sid],
                self.fed.trust,
                round_floor(self.policies.get(sid, self.default_policy), len(self.config.invited)),
                random_bytes=os.urandom,
                rng=np.random.Generator(np.random.PCG64DXSM(self.seed * 1000 + k)),
                journal=log.append,
            )
        self.dead: set[str] = set()
        self.newly_lost: list[str] = []
        self.deadline_calls = 0
        self.finish_calls = 0  # the driver's `finish` calls (more than one: a retried unmask)
        self.pending: list[tuple[str, bytes]] = []
        self.uploads: dict[str, np.ndarray] = {}
        self.headers: dict[str, bytes] = {}  # the M5 header each silo sent
        self.sent: dict[str, list[bytes]] = {sid: [] for sid in self.config.invited}

    def _silent(self, sid: str, phase: str) -> bool:
        if sid in self.dead:
            return True
        at = self.drop_at.get(sid)
        if at is not None and PHASES.index(phase) >= PHASES.index(at):
            self.dead.add(sid)
            if self.report_lost:
                self.newly_lost.append(sid)
            return True
        return False

    def run(self, max_steps: int = 10_000, stop_at: Phase | None = None) -> CoordinatorRound:
        """Play the round to its end (or until the coordinator reaches `stop_at`; the sends
        not yet delivered are then left in `self.pending`)."""
        rnd = self.coordinator
        queue: deque[tuple[str, bytes]] = deque()
        for sid, s in self.sessions.items():
            if self._silent(sid, "advertise"):
                continue
            digest = self.model_digests.get(sid)
            try:
                m1 = s.handle_offer(
                    self.config.encode(), MODEL_SHA, now=NOW, model_digest=digest, blame=self.blame
                )
            except ProtocolAbort as exc:
                self.aborts[sid] = exc
                assert s.abort_notice is not None
                m1 = s.abort_notice
            queue.extend(self._to_coord(sid, [m1]))
        for _ in range(max_steps):
            if stop_at is not None and rnd.phase is stop_at:
                self.pending = list(queue)
                return rnd
            if rnd.phase in (Phase.DONE, Phase.ABORTED):
                # deliver the final notices and results, nothing is expected back
                if rnd.phase is Phase.DONE:
                    queue.extend(rnd.announce(hashlib.sha256(b"next model").digest()))
                for sid, data in queue:
                    self._deliver(sid, data)
                return rnd
            while self.newly_lost:
                queue.extend(rnd.silo_lost(self.newly_lost.pop()))
            if rnd.unmask_ready:  # the driver unmasks as soon as the shares are in
                self.finish_calls += 1
                queue.extend(rnd.finish())
                continue
            if not queue:
                self.deadline_calls += 1
                queue.extend(rnd.deadline_passed(NOW))
                continue
            sid, data = queue.popleft()
            queue.extend(self._deliver(sid, data))
        raise AssertionError("round did not finish within the step bound")

    def _to_coord(self, sid: str, replies: list[bytes]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for r in replies:
            self.sent[sid].append(r)
            out.extend(self.coordinator.handle(sid, r, now=NOW))
        return out

    def _deliver(self, sid: str, data: bytes) -> list[tuple[str, bytes]]:
        if sid in self.dead:
            return []
        s = self.sessions[sid]
        if self.tamper is not None:
            data = self.tamper(sid, data)
        phase_of_reply = {
            SiloStage.ADVERTISED: "share_keys",
            SiloStage.MASKED_SENT: "consistency",
            SiloStage.SIGNED: "unmask",
        }.get(s.stage)
        if phase_of_reply and self._silent(sid, phase_of_reply):
            return []
        try:
            replies = s.handle(data, now=NOW)
        except ProtocolAbort as exc:
            self.aborts[sid] = exc
            return []
        out = self._to_coord(sid, replies)
        if s.stage is SiloStage.KEYS_RECEIVED and not self._silent(sid, "masked"):
            upload = s.submit_update(self.inputs[sid], self.examples.get(sid, 1))
            corrupt = self.corrupt_upload.get(sid)
            if corrupt is not None:
                upload = corrupt(upload)
            self.uploads[sid] = upload.vector
            self.headers[sid] = upload.header
            out.extend(self.coordinator.add_masked_vector(sid, upload.header, upload.vector))
        return out


def exact_inputs(config: RoundConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs on the grid 1/S with small integers, so encoding is exact and checkable."""
    ints = {sid: rng.integers(-(2**12), 2**12, size=config.d) for sid in config.invited}
    return {sid: (v / config.scale).astype(np.float32) for sid, v in ints.items()}

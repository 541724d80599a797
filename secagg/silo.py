"""The silo's side of one secure-aggregation session, as a state machine (docs/secagg-protocol.md
§5).

Rule: one transition table (`_TABLE`) decides which message each stage accepts; anything else
aborts (fail closed). Every check of §5 raises `ProtocolAbort` with its reason; the session then
moves to ABORTED, erases its secrets and offers `abort_notice` bytes for the driver to send. No
I/O: the driver passes bytes in, sends the bytes returned, and persists the `JournalEntry`
values handed to `journal` *before* sending whatever the call returns.

Driver use::

    s = SiloSession(identity, trust, policy, random_bytes=os.urandom, rng=gen, journal=persist)
    m1 = s.handle_offer(config_bytes, sha256(model_bytes), now=now,
                        model_digest=digest_of_tensors,
                        blame=offer_blame_evidence)                        # -> send m1
    s.train_params                                                         # train with these
    for reply in s.handle(m2_bytes, now=now): send(reply)                  # M2 -> [M3]
    s.handle(m4_bytes, now=now)                                            # M4 -> []
    s.precompute_masks()                                                   # optional, any time
    upload = s.submit_update(delta_f32, num_examples)                      # -> header + vector
    s.handle(m6_bytes, now=now) -> [M7];  s.handle(m8_bytes, now=now) -> [M9]
    s.handle(m10_bytes, now=now) -> []  (s.result holds the RoundResult)
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from secagg import encoding, shamir
from secagg.blame import InvalidBlame, verify_blame
from secagg.config import (
    PROTOCOL,
    GraphKind,
    RoundConfig,
    Weighting,
    default_colluders,
    minimum_threshold,
)
from secagg.dp import sample_discrete_gaussian
from secagg.errors import (
    AbortReason,
    BadKey,
    DecryptionFailed,
    MalformedMessage,
    ProtocolAbort,
    SecAggError,
)
from secagg.graph import neighbours
from secagg.graph_params import sparse_graph_problem, stays_connected
from secagg.messages import (
    SIG_ADVERTISE,
    SIG_CONSISTENCY,
    SIG_MASKED,
    SIG_SHAREKEYS,
    AbortNotice,
    Advertise,
    Consistency,
    ConsistencySet,
    KeyList,
    MaskedHeader,
    Message,
    RoundResult,
    ShareKeys,
    SharesForYou,
    SignedEnvelope,
    SurvivorList,
    UnmaskShares,
    decode_as,
    decode_message,
    encode_message,
)
from secagg.primitives import (
    RandomBytes,
    X25519Key,
    add_mask,
    agree,
    commit_b,
    k_enc,
    k_pair,
    k_self,
    new_x25519,
    open_sealed,
    raw_private,
    raw_public,
    ring_dtype,
    seal,
    sha256_array,
    u32,
)
from secagg.roster_sig import roster_mismatch_detail
from secagg.train_params import TrainParamsError, TrainValue, parse_train_params
from secagg.transcript import consistency_digest, session_id
from secagg.trust import SiloIdentity, Trust, verify_signer

_T = TypeVar("_T")


class SiloStage(enum.Enum):
    IDLE = "idle"
    ADVERTISED = "advertised"
    SHARED = "shared"
    KEYS_RECEIVED = "keys_received"
    MASKED_SENT = "masked_sent"
    SIGNED = "signed"
    UNMASKED = "unmasked"
    COMPLETED = "completed"
    ABORTED = "aborted"


TERMINAL = frozenset({SiloStage.COMPLETED, SiloStage.ABORTED})


class UsageError(SecAggError):
    """The driver called a method the session's stage does not allow (no state change)."""


@dataclass(frozen=True, slots=True)
class SubmissionRecord:
    """One masked input sent for a model; `survivors` (silo ids of U3) once known.

    `model_digest` identifies the model by its tensors (names, dtypes, shapes, values) as the
    driver computes it, so re-serialising the same tensors does not make a new model; records
    written before that was available hold the SHA-256 of the model file instead."""

    model_digest: bytes
    round_id: int
    session_id: bytes
    survivors: frozenset[str] | None = None
    # U2 of that session (known when the input left): a retry must invite exactly U3, or U2
    # when U3 was never seen (records from before this field hold None: no member check).
    members: frozenset[str] | None = None
    # Silos proven (secagg.blame) to have sent an out-of-range weight in that session: a retry
    # goes ahead without them.
    excluded: frozenset[str] = frozenset()

    def retry_members(self) -> frozenset[str] | None:
        """The U1 a later session for the same model must have, for this silo to take part:
        that session's U3 (its U2 when U3 was never seen), less the excluded silos."""
        wanted = self.survivors if self.survivors is not None else self.members
        return None if wanted is None else wanted - self.excluded


@dataclass(frozen=True, slots=True)
class RoundAccepted:
    """Persist `last_round_id = round_id` (step 0.2)."""

    round_id: int


@dataclass(frozen=True, slots=True)
class MaskedInputRecorded:
    """Append to the submission log before the masked vector leaves (step 3.7)."""

    record: SubmissionRecord


@dataclass(frozen=True, slots=True)
class SurvivorsRecorded:
    """Update the submission-log record of `session_id` with its U3 (step 4.3)."""

    record: SubmissionRecord


@dataclass(frozen=True, slots=True)
class ExclusionRecorded:
    """Update the submission-log record of `session_id` with its `excluded` silos (verified
    blame evidence came with an offer for the same model)."""

    record: SubmissionRecord


JournalEntry = RoundAccepted | MaskedInputRecorded | SurvivorsRecorded | ExclusionRecorded


@dataclass(frozen=True, slots=True)
class SiloPolicy:
    """Local policy and persisted state, passed in by the driver. The coordinator is not
    trusted to choose any of these; a round configuration outside them is refused at phase 0.

    * `n_colluders_min`: the fewest colluding silos a configuration may assume; None is
      ⌊(n−1)/3⌋ for the n members of the pinned roster (0 for 3, 1 for 4..6, 2 for 7..9, ...),
      whatever number of silos a round invites.
    * `allow_sparse_graph`: take part in Harary-graph rounds (off by default).
    * `expected_layout_sha256`: the layout hash of this silo's own model (None: not checked).
    * `train_limits`: training-parameter name -> the largest value this silo trains with.
    * `max_round_step`: how far ahead of `last_round_id` a round id may be.
    * `max_masked_inputs_per_model`: masked inputs this silo sends for one model digest (the
      retry rule of `SiloSession._on_survivors` applies to every one after the first).
    * `retired_models`: model digests whose records the silo's bounded submission log dropped;
      it sends no further masked input for them (their retry rule can no longer be checked).
    * `allow_example_weighting` (off by default): take part in example-weighted rounds, where
      the coordinator
      learns this silo's quantised, capped example count min(n, W_max)/W_max once it unmasks.
    """

    last_round_id: int
    t_floor: int = 3
    n_colluders_max: int | None = None
    accepted_ring_bits: frozenset[int] = frozenset({32, 64})
    min_noise_multiplier: float = 0.0
    max_masked_inputs_per_model: int = 3
    submission_log: Mapping[bytes, tuple[SubmissionRecord, ...]] = field(default_factory=dict)
    retired_models: frozenset[bytes] = frozenset()
    n_colluders_min: int | None = None
    expected_layout_sha256: bytes | None = None
    train_limits: Mapping[str, float] = field(default_factory=dict)
    max_round_step: int = 10_000
    allow_sparse_graph: bool = False
    allow_example_weighting: bool = False

    def __post_init__(self) -> None:
        if self.t_floor < 3:
            raise ValueError("t_floor must be >= 3 (the hard floor)")
        if self.n_colluders_min is not None and self.n_colluders_min < 0:
            raise ValueError("n_colluders_min must be >= 0 (or None for the default floor)")
        if (
            self.n_colluders_min is not None
            and self.n_colluders_max is not None
            and self.n_colluders_min > self.n_colluders_max
        ):
            raise ValueError("n_colluders_min must be <= n_colluders_max")
        if self.expected_layout_sha256 is not None and len(self.expected_layout_sha256) != 32:
            raise ValueError("expected_layout_sha256 must be 32 bytes")
        if self.max_round_step < 1:
            raise ValueError("max_round_step must be >= 1")
        if self.max_masked_inputs_per_model < 1:
            raise ValueError("max_masked_inputs_per_model must be >= 1")
        if any(not (math.isfinite(v) and v >= 0) for v in self.train_limits.values()):
            raise ValueError("train_limits must be finite numbers >= 0")

    def colluders_floor(self, n_members: int) -> int:
        """The smallest n_colluders this silo accepts in a federation of `n_members` (the pinned
        roster): `n_colluders_min`, or ⌊(n_members − 1)/3⌋."""
        if self.n_colluders_min is not None:
            return self.n_colluders_min
        return default_colluders(n_members)


@dataclass(frozen=True, slots=True)
class MaskedUpload:
    """M5: the header bytes (SignedEnvelope(MaskedHeader)) to send first, then the ring vector
    (chunk it for the stream)."""

    header: bytes
    vector: np.ndarray


@dataclass(slots=True)
class _Peer:
    silo_id: str
    c_pk: bytes
    s_pk: bytes


def _abort(reason: AbortReason, detail: str) -> ProtocolAbort:
    return ProtocolAbort(reason, detail)


class SiloSession:
    """One silo in one round. Not thread-safe: the driver serialises calls."""

    def __init__(
        self,
        identity: SiloIdentity,
        trust: Trust,
        policy: SiloPolicy,
        *,
        random_bytes: RandomBytes,
        rng: np.random.Generator,
        journal: Callable[[JournalEntry], None] | None = None,
    ) -> None:
        self.identity = identity
        self.trust = trust
        self.policy = policy
        self._random = random_bytes
        self._rng = rng
        self._journal = journal or (lambda entry: None)
        self.stage = SiloStage.IDLE
        self.abort_reason: AbortReason | None = None
        self.abort_notice: bytes | None = None
        self.result: RoundResult | None = None
        self.config: RoundConfig | None = None
        self.config_digest = b""
        # The parsed, checked training parameters of the accepted config: train with these.
        self.train_params: dict[str, TrainValue] = {}
        self._model_key = b""  # the submission-log key of this session's model
        self.session_id = b""
        self.index = 0
        self.u1: dict[int, _Peer] = {}
        self.u2: tuple[int, ...] = ()
        self.u3: tuple[int, ...] = ()
        self.digest_signed: bytes | None = None
        self._m1 = b""
        self._c_sk: X25519Key | None = None
        self._s_sk: X25519Key | None = None
        self._b_u: bytes | None = None
        self._nbrs: dict[int, frozenset[int]] = {}
        self._enc_keys: dict[int, tuple[bytes, bytes]] = {}  # v -> (k_enc(u,v), k_enc(v,u))
        self._pair_keys: dict[int, bytes] = {}
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # v -> (share_s(v), share_b(v))
        self._mask_set: tuple[int, ...] = ()
        self._vector: np.ndarray | None = None
        self._precomputed = False
        self._record: SubmissionRecord | None = None
        # Blame evidence that came with the offer: how many pieces proved nothing (ignored),
        # and the silos it excluded from this model's earlier sessions.
        self.blame_ignored = 0
        self.blame_excluded: frozenset[str] = frozenset()

    # --- public API --------------------------------------------------------------------------

    def handle_offer(
        self,
        config_bytes: bytes,
        model_sha256: bytes,
        *,
        now: dt.datetime,
        model_digest: bytes | None = None,
        blame: Sequence[bytes] = (),
    ) -> bytes:
        """Phase 0 checks and M1. Returns the encoded SignedEnvelope(Advertise).

        `model_sha256` is the SHA-256 of the model bytes received (checked against the config);
        `model_digest`, the driver's digest of the model's tensors, keys the submission log
        (the file hash does when it is None). `blame`: encoded Blame evidence the offer carried;
        each piece that verifies excludes its silo from this model's earlier session it names
        (journalled), the rest is ignored and counted in `blame_ignored`."""
        if self.stage is not SiloStage.IDLE:
            raise UsageError("handle_offer is only allowed once, on a new session")
        if model_digest is not None and len(model_digest) != 32:
            raise UsageError("model_digest must be 32 bytes")
        evidence = tuple(blame)
        return self._guard(
            lambda: self._offer(config_bytes, model_sha256, model_digest, evidence, now)
        )

    def handle(self, data: bytes, *, now: dt.datetime) -> list[bytes]:
        """Process one coordinator message; returns the encoded replies to send (maybe none)."""
        if self.stage is SiloStage.ABORTED:
            return []  # an aborted session answers nothing (docs/secagg-protocol.md §6)
        return self._guard(lambda: self._dispatch(data, now))

    def deadline_passed(self, *, round_over: bool = False) -> None:
        """The driver's phase deadline passed (docs/secagg-protocol.md §5, "Deadlines and state").
        Before M5 the session aborts with TIMEOUT; once the masked input is sent it keeps waiting
        until `round_over`."""
        if self.stage in TERMINAL or self.stage is SiloStage.UNMASKED:
            return
        if self.stage in (SiloStage.MASKED_SENT, SiloStage.SIGNED) and not round_over:
            return
        stage = self.stage
        self._enter_abort(AbortReason.TIMEOUT)
        raise ProtocolAbort(AbortReason.TIMEOUT, f"no progress in stage {stage.value}")

    def precompute_masks(self) -> None:
        """Σ sgn·PRG(k_pair) over M(u), ahead of training (allowed once M4 is handled)."""
        if self.stage is not SiloStage.KEYS_RECEIVED or self._vector is None:
            raise UsageError("pairwise masks need the M4 shares first")
        if not self._precomputed:
            self._add_pairwise(self._vector)
            self._precomputed = True

    def submit_update(self, delta: np.ndarray, num_examples: int) -> MaskedUpload:
        """Encode, mask and log the update (steps 3.5-3.7); returns M5 header and vector."""
        cfg = self.config
        if self.stage is not SiloStage.KEYS_RECEIVED or cfg is None or self._b_u is None:
            raise UsageError("submit_update needs a session that has handled M4")
        if delta.dtype != np.float32 or delta.ndim != 1 or delta.shape[0] != cfg.d:
            raise ValueError(f"update must be a flat float32 array of {cfg.d} elements")
        if not np.all(np.isfinite(delta)):
            raise ValueError("update contains NaN or infinity")
        return self._guard(lambda: self._mask(cfg, delta, num_examples))

    # --- machinery ---------------------------------------------------------------------------

    def _guard(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except ProtocolAbort as exc:
            self._enter_abort(exc.reason)
            raise
        except (MalformedMessage, DecryptionFailed, BadKey) as exc:
            reason = AbortReason.INTERNAL
            if isinstance(exc, MalformedMessage):
                reason = AbortReason.SET_INCONSISTENT
            self._enter_abort(reason)
            raise ProtocolAbort(reason, str(exc)) from exc

    def _enter_abort(self, reason: AbortReason) -> None:
        self.stage = SiloStage.ABORTED
        self.abort_reason = reason
        self.abort_notice = encode_message(AbortNotice(self.session_id, reason))
        self._erase()

    def _erase(self) -> None:
        self._c_sk = self._s_sk = None
        self._b_u = None
        self._shares.clear()
        self._own_shares = (b"", b"")
        self._enc_keys.clear()
        self._pair_keys.clear()
        self._vector = None

    def _dispatch(self, data: bytes, now: dt.datetime) -> list[bytes]:
        try:
            msg = decode_message(data)
        except MalformedMessage as exc:
            raise _abort(AbortReason.INTERNAL, f"undecodable message: {exc}") from exc
        if isinstance(msg, AbortNotice):
            if self.stage in TERMINAL:
                return []
            self._enter_abort(msg.reason)
            self.abort_notice = None  # the coordinator already knows
            return []
        key = (self.stage, type(msg))
        handler = _TABLE.get(key)
        if handler is None:
            if self.stage is SiloStage.UNMASKED and isinstance(msg, ConsistencySet):
                raise _abort(AbortReason.ALREADY_UNMASKED, "second unmask request")
            raise _abort(AbortReason.REPLAY, f"{type(msg).__name__} in stage {self.stage.value}")
        return handler(self, msg, now)

    # --- phase 0/1 ---------------------------------------------------------------------------

    def _offer(
        self,
        config_bytes: bytes,
        model_sha256: bytes,
        model_digest: bytes | None,
        blame: tuple[bytes, ...],
        now: dt.datetime,
    ) -> bytes:
        # Every check runs before anything sized by the config is allocated (the masked vector
        # is claimed at M4), so a configuration declaring a huge model is refused cheaply.
        try:
            cfg = RoundConfig.decode(config_bytes)
        except MalformedMessage as exc:
            raise _abort(AbortReason.CONFIG_REJECTED, str(exc)) from exc
        pol, roster = self.policy, self.trust.roster
        if cfg.protocol != PROTOCOL:
            raise _abort(AbortReason.CONFIG_REJECTED, f"unknown protocol {cfg.protocol!r}")
        if (cfg.federation_id, cfg.roster_version, cfg.roster_digest) != (
            roster.federation_id,
            roster.version,
            roster.digest(),
        ):
            detail = roster_mismatch_detail(
                cfg.federation_id, cfg.roster_version, cfg.roster_digest, roster
            )
            raise _abort(AbortReason.ROSTER_MISMATCH, detail)
        if cfg.round_id <= pol.last_round_id:
            raise _abort(AbortReason.STALE_ROUND, f"round {cfg.round_id} <= {pol.last_round_id}")
        # Bounded step: one message with round id 2^64 - 1 must not make every later round stale.
        # Checked before RoundAccepted is journalled, so a refused jump is never persisted.
        if cfg.round_id - pol.last_round_id > pol.max_round_step:
            raise _abort(
                AbortReason.ROUND_ID_JUMP,
                f"round id {cfg.round_id} is {cfg.round_id - pol.last_round_id} ahead of the "
                f"last accepted round {pol.last_round_id}, more than this silo's "
                f"{pol.max_round_step} ([secagg] max_round_step)",
            )
        self._journal(RoundAccepted(cfg.round_id))
        n = len(cfg.invited)
        if self.identity.silo_id not in cfg.invited:
            raise _abort(AbortReason.ROSTER_MISMATCH, "this silo is not invited")
        if any(sid not in roster.entries for sid in cfg.invited):
            raise _abort(AbortReason.ROSTER_MISMATCH, "invited silo not on the pinned roster")
        if cfg.ring_bits not in pol.accepted_ring_bits:
            raise _abort(
                AbortReason.CONFIG_REJECTED,
                f"ring width {cfg.ring_bits} not accepted by policy "
                f"({sorted(pol.accepted_ring_bits)})",
            )
        # The layout of the silo's own model also bounds d before anything is allocated.
        expected_layout = pol.expected_layout_sha256
        if expected_layout is not None and (got := cfg.layout_sha256()) != expected_layout:
            raise _abort(
                AbortReason.LAYOUT_MISMATCH,
                f"the config's layout ({len(cfg.layout)} tensors, d = {cfg.d}, layout hash "
                f"{got.hex()[:12]}) is not this silo's model's (layout hash "
                f"{expected_layout.hex()[:12]})",
            )
        if not self._overflow_ok(cfg, n):
            raise _abort(AbortReason.OVERFLOW_RULE, "sum of invited inputs could wrap")
        t, t_min = cfg.threshold, minimum_threshold(n, cfg.n_colluders, pol.t_floor)
        if not t_min <= t <= n:
            raise _abort(
                AbortReason.THRESHOLD_VIOLATION,
                f"threshold {t} is outside [{t_min}, {n}] for {n} invited silos and "
                f"n_colluders {cfg.n_colluders} (this silo's [secagg] t_floor is {pol.t_floor})",
            )
        if cfg.graph is GraphKind.HARARY:
            self._check_sparse_graph(cfg, n)
            if not pol.allow_sparse_graph:
                # A coordinator that can restart rounds cheaply can grind the ring until the
                # colluders surround a victim (docs/secagg-protocol.md §2.4): opt-in only.
                raise _abort(
                    AbortReason.CONFIG_REJECTED,
                    "this silo does not take part in sparse-graph rounds ([secagg] "
                    "allow_sparse_graph = false)",
                )
        # The floor follows the federation (the pinned roster), not the round: how many members
        # may collude is a property of the consortium, and a round that invites only a few
        # silos must not shrink the assumption with it.
        members = len(roster.entries)
        floor = pol.colluders_floor(members)
        if cfg.n_colluders < floor:
            raise _abort(
                AbortReason.COLLUSION_BELOW_POLICY,
                f"n_colluders {cfg.n_colluders} is below this silo's floor {floor} for a "
                f"federation of {members} members ([secagg] n_colluders_min)",
            )
        if pol.n_colluders_max is not None and cfg.n_colluders > pol.n_colluders_max:
            raise _abort(
                AbortReason.CONFIG_REJECTED,
                f"n_colluders {cfg.n_colluders} is above this silo's cap {pol.n_colluders_max} "
                "([secagg] n_colluders_max)",
            )
        if cfg.weighting is Weighting.EXAMPLES and not pol.allow_example_weighting:
            # Element 0 carries the self-mask only: the coordinator learns each survivor's
            # quantised weight, which under example weighting is its capped example count.
            raise _abort(
                AbortReason.CONFIG_REJECTED,
                "this silo does not take part in example-weighted rounds (the coordinator "
                "would learn its capped example count; [secagg] allow_example_weighting = false)",
            )
        if cfg.dp is None and pol.min_noise_multiplier > 0:
            raise _abort(AbortReason.CONFIG_REJECTED, "policy requires DP noise")
        if cfg.dp is not None and (
            cfg.dp.noise_divisor > t - cfg.n_colluders
            or not cfg.dp.noise_multiplier >= pol.min_noise_multiplier  # NaN fails too
        ):
            raise _abort(AbortReason.CONFIG_REJECTED, "DP parameters below policy")
        if model_sha256 != cfg.model_sha256:
            raise _abort(AbortReason.MODEL_HASH_MISMATCH, "model bytes do not match the config")
        try:
            train_params = parse_train_params(cfg.train_params, pol.train_limits)
        except TrainParamsError as exc:
            raise _abort(AbortReason.TRAIN_PARAMS_REJECTED, str(exc)) from exc
        # Differencing guard, offer side: at most `max_masked_inputs_per_model` masked inputs
        # per model digest. Every input after the first is further bound by the retry rule
        # at M6 (`_on_survivors`).
        key = model_digest if model_digest is not None else cfg.model_sha256
        self._model_key = key
        # A retired model's records are gone: its retry rule cannot be checked any more.
        retired = [k for k in dict.fromkeys((key, cfg.model_sha256)) if k in pol.retired_models]
        if retired:
            under = "digest" if retired[0] == key else "file hash, from an older agent,"
            raise _abort(
                AbortReason.REPLAY,
                f"this silo no longer keeps its records of this model (under its {under} "
                f"{retired[0].hex()[:12]}): they were retired to keep [secagg] "
                f"remembered_models models, so its retry rule cannot be checked and it sends no "
                f"further masked input for it; start from a newer model",
            )
        # Evidence first: the retry rule (here and at M2, M4, M6) reads the exclusions.
        self._apply_blame(blame, cfg.model_sha256, now)
        earlier = self._earlier_records(cfg.model_sha256)
        if len(earlier) >= pol.max_masked_inputs_per_model:
            raise _abort(
                AbortReason.REPLAY,
                f"{len(earlier)} masked inputs already sent for this model (digest "
                f"{key.hex()[:12]}), this silo's limit ([secagg] max_masked_inputs_per_model "
                f"= {pol.max_masked_inputs_per_model})",
            )
        self.train_params = train_params
        self.config, self.config_digest = cfg, cfg.digest()
        self._c_sk, self._s_sk = new_x25519(self._random), new_x25519(self._random)
        adv = Advertise(
            self.config_digest,
            cfg.round_id,
            self.identity.silo_id,
            raw_public(self._c_sk),
            raw_public(self._s_sk),
        )
        env = self.identity.seal(SIG_ADVERTISE, encode_message(adv))
        self._m1 = encode_message(env)
        self.stage = SiloStage.ADVERTISED
        return self._m1

    def _check_retry_members(self, members: frozenset[str]) -> None:
        """Retry rule, membership side, checked on U1 at M2 (before any share leaves) and on U2
        at M4 (before the input leaves): a second masked input for one model goes only into a
        session whose U1 and U2 are exactly the earlier attempt's U3 (its U2 when this silo
        never saw that U3). With the threshold rule this makes any two unmasked sums for one
        model that share an honest contributor have the same participant set
        (docs/secagg-protocol.md §8): no difference of two sums isolates a silo or a group."""
        assert self.config is not None
        for earlier in self._earlier_records(self.config.model_sha256):
            wanted = earlier.retry_members()
            if wanted is not None and wanted != members:
                missing, extra = sorted(wanted - members), sorted(members - wanted)
                raise _abort(
                    AbortReason.CONSISTENCY_FAILED,
                    f"a retry for a model this silo already sent a masked input for (round "
                    f"{earlier.round_id}) must have the same {len(wanted)} members; missing "
                    f"{missing}, extra {extra}",
                )

    def _apply_blame(self, blame: tuple[bytes, ...], file_hash: bytes, now: dt.datetime) -> None:
        """Exclude every silo that verified evidence proves dishonest (it signed an out-of-range
        weight for one of this model's earlier sessions that held it) from every record of this
        model that holds it: a second cheater in the retry must not leave the first one required
        by the older record. Each changed record is journalled, and the session's own view of
        the log updated so the retry rule of this session reads it. At most one piece per
        roster member is looked at: a coordinator cannot make the offer arbitrarily expensive."""
        records = {r.session_id: r for r in self._earlier_records(file_hash)}
        limit = len(self.trust.roster.entries)
        self.blame_ignored = max(0, len(blame) - limit)
        proven: set[str] = set()
        for evidence in blame[:limit]:
            try:
                verdict = verify_blame(evidence, self.trust, now)
            except InvalidBlame:
                self.blame_ignored += 1
                continue
            rec = records.get(verdict.session_id)
            if rec is None or verdict.silo_id not in _holders(rec):
                self.blame_ignored += 1  # proves nothing about a session of this silo's
                continue
            proven.add(verdict.silo_id)
        for rec in list(records.values()):
            add = (proven & _holders(rec)) - rec.excluded
            if not add:
                continue
            rec = replace(rec, excluded=rec.excluded | add)
            records[rec.session_id] = rec
            self._journal(ExclusionRecorded(rec))
            log = dict(self.policy.submission_log)
            log[rec.model_digest] = tuple(
                rec if r.session_id == rec.session_id else r for r in log.get(rec.model_digest, ())
            )
            self.policy = replace(self.policy, submission_log=log)
        self.blame_excluded = frozenset(proven)

    def _earlier_records(self, file_hash: bytes) -> tuple[SubmissionRecord, ...]:
        """The submission-log records of this session's model: those under its digest, and
        those a log written before tensor digests existed keyed by the model file's SHA-256
        (the same bytes are the same model), so an upgrade does not reset the count."""
        log = self.policy.submission_log
        out = list(log.get(self._model_key, ()))
        if file_hash != self._model_key:
            seen = {r.session_id for r in out}
            out += [r for r in log.get(file_hash, ()) if r.session_id not in seen]
        return tuple(out)

    def _check_sparse_graph(self, cfg: RoundConfig, n: int) -> None:
        """The Harary graph's k and t_k for `n` silos (secagg.graph_params). A neighbourhood of
        k + 1 silos may hold every colluder, so t_k meets the complete graph's floors for
        n = k + 1; t_k = 1 would make each Shamir share the secret itself."""
        problem = sparse_graph_problem(
            n, cfg.graph_k, cfg.graph_t_k, cfg.n_colluders, self.policy.t_floor
        )
        if problem is not None:
            raise _abort(problem.reason, problem.detail)

    def _check_connected(self, members: Sequence[int], which: str) -> None:
        """With a sparse graph, fewer than k silos of U1 may be missing from `members` (U2 or
        U3) counting every colluder: the graph is k-connected, so the honest survivors stay
        one connected part and the coordinator learns only their total (docs/secagg-protocol.md
        §4.6). Checked before the input leaves (3.1) and before U3 is signed (4.1)."""
        cfg = self.config
        assert cfg is not None
        n = len(self.u1)
        if cfg.graph is not GraphKind.HARARY or cfg.graph_k >= n - 1:
            return
        missing = n - len(members)
        if not stays_connected(cfg.graph_k, missing, cfg.n_colluders):
            raise _abort(
                AbortReason.THRESHOLD_VIOLATION,
                f"{missing} silos of U1 missing from {which} and n_colluders "
                f"{cfg.n_colluders} reach sparse graph_k {cfg.graph_k}: the honest survivors' "
                "graph could be cut, and the coordinator learn the sum of a part of them",
            )

    def _overflow_ok(self, cfg: RoundConfig, n: int) -> bool:
        z, n_h = (cfg.dp.noise_multiplier, cfg.dp.noise_divisor) if cfg.dp else (0.0, 1)
        return encoding.overflow_ok(
            n, cfg.scale, cfg.clip_l2, cfg.weight_scale, cfg.ring_bits, z, n_h
        )

    # --- phase 1 -> 2 ------------------------------------------------------------------------

    def _on_key_list(self, msg: Message, now: dt.datetime) -> list[bytes]:
        assert isinstance(msg, KeyList) and self.config is not None
        cfg = self.config
        if msg.config_digest != self.config_digest or msg.round_id != cfg.round_id:
            raise _abort(AbortReason.REPLAY, "KeyList for another round or config")
        ads: list[Advertise] = []
        for raw in msg.entries:
            env = _envelope(raw)
            ad = _parse_payload(env.payload, Advertise)
            try:
                verify_signer(env, ad.silo_id, SIG_ADVERTISE, self.trust, now)
            except DecryptionFailed as exc:
                raise _abort(AbortReason.SIGNATURE_INVALID, "bad Advertise signature") from exc
            if ad.config_digest != self.config_digest or ad.round_id != cfg.round_id:
                raise _abort(AbortReason.REPLAY, "Advertise for another round or config")
            if ad.silo_id not in cfg.invited:
                raise _abort(AbortReason.ROSTER_MISMATCH, "Advertise from an uninvited silo")
            ads.append(ad)
        ids = [a.silo_id for a in ads]
        if ids != sorted(set(ids), key=lambda s: s.encode()):
            raise _abort(AbortReason.SET_INCONSISTENT, "KeyList not sorted or has duplicates")
        if self._m1 not in msg.entries:
            raise _abort(AbortReason.SET_INCONSISTENT, "own Advertise missing or altered")
        keys = [k for a in ads for k in (a.c_pk, a.s_pk)]
        if any(len(k) != 32 for k in keys):
            raise _abort(AbortReason.BAD_KEY, "public key is not 32 bytes")
        if len(set(keys)) != len(keys):
            raise _abort(AbortReason.DUPLICATE_KEYS, "public keys are not pairwise distinct")
        n = len(ads)
        t_min = minimum_threshold(n, cfg.n_colluders, self.policy.t_floor)
        if cfg.threshold < t_min or cfg.threshold > n:
            raise _abort(
                AbortReason.THRESHOLD_VIOLATION, f"t={cfg.threshold} outside [{t_min}, {n}]"
            )
        if cfg.graph is GraphKind.HARARY and cfg.graph_k < n - 1:  # still sparse for |U1|
            self._check_sparse_graph(cfg, n)
        if not self._overflow_ok(cfg, n):
            raise _abort(AbortReason.OVERFLOW_RULE, f"sum of {n} inputs could wrap")
        self._check_retry_members(frozenset(ids))
        self.session_id = session_id(self.config_digest, [(a.silo_id, a.c_pk, a.s_pk) for a in ads])
        self.u1 = {i + 1: _Peer(a.silo_id, a.c_pk, a.s_pk) for i, a in enumerate(ads)}
        self.index = ids.index(self.identity.silo_id) + 1
        harary = cfg.graph_k if cfg.graph is GraphKind.HARARY else None
        self._nbrs = neighbours(n, self.session_id, harary)
        assert self._c_sk is not None and self._s_sk is not None
        me = self.index
        try:
            for v in sorted(self._nbrs[me]):
                peer = self.u1[v]
                shared_c = agree(self._c_sk, peer.c_pk)
                shared_s = agree(self._s_sk, peer.s_pk)
                self._enc_keys[v] = (
                    k_enc(shared_c, self.session_id, me, v),
                    k_enc(shared_c, self.session_id, v, me),
                )
                self._pair_keys[v] = k_pair(shared_s, self.session_id, me, v)
        except BadKey as exc:
            raise _abort(AbortReason.BAD_KEY, "key agreement failed") from exc
        self._b_u = self._random(32)
        recipients = sorted(self._nbrs[me] | {me})
        t_share = self._share_threshold()
        s_shares = shamir.split(raw_private(self._s_sk), t_share, recipients, self._random)
        b_shares = shamir.split(self._b_u, t_share, recipients, self._random)
        self._own_shares = (s_shares[me], b_shares[me])
        cts = []
        for v in sorted(self._nbrs[me]):
            pt = u32(me) + u32(v) + s_shares[v] + b_shares[v]
            aad = self.session_id + u32(me) + u32(v) + b"ShareKeys"
            cts.append((v, seal(self._enc_keys[v][0], pt, aad, self._random)))
        sk = ShareKeys(self.session_id, me, commit_b(self.session_id, me, self._b_u), tuple(cts))
        env = self.identity.seal(SIG_SHAREKEYS, encode_message(sk))
        self.stage = SiloStage.SHARED
        return [encode_message(env)]

    def _share_threshold(self) -> int:
        cfg = self.config
        assert cfg is not None
        if cfg.graph is GraphKind.HARARY and cfg.graph_k < len(self.u1) - 1:
            return cfg.graph_t_k
        return cfg.threshold

    # --- phase 2 -> 3 ------------------------------------------------------------------------

    def _on_shares(self, msg: Message, now: dt.datetime) -> list[bytes]:
        assert isinstance(msg, SharesForYou) and self.config is not None
        self._check_session(msg.session_id)
        me, u2 = self.index, msg.u2
        if list(u2) != sorted(set(u2)) or not set(u2) <= set(self.u1) or me not in u2:
            raise _abort(AbortReason.SET_INCONSISTENT, "U2 is not an ordered subset of U1 with me")
        if len(u2) < self.config.threshold:
            raise _abort(AbortReason.THRESHOLD_VIOLATION, f"|U2|={len(u2)} below t")
        if len(set(u2) & (self._nbrs[me] | {me})) < self._share_threshold():
            raise _abort(AbortReason.THRESHOLD_VIOLATION, "too few neighbours in U2")
        self._check_connected(u2, "U2")
        # A retry's members must also all reach key sharing: with the complete graph every
        # member of U2 is vouched for by a ciphertext only it could have made in THIS session,
        # i.e. after it passed its own membership check (docs/secagg-protocol.md §8).
        self._check_retry_members(frozenset(self.u1[v].silo_id for v in u2))
        expected = sorted(set(u2) & self._nbrs[me])
        if [v for v, _ in msg.cts] != expected:
            raise _abort(AbortReason.SET_INCONSISTENT, "ciphertexts do not match U2 ∩ N(u)")
        for v, ct in msg.cts:
            aad = self.session_id + u32(v) + u32(me) + b"ShareKeys"
            try:
                pt = open_sealed(self._enc_keys[v][1], ct, aad)
            except DecryptionFailed as exc:
                raise _abort(AbortReason.DECRYPT_FAILED, "share ciphertext") from exc
            if len(pt) != 74 or pt[:8] != u32(v) + u32(me):
                raise _abort(AbortReason.DECRYPT_FAILED, "share plaintext")
            s_share, b_share = pt[8:41], pt[41:74]
            try:
                shamir.share_value(s_share)
                shamir.share_value(b_share)
            except ValueError as exc:
                raise _abort(AbortReason.DECRYPT_FAILED, "share out of field") from exc
            self._shares[v] = (s_share, b_share)
        self.u2 = tuple(u2)
        self._mask_set = tuple(expected)
        # The masked vector's memory is claimed and touched now, while the model trains:
        # first-touch page faults of a model-sized array would otherwise hit submit_update.
        self._vector = np.empty(self.config.length, dtype=ring_dtype(self.config.ring_bits))
        self._vector.fill(0)
        self.stage = SiloStage.KEYS_RECEIVED
        return []

    def _add_pairwise(self, acc: np.ndarray) -> None:
        # Elements 1..d only: element 0 (the weight) carries the self-mask alone, so once b is
        # revealed anyone can check the weight this silo signed (secagg.blame).
        me = self.index
        body = acc[1:]
        for v in self._mask_set:
            add_mask(body, self._pair_keys[v], 1 if me < v else -1)

    def _mask(self, cfg: RoundConfig, delta: np.ndarray, num_examples: int) -> MaskedUpload:
        assert self._b_u is not None
        factor_clip = encoding.clip_factor(delta, cfg.clip_l2)
        q_w = encoding.quantised_weight(
            num_examples,
            cfg.weighting is Weighting.EXAMPLES,
            cfg.weight_max,
            cfg.weight_scale,
            self._rng,
        )
        noise = None
        if cfg.dp is not None:
            sigma = (
                cfg.dp.noise_multiplier * cfg.clip_l2 * cfg.scale / math.sqrt(cfg.dp.noise_divisor)
            )
            noise = sample_discrete_gaussian(sigma, cfg.d, self._random(32))
        y = self._vector
        assert y is not None
        factor = cfg.scale * (q_w / cfg.weight_scale) * factor_clip
        encoding.encode_into(y, delta, q_w, factor, self._rng, noise, accumulate=self._precomputed)
        add_mask(y, k_self(self._b_u, self.session_id, self.index), 1)
        if not self._precomputed:
            self._add_pairwise(y)
        self._vector = None  # handed to the driver; the session keeps no copy
        header = MaskedHeader(
            self.session_id,
            self.index,
            cfg.length,
            cfg.ring_bits,
            sha256_array(y),
            int(y[0]),
            cfg.weight_scale,
            cfg.weighting is Weighting.UNIFORM,
        )
        signed_header = self.identity.seal(SIG_MASKED, encode_message(header))
        u2 = frozenset(self.u1[v].silo_id for v in self.u2)
        self._record = SubmissionRecord(self._model_key, cfg.round_id, self.session_id, members=u2)
        self._journal(MaskedInputRecorded(self._record))  # before the vector leaves (3.7)
        self.stage = SiloStage.MASKED_SENT
        return MaskedUpload(encode_message(signed_header), y)

    # --- phase 4 -----------------------------------------------------------------------------

    def _check_session(self, sid: bytes) -> None:
        if sid != self.session_id:
            raise _abort(AbortReason.REPLAY, "message for another session")

    def _on_survivors(self, msg: Message, now: dt.datetime) -> list[bytes]:
        assert isinstance(msg, SurvivorList) and self.config is not None
        cfg = self.config
        self._check_session(msg.session_id)
        u3 = msg.u3
        if tuple(msg.u2) != self.u2:
            raise _abort(AbortReason.SET_INCONSISTENT, "U2 differs from the one in M4")
        if list(u3) != sorted(set(u3)) or not set(u3) <= set(self.u2):
            raise _abort(AbortReason.SET_INCONSISTENT, "U3 is not an ordered subset of U2")
        if self.index not in u3:
            raise _abort(AbortReason.SET_INCONSISTENT, "this silo is not in U3")
        if len(u3) < max(3, cfg.threshold, self.policy.t_floor):
            raise _abort(AbortReason.THRESHOLD_VIOLATION, f"|U3|={len(u3)} below threshold")
        t_share = self._share_threshold()
        for v in self.u2:
            if len(set(u3) & (self._nbrs[v] | {v})) < t_share:
                raise _abort(AbortReason.THRESHOLD_VIOLATION, "a neighbourhood lacks survivors")
        self._check_connected(u3, "U3")
        digest = consistency_digest(
            self.session_id, self.config_digest, cfg.model_sha256, self.u2, u3
        )
        survivors = frozenset(self.u1[v].silo_id for v in u3)
        # Retry rule (differencing guard, signing side). The offer allowed this masked input
        # because fewer than `max_masked_inputs_per_model` were sent for this model digest.
        # Before signing U3 the silo compares it with every earlier record for the same digest:
        # * a record whose U3 is known (that session's M6 reached this silo, so it recorded
        #   the U3 and may have signed it) must have exactly this U3, as a set of silo ids;
        #   any difference aborts with CONSISTENCY_FAILED, so no two sums over different
        #   survivor sets can be formed from inputs on the same model with this silo's help;
        # * a record whose U3 is unknown (the silo never received that session's M6) does not
        #   block: this silo signed nothing and released no share in that session.
        # Silos proven to have sent an out-of-range weight in the earlier session (its
        # `excluded`) are left out of the comparison: their input could never be summed.
        # The U3 is recorded (journalled) before the signature leaves.
        for earlier in self._earlier_records(cfg.model_sha256):
            if earlier.survivors is None:
                continue
            wanted = earlier.survivors - earlier.excluded
            if wanted != survivors:
                raise _abort(
                    AbortReason.CONSISTENCY_FAILED,
                    f"retry for the same model with a different U3 ({len(survivors)} silos) "
                    f"than round {earlier.round_id}'s ({len(wanted)} silos)",
                )
        assert self._record is not None
        self._record = replace(self._record, survivors=survivors)
        self._journal(SurvivorsRecorded(self._record))
        self.u3 = tuple(u3)
        self.digest_signed = digest
        payload = encode_message(Consistency(self.session_id, self.index, digest))
        self.stage = SiloStage.SIGNED
        return [encode_message(self.identity.seal(SIG_CONSISTENCY, payload))]

    # --- phase 5 -----------------------------------------------------------------------------

    def _on_consistency_set(self, msg: Message, now: dt.datetime) -> list[bytes]:
        assert isinstance(msg, ConsistencySet) and self.config is not None
        self._check_session(msg.session_id)
        signers: set[int] = set()
        for raw in msg.sigs:
            # t signatures on this silo's D are the whole argument (two views of U3 cannot both
            # gather t > (n + n_C)/2); the rest prove nothing more and would each cost a
            # signature check: about 95 instead of 67 at n = 100 (docs/secagg-protocol.md 5.1).
            if len(signers) >= self.config.threshold:
                break
            env = _envelope(raw)
            c = _parse_payload(env.payload, Consistency)
            if c.index not in self.u3 or c.index in signers:
                raise _abort(AbortReason.CONSISTENCY_FAILED, "signer outside U3 or repeated")
            try:
                verify_signer(env, self.u1[c.index].silo_id, SIG_CONSISTENCY, self.trust, now)
            except DecryptionFailed as exc:
                raise _abort(AbortReason.SIGNATURE_INVALID, "bad Consistency signature") from exc
            if c.session_id != self.session_id or c.digest != self.digest_signed:
                raise _abort(AbortReason.CONSISTENCY_FAILED, "a silo signed a different D")
            signers.add(c.index)
        if len(signers) < self.config.threshold:
            raise _abort(AbortReason.THRESHOLD_VIOLATION, f"only {len(signers)} consistency sigs")
        me, u3 = self.index, set(self.u3)
        own = {me: self._own_shares}
        held = {**self._shares, **own}
        b_list = tuple((v, held[v][1]) for v in sorted(u3 & (self._nbrs[me] | {me})))
        s_list = tuple((v, held[v][0]) for v in sorted((set(self.u2) - u3) & self._nbrs[me]))
        if {v for v, _ in b_list} & {v for v, _ in s_list}:
            raise _abort(AbortReason.INTERNAL, "a silo in both share lists")  # cannot happen
        out = encode_message(UnmaskShares(self.session_id, me, b_list, s_list))
        self.stage = SiloStage.UNMASKED
        self._erase()
        return [out]

    def _on_result(self, msg: Message, now: dt.datetime) -> list[bytes]:
        assert isinstance(msg, RoundResult) and self.config is not None
        self._check_session(msg.session_id)
        self.result = msg
        self.stage = SiloStage.COMPLETED
        self._erase()
        return []


_P = TypeVar("_P", Advertise, Consistency)


def _holders(rec: SubmissionRecord) -> frozenset[str]:
    """The silos a record's session held: its members (U2) and its survivors (U3)."""
    return (rec.members or frozenset()) | (rec.survivors or frozenset())


def _parse_payload(payload: bytes, cls: type[_P]) -> _P:
    try:
        return decode_as(payload, cls)
    except MalformedMessage as exc:
        raise _abort(AbortReason.SIGNATURE_INVALID, "signed payload does not decode") from exc


def _envelope(raw: bytes) -> SignedEnvelope:
    try:
        return decode_as(raw, SignedEnvelope)
    except MalformedMessage as exc:
        raise _abort(AbortReason.SIGNATURE_INVALID, "envelope does not decode") from exc


_Handler = Callable[[SiloSession, Message, dt.datetime], list[bytes]]
_TABLE: dict[tuple[SiloStage, type], _Handler] = {
    (SiloStage.ADVERTISED, KeyList): SiloSession._on_key_list,
    (SiloStage.SHARED, SharesForYou): SiloSession._on_shares,
    (SiloStage.MASKED_SENT, SurvivorList): SiloSession._on_survivors,
    (SiloStage.SIGNED, ConsistencySet): SiloSession._on_consistency_set,
    (SiloStage.UNMASKED, RoundResult): SiloSession._on_result,
    (SiloStage.SIGNED, RoundResult): SiloSession._on_result,
    (SiloStage.MASKED_SENT, RoundResult): SiloSession._on_result,
    (SiloStage.KEYS_RECEIVED, RoundResult): SiloSession._on_result,
    (SiloStage.SHARED, RoundResult): SiloSession._on_result,
}

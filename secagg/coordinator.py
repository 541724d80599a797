"""The coordinator's side of one secure-aggregation round (docs/secagg-protocol.md §5) as a state
machine.

Rule: the coordinator relays and sums, it never trusts a silo: each message is accepted only
from the authenticated peer it names, only in its phase, and only if every check of §5 holds;
anything else is ignored and recorded in `rejected` (a misbehaving silo cannot abort the round
for the others). Two tables at the end of the module are the state machine: `_ACCEPTS` names the
handler of each (phase, message class) the round takes, and `_CLOSES` how each phase closes and
which phase comes next; the phase moves nowhere else but to DONE (`finish`) and ABORTED
(`_abort`). A phase closes when every expected silo has answered or the driver reports
its deadline (`deadline_passed`); a participant set below the threshold aborts the round (the
codes of docs/secagg-protocol.md §6). Masked vectors are added into ONE accumulator as they
arrive, so memory is O(L) for any n. Element 0 (the weight) carries the self-mask only, so
once the self-mask seeds are reconstructed each survivor's weight is known: a survivor whose
weight is out of range aborts the round with OVERFLOW_RULE and `blamed` holds the evidence
against it (secagg.blame), built from its own signed header and ShareKeys.

The unmask (reconstructing the seeds, removing the masks, decoding) is the round's one heavy
step, so no message handler runs it: once UNMASK holds enough shares the round says so
(`unmask_ready`) and waits, phase still UNMASK, until the driver calls `finish` from its own
thread. `finish` either ends the round (DONE or ABORTED) or, when a wrong share defeats the
reconstruction while U4 silos have yet to answer, goes back to waiting for their shares (the
leave-one-out retry of step 5.6): `unmask_ready` turns True again on the next answer. While
ready, the unmask deadline closes nothing: the shares are in; `finish` decides.

Driver use::

    rnd = CoordinatorRound(config, trust, now=now)
    sends = rnd.handle(peer_silo_id, message_bytes, now=now)   # -> [(silo_id, bytes)]
    sends = rnd.add_masked_vector(peer_silo_id, header_bytes, vector)
    sends = rnd.deadline_passed(now)                           # close the current phase
    if rnd.unmask_ready: sends = rnd.finish()                  # the unmask (driver's thread)
    rnd.result  -> RoundOutcome once phase is DONE;  rnd.announce(new_model_sha256) -> M10s
    rnd.blamed  -> {silo id: encoded Blame} after an OVERFLOW_RULE abort caused by those silos
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from secagg import encoding, shamir
from secagg import messages as msgs
from secagg.blame import decoded_weight, make_blame, weight_in_range
from secagg.config import GraphKind, RoundConfig, Weighting
from secagg.dp import DpReport, ddg_report
from secagg.errors import AbortReason, BadKey, DecryptionFailed, MalformedMessage
from secagg.graph import neighbours
from secagg.identity import SiloId
from secagg.primitives import (
    add_mask,
    agree,
    commit_b,
    k_pair,
    k_self,
    raw_public,
    ring_dtype,
    sha256_array,
    x25519_from_raw,
)
from secagg.transcript import consistency_digest, session_id
from secagg.trust import Trust, verify_signer

Send = tuple[SiloId, bytes]
MAX_RECONSTRUCTION_TRIES = 32  # the first t-subset, then leave-one-out ones, then others (5.6)


class Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """The aggregate ḡ (length d; float32 for b = 32, float64 for b = 64, decoded in place in
    the accumulator's memory), weight sum W, survivors U3, and the signed ring sum z (a copy,
    only when the round was built with keep_ring_sum=True)."""

    aggregate: np.ndarray
    weight_sum: int
    survivors: tuple[SiloId, ...]
    ring_sum: np.ndarray | None
    dp_report: DpReport | None


@dataclass(frozen=True, slots=True)
class Rejection:
    silo_id: str
    phase: Phase
    why: str


@dataclass(slots=True)
class _Silo:
    silo_id: SiloId
    envelope: bytes
    c_pk: bytes
    s_pk: bytes
    commit_b: bytes = b""
    cts: dict[int, bytes] = field(default_factory=dict)
    consistency: bytes = b""
    # The raw signed ShareKeys and MaskedHeader envelopes: the evidence if this silo is blamed.
    share_keys_envelope: bytes = b""
    header_envelope: bytes = b""
    weight_element: int = 0


class CoordinatorRound:
    """One round, from collecting M1 to the decoded aggregate. Not thread-safe."""

    def __init__(
        self,
        config: RoundConfig,
        trust: Trust,
        *,
        now: dt.datetime,
        dp_rounds_before: int = 0,
        dp_delta: float = 1e-6,
        keep_ring_sum: bool = False,
    ) -> None:
        self.config = config
        self.config_bytes = config.encode()
        self.config_digest = config.digest()
        self.trust = trust
        self.started = now
        self.phase = Phase.ADVERTISE
        self.abort_reason: AbortReason | None = None
        self.rejected: list[Rejection] = []
        self.inconsistent_share_senders: set[SiloId] = set()
        self.session_id = b""
        self.participants: dict[str, tuple[SiloId, ...]] = {}
        self.dropouts: dict[SiloId, Phase] = {}
        self.result: RoundOutcome | None = None
        # silo id -> encoded Blame: the survivors whose weight was out of range (secagg.blame)
        self.blamed: dict[SiloId, bytes] = {}
        self._dp_rounds_before, self._dp_delta = dp_rounds_before, dp_delta
        self._keep_ring_sum = keep_ring_sum
        self._adverts: dict[SiloId, _Silo] = {}
        self._excluded: set[SiloId] = set()
        self._silos: dict[int, _Silo] = {}
        self._index: dict[SiloId, int] = {}
        self._nbrs: dict[int, frozenset[int]] = {}
        self._u2: tuple[int, ...] = ()
        self._u3: list[int] = []
        self._u4: list[int] = []
        self._digest = b""
        self._acc: np.ndarray | None = None
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._s_shares: dict[int, dict[int, bytes]] = {}
        self._unmask_from: set[int] = set()
        self._ready = False  # UNMASK holds enough shares: `finish` unmasks
        self._lost: set[SiloId] = set()  # will not answer again this round (gone or aborted)

    # --- public API --------------------------------------------------------------------------

    def offer(self) -> list[Send]:
        """M0 payload for every invited silo: the config bytes (the driver adds the model)."""
        return [(SiloId(s), self.config_bytes) for s in self.config.invited]

    def handle(self, silo_id: str, data: bytes, *, now: dt.datetime) -> list[Send]:
        """One message from the authenticated peer `silo_id`; returns what to send to whom."""
        sid = SiloId(silo_id)
        if self.phase in (Phase.DONE, Phase.ABORTED):
            return self._reject(sid, "round is over")
        try:
            msg = msgs.decode_message(data)
        except MalformedMessage as exc:
            return self._reject(sid, f"undecodable: {exc}")
        handler = _ACCEPTS.get((self.phase, type(msg)))
        if handler is None:
            return self._reject(sid, f"{type(msg).__name__} not expected in {self.phase.value}")
        try:
            return handler(self)(sid, msg, data, now)
        except (MalformedMessage, DecryptionFailed) as exc:
            return self._reject(sid, f"invalid message: {exc}")

    def add_masked_vector(
        self, silo_id: str, header: bytes, vector: np.ndarray, *, vector_sha256: bytes | None = None
    ) -> list[Send]:
        """A complete masked upload (step 3.8): checked, then added into the accumulator.

        `header`: the encoded SignedEnvelope(MaskedHeader) the silo signed; it must describe
        this session and exactly this vector, element 0 included.
        `vector_sha256`: the driver already hashed exactly these bytes as they arrived (the
        transport checks each blob's SHA-256), so they need not be hashed a second time."""
        sid = SiloId(silo_id)
        cfg = self.config
        if self.phase is not Phase.MASKED:
            return self._reject(sid, "masked vector outside the masked phase")
        idx = self._index.get(sid)
        if idx is None or idx not in self._u2 or idx in self._u3:
            return self._reject(sid, "not in U2 or already uploaded")
        try:
            env = msgs.decode_as(header, msgs.SignedEnvelope)
            verify_signer(env, sid, msgs.SIG_MASKED, self.trust, self.started)
            h = msgs.decode_as(env.payload, msgs.MaskedHeader)
        except (MalformedMessage, DecryptionFailed) as exc:
            return self._reject(sid, f"bad masked header (unsigned or undecodable): {exc}")
        if (h.session_id, h.index, h.length, h.ring_bits, h.weight_scale, h.uniform) != (
            self.session_id,
            idx,
            cfg.length,
            cfg.ring_bits,
            cfg.weight_scale,
            cfg.weighting is Weighting.UNIFORM,
        ):
            return self._reject(sid, "masked header fields do not match the session")
        if vector.dtype != ring_dtype(cfg.ring_bits) or vector.shape != (cfg.length,):
            return self._reject(sid, "masked vector has the wrong dtype or length")
        if int(vector[0]) != h.weight_element:
            return self._reject(sid, "element 0 differs from the signed header's weight element")
        digest = sha256_array(vector) if vector_sha256 is None else vector_sha256
        if digest != h.vector_sha256:
            return self._reject(sid, "masked vector hash mismatch")
        assert self._acc is not None
        np.add(self._acc, vector, out=self._acc)
        silo = self._silos[idx]
        silo.header_envelope, silo.weight_element = header, h.weight_element
        self._u3.append(idx)
        return self._close_if_all_answered()

    @property
    def unmask_ready(self) -> bool:
        """UNMASK holds enough shares to unmask: the driver should call `finish`."""
        return self._ready and self.phase is Phase.UNMASK

    def finish(self) -> list[Send]:
        """The unmask, called by the driver (off the message handlers) once `unmask_ready`:
        reconstruct the seeds, remove the masks, decode. The round ends DONE or ABORTED, or,
        when a wrong share defeats a reconstruction while silos of U4 have yet to answer, it
        stays in UNMASK waiting for their shares (not ready until the next one arrives).
        A no-op returning [] when the round is not ready."""
        if not self.unmask_ready:
            return []
        self._ready = False
        return self._finish()

    def deadline_passed(self, now: dt.datetime) -> list[Send]:
        """The driver's deadline for the current phase passed: close it with who answered."""
        if self.unmask_ready:
            return []  # the shares are in: `finish` decides, not the clock
        step = _CLOSES.get(self.phase)
        if step is None:
            return []  # DONE or ABORTED: nothing left to close
        sends = step.close(self)()
        if self.phase is not Phase.ABORTED:
            self.phase = step.next
        return sends

    def silo_lost(self, silo_id: str) -> list[Send]:
        """The driver knows `silo_id` will not answer again (its stream broke): it drops out
        in the first phase it does not answer, and the phase closes now if everyone else has
        answered.

        A silo that already answered the current phase (its stream broke while others were
        still answering) is recorded when the next phase closes without it, so the round log
        never says a silo dropped in a phase whose message it delivered."""
        sid = SiloId(silo_id)
        if self.phase in (Phase.DONE, Phase.ABORTED) or sid in self._lost:
            return []
        owes_this_phase = sid in self.waiting_for()
        self._lost.add(sid)
        if owes_this_phase:
            self.dropouts.setdefault(sid, self.phase)
        return self._close_if_all_answered()

    def announce(self, new_model_sha256: bytes) -> list[Send]:
        """M10 for every silo in U1, once the driver has built the new model."""
        if self.result is None:
            raise RuntimeError("no result to announce")
        dp = self.result.dp_report.encode() if self.result.dp_report else b""
        msg = msgs.encode_message(
            msgs.RoundResult(
                self.session_id,
                self.config.round_id,
                tuple(sorted(self._u3)),
                self.result.weight_sum,
                new_model_sha256,
                dp,
            )
        )
        return [(s.silo_id, msg) for _, s in sorted(self._silos.items())]

    # --- helpers -----------------------------------------------------------------------------

    def _reject(self, sid: SiloId, why: str) -> list[Send]:
        self.rejected.append(Rejection(sid, self.phase, why))
        return []

    def _drop(self, sid: SiloId, why: str) -> list[Send]:
        self.rejected.append(Rejection(sid, self.phase, why))
        return self.silo_lost(sid)

    def _on_abort_notice(
        self, sid: SiloId, msg: msgs.Message, raw: bytes, now: dt.datetime
    ) -> list[Send]:
        assert isinstance(msg, msgs.AbortNotice)
        return self._drop(sid, f"silo aborted: {msg.reason.name}")

    def waiting_for(self) -> set[SiloId]:
        """Silos the current phase still waits for (the lost ones are not waited for)."""
        if self.phase is Phase.ADVERTISE:
            answered = set(self._adverts) | self._excluded
            pending = {SiloId(s) for s in self.config.invited} - answered
        elif self.phase is Phase.SHARE_KEYS:
            pending = {s.silo_id for s in self._silos.values() if not s.commit_b}
        elif self.phase is Phase.MASKED:
            pending = {self._silos[i].silo_id for i in set(self._u2) - set(self._u3)}
        elif self.phase is Phase.CONSISTENCY:
            pending = {self._silos[i].silo_id for i in set(self._u3) - set(self._u4)}
        elif self.phase is Phase.UNMASK:
            pending = {self._silos[i].silo_id for i in set(self._u4) - self._unmask_from}
        else:
            pending = set()
        return pending - self._lost

    def _close_if_all_answered(self) -> list[Send]:
        if self.waiting_for() or self.unmask_ready:
            return []
        if self.phase is Phase.UNMASK:
            # Every silo of U4 that can answer has; had they sent enough shares, the round
            # would be ready to unmask (or, after a failed try, `finish` would have aborted).
            return self._abort(AbortReason.THRESHOLD_VIOLATION, self._silos)
        return self.deadline_passed(self.started)  # closes the phase with who answered

    def _abort(self, reason: AbortReason, to: Mapping[int, _Silo]) -> list[Send]:
        self.phase = Phase.ABORTED
        self.abort_reason = reason
        self._acc = None
        self._b_shares.clear()
        self._s_shares.clear()
        notice = msgs.encode_message(msgs.AbortNotice(self.session_id, reason))
        return [(s.silo_id, notice) for _, s in sorted(to.items())]

    def _threshold_ok(self, count: int) -> bool:
        return count >= max(3, self.config.threshold)

    def _share_threshold(self) -> int:
        cfg = self.config
        if cfg.graph is GraphKind.HARARY and cfg.graph_k < len(self._silos) - 1:
            return cfg.graph_t_k
        return cfg.threshold

    # --- phase 1 -----------------------------------------------------------------------------

    def _on_advertise(
        self, sid: SiloId, env: msgs.Message, raw: bytes, now: dt.datetime
    ) -> list[Send]:
        assert isinstance(env, msgs.SignedEnvelope)
        ad = msgs.decode_as(env.payload, msgs.Advertise)
        verify_signer(env, sid, msgs.SIG_ADVERTISE, self.trust, now)
        if ad.silo_id != sid or sid not in self.config.invited:
            return self._reject(sid, "Advertise names another or an uninvited silo")
        if ad.config_digest != self.config_digest or ad.round_id != self.config.round_id:
            return self._reject(sid, "Advertise for another round or config")
        if len(ad.c_pk) != 32 or len(ad.s_pk) != 32:
            return self._reject(sid, "public keys must be 32 bytes")
        prev = self._adverts.get(sid)
        if prev is not None:
            if prev.envelope != raw:
                self._excluded.add(sid)
                return self._reject(sid, "two different Advertise messages")
            return []
        self._adverts[sid] = _Silo(sid, raw, ad.c_pk, ad.s_pk)
        return self._close_if_all_answered()

    def _close_advertise(self) -> list[Send]:
        ads = {s: a for s, a in self._adverts.items() if s not in self._excluded}
        seen: dict[bytes, list[SiloId]] = {}
        for s, a in ads.items():
            for k in {a.c_pk, a.s_pk}:
                seen.setdefault(k, []).append(s)
            if a.c_pk == a.s_pk:
                self._excluded.add(s)
        for holders in seen.values():
            if len(holders) > 1:
                self._excluded.update(holders)
        ids = sorted((s for s in ads if s not in self._excluded), key=lambda s: s.encode())
        for invited in self.config.invited:
            if invited not in ids:
                self.dropouts.setdefault(SiloId(invited), Phase.ADVERTISE)
        self._silos = {i + 1: ads[s] for i, s in enumerate(ids)}
        self._index = {s: i + 1 for i, s in enumerate(ids)}
        self.participants["U1"] = tuple(ids)
        if len(ids) < max(3, self.config.threshold):
            return self._abort(AbortReason.THRESHOLD_VIOLATION, self._silos)
        self.session_id = session_id(
            self.config_digest, [(a.silo_id, a.c_pk, a.s_pk) for a in self._silos.values()]
        )
        harary = self.config.graph_k if self.config.graph is GraphKind.HARARY else None
        self._nbrs = neighbours(len(ids), self.session_id, harary)
        msg = msgs.encode_message(
            msgs.KeyList(
                self.config_digest,
                self.config.round_id,
                tuple(self._silos[i].envelope for i in sorted(self._silos)),
            )
        )
        return [(s.silo_id, msg) for _, s in sorted(self._silos.items())]

    # --- phase 2 -----------------------------------------------------------------------------

    def _on_share_keys(
        self, sid: SiloId, env: msgs.Message, raw: bytes, now: dt.datetime
    ) -> list[Send]:
        assert isinstance(env, msgs.SignedEnvelope)
        idx = self._index.get(sid)
        if idx is None:
            return self._reject(sid, "not in U1")
        verify_signer(env, sid, msgs.SIG_SHAREKEYS, self.trust, now)
        sk = msgs.decode_as(env.payload, msgs.ShareKeys)
        silo = self._silos[idx]
        if sk.index != idx or sk.session_id != self.session_id or silo.commit_b:
            return self._reject(sid, "ShareKeys index/session wrong or repeated")
        if [v for v, _ in sk.cts] != sorted(self._nbrs[idx]):
            return self._reject(sid, "ciphertexts do not address exactly N(u)")
        silo.commit_b = sk.commit_b
        silo.cts = dict(sk.cts)
        silo.share_keys_envelope = raw
        return self._close_if_all_answered()

    def _close_share_keys(self) -> list[Send]:
        u2 = tuple(i for i, s in sorted(self._silos.items()) if s.commit_b)
        self._mark_dropped(set(self._silos) - set(u2))
        self._u2 = u2
        self.participants["U2"] = tuple(self._silos[i].silo_id for i in u2)
        if len(u2) < self.config.threshold:
            return self._abort(AbortReason.THRESHOLD_VIOLATION, self._silos)
        self._acc = np.zeros(self.config.length, dtype=ring_dtype(self.config.ring_bits))
        out = []
        for u in u2:
            cts = tuple((v, self._silos[v].cts[u]) for v in u2 if v in self._nbrs[u])
            out.append(
                (
                    self._silos[u].silo_id,
                    msgs.encode_message(msgs.SharesForYou(self.session_id, u2, cts)),
                )
            )
        return out

    def _mark_dropped(self, indices: set[int]) -> None:
        for i in indices:
            self.dropouts.setdefault(self._silos[i].silo_id, self.phase)

    # --- phase 3/4 ---------------------------------------------------------------------------

    def _close_masked(self) -> list[Send]:
        u3 = sorted(self._u3)
        self._u3 = u3
        self._mark_dropped(set(self._u2) - set(u3))
        self.participants["U3"] = tuple(self._silos[i].silo_id for i in u3)
        if not self._threshold_ok(len(u3)):
            return self._abort(AbortReason.THRESHOLD_VIOLATION, {i: self._silos[i] for i in u3})
        self._digest = consistency_digest(
            self.session_id, self.config_digest, self.config.model_sha256, self._u2, u3
        )
        msg = msgs.encode_message(msgs.SurvivorList(self.session_id, self._u2, tuple(u3)))
        return [(self._silos[i].silo_id, msg) for i in u3]

    def _on_consistency(
        self, sid: SiloId, env: msgs.Message, raw: bytes, now: dt.datetime
    ) -> list[Send]:
        assert isinstance(env, msgs.SignedEnvelope)
        idx = self._index.get(sid)
        if idx is None or idx not in self._u3 or self._silos[idx].consistency:
            return self._reject(sid, "not in U3 or repeated")
        verify_signer(env, sid, msgs.SIG_CONSISTENCY, self.trust, now)
        c = msgs.decode_as(env.payload, msgs.Consistency)
        if (c.session_id, c.index, c.digest) != (self.session_id, idx, self._digest):
            return self._reject(sid, "consistency digest or index mismatch")
        self._silos[idx].consistency = raw
        self._u4.append(idx)
        return self._close_if_all_answered()

    def _close_consistency(self) -> list[Send]:
        u4 = sorted(self._u4)
        # A silo of U3 lost before the phase began (after its upload, while others still
        # uploaded) owed this phase its answer: it drops here (`silo_lost`).
        self._mark_dropped(set(self._u3) - set(u4))
        self.participants["U4"] = tuple(self._silos[i].silo_id for i in u4)
        if len(u4) < self.config.threshold:
            return self._abort(AbortReason.THRESHOLD_VIOLATION, {i: self._silos[i] for i in u4})
        msg = msgs.encode_message(
            msgs.ConsistencySet(self.session_id, tuple(self._silos[i].consistency for i in u4))
        )
        return [(self._silos[i].silo_id, msg) for i in u4]

    # --- phase 5 -----------------------------------------------------------------------------

    def _close_unmask(self) -> list[Send]:
        # The deadline passed before enough shares arrived (every U4 silo answering without
        # enough shares is THRESHOLD_VIOLATION, in `_close_if_all_answered`).
        return self._abort(AbortReason.TIMEOUT, self._silos)

    def _on_unmask(self, sid: SiloId, m: msgs.Message, raw: bytes, now: dt.datetime) -> list[Send]:
        assert isinstance(m, msgs.UnmaskShares)
        idx = self._index.get(sid)
        if idx is None or idx not in self._u4 or idx in self._unmask_from:
            return self._reject(sid, "not in U4 or repeated")
        if m.session_id != self.session_id or m.index != idx:
            return self._reject(sid, "UnmaskShares for another session or index")
        b_ids, s_ids = [v for v, _ in m.b_shares], [v for v, _ in m.s_shares]
        u3 = set(self._u3)
        dropped = set(self._u2) - u3
        near = self._nbrs[idx] | {idx}
        if set(b_ids) & set(s_ids):
            return self._reject(sid, "a silo listed in both share lists")
        if (
            len(set(b_ids)) != len(b_ids)
            or len(set(s_ids)) != len(s_ids)
            or not set(b_ids) <= (u3 & near)
            or not set(s_ids) <= (dropped & self._nbrs[idx])
        ):
            return self._reject(sid, "shares for silos outside the neighbourhood or wrong set")
        self._unmask_from.add(idx)
        self.participants["U5"] = tuple(self._silos[i].silo_id for i in sorted(self._unmask_from))
        for v, share in m.b_shares:
            self._b_shares.setdefault(v, {})[idx] = share
        for v, share in m.s_shares:
            self._s_shares.setdefault(v, {})[idx] = share
        t = self._share_threshold()
        enough = all(len(self._b_shares.get(v, {})) >= t for v in u3) and all(
            len(self._s_shares.get(v, {})) >= t for v in dropped
        )
        if enough:
            self._ready = True  # the driver unmasks (`finish`); later shares are kept for it
            return []
        return self._close_if_all_answered()

    def _reconstruct(self, shares: dict[int, bytes], check: object, v: int) -> bytes | None:
        t = self._share_threshold()
        for subset in itertools.islice(_subsets(sorted(shares), t), MAX_RECONSTRUCTION_TRIES):
            try:
                secret = shamir.reconstruct({x: shares[x] for x in subset})
            except ValueError:
                continue
            if check == "b" and commit_b(self.session_id, v, secret) == self._silos[v].commit_b:
                return secret
            if check == "s":
                key = x25519_from_raw(secret)
                if raw_public(key) == self._silos[v].s_pk:
                    return secret
        return None

    def _finish(self) -> list[Send]:
        cfg = self.config
        acc = self._acc
        assert acc is not None
        u3 = self._u3
        dropped = sorted(set(self._u2) - set(u3))
        b_secrets: dict[int, bytes] = {}
        s_secrets: dict[int, bytes] = {}
        for v in u3:
            got = self._reconstruct(self._b_shares[v], "b", v)
            if got is None:
                return self._fail_reconstruction(v)
            b_secrets[v] = got
        # Each survivor's weight, from element 0 (self-masked only): the evidence against any
        # silo whose weight no honest silo could have sent.
        self.blamed = self._blame(b_secrets)
        if self.blamed:
            return self._abort(AbortReason.OVERFLOW_RULE, self._silos)
        for v in dropped:
            got = self._reconstruct(self._s_shares[v], "s", v)
            if got is None:
                return self._fail_reconstruction(v)
            s_secrets[v] = got
        for v in u3:
            add_mask(acc, k_self(b_secrets[v], self.session_id, v), -1)
        body = acc[1:]  # the pairwise masks cover elements 1..d (a contiguous view)
        try:
            for v in dropped:
                sk = x25519_from_raw(s_secrets[v])
                for u in sorted(set(u3) & self._nbrs[v]):
                    key = k_pair(agree(sk, self._silos[u].s_pk), self.session_id, u, v)
                    add_mask(body, key, -1 if u < v else 1)  # remove sgn(u,v)·PRG
        except BadKey:
            return self._abort(AbortReason.BAD_KEY, self._silos)
        signed = encoding.to_signed(acc)
        ring_sum = signed.copy() if self._keep_ring_sum else None
        w = int(signed[0])
        if not 1 <= w <= len(u3) * cfg.weight_scale or (
            cfg.weighting is Weighting.UNIFORM and w != len(u3) * cfg.weight_scale
        ):
            return self._abort(AbortReason.OVERFLOW_RULE, self._silos)
        g, _ = encoding.decode(acc, cfg.scale, cfg.weight_scale)
        report = None
        if cfg.dp is not None:
            report = ddg_report(
                cfg.dp.noise_multiplier,
                cfg.dp.noise_divisor,
                len(u3),
                cfg.n_colluders,
                cfg.d,
                cfg.scale,
                cfg.clip_l2,
                self._dp_rounds_before + 1,
                self._dp_delta,
            )
        self.result = RoundOutcome(
            g, w, tuple(self._silos[i].silo_id for i in u3), ring_sum, report
        )
        self._acc = None
        self._b_shares.clear()
        self._s_shares.clear()
        self.phase = Phase.DONE
        return []

    def _blame(self, b_secrets: Mapping[int, bytes]) -> dict[SiloId, bytes]:
        """silo id -> encoded Blame for every survivor whose weight is out of range."""
        cfg = self.config
        uniform = cfg.weighting is Weighting.UNIFORM
        out: dict[SiloId, bytes] = {}
        for v, b in sorted(b_secrets.items()):
            s = self._silos[v]
            q = decoded_weight(s.weight_element, b, self.session_id, v, cfg.ring_bits)
            if not weight_in_range(q, cfg.weight_scale, uniform):
                out[s.silo_id] = make_blame(s.silo_id, s.header_envelope, s.share_keys_envelope, b)
        return out

    def _fail_reconstruction(self, v: int) -> list[Send]:
        if self.waiting_for():
            # Silos of U4 have not answered yet: their shares may make another t-subset that
            # reconstructs (one wrong share among the first t must not end the round while a
            # (t+1)-th share is on its way). Each answer makes the round ready again (`finish`).
            return []
        shares = {**self._b_shares.get(v, {}), **self._s_shares.get(v, {})}
        self.inconsistent_share_senders.update(self._silos[i].silo_id for i in shares)
        return self._abort(AbortReason.CONSISTENCY_FAILED, self._silos)


def _subsets(ids: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """t-subsets of `ids` to try, in an order that finds ONE wrong share fast: the first t,
    then each of the first t + 1 with one left out, then the rest (step 5.6)."""
    head = ids[: t + 1]
    seen: set[tuple[int, ...]] = set()
    # Lazily: the first subset almost always works, and building the t + 1 others up front
    # cost O(t^2) per reconstruction (n = 100 silos: a tenth of a second per round).
    firsts = itertools.chain(
        (tuple(ids[:t]),), (tuple(x for x in head if x != left) for left in reversed(head))
    )
    for subset in itertools.chain(firsts, itertools.combinations(ids, t)):
        if len(subset) == t and subset not in seen:
            seen.add(subset)
            yield subset


# --- the transition table ----------------------------------------------------------------------

# Table values pick the method off the round (`lambda r: r._on_advertise`), not off the class:
# a subclass's override (a test adversary's, say) is the one called.
_Handler = Callable[[SiloId, msgs.Message, bytes, dt.datetime], list[Send]]

# (phase, message class) -> the handler that takes it; `handle` rejects anything not listed
# here ("X not expected in <phase>"). A handler never moves the phase itself: it records the
# answer and closes the phase through `_CLOSES` once nobody else is awaited (or, in UNMASK,
# makes the round ready for the driver's `finish`). Masked vectors arrive through
# `add_masked_vector`, not here.
_LIVE = (Phase.ADVERTISE, Phase.SHARE_KEYS, Phase.MASKED, Phase.CONSISTENCY, Phase.UNMASK)
_ACCEPTS: dict[tuple[Phase, type], Callable[[CoordinatorRound], _Handler]] = {
    (Phase.ADVERTISE, msgs.SignedEnvelope): lambda r: r._on_advertise,
    (Phase.SHARE_KEYS, msgs.SignedEnvelope): lambda r: r._on_share_keys,
    (Phase.CONSISTENCY, msgs.SignedEnvelope): lambda r: r._on_consistency,
    (Phase.UNMASK, msgs.UnmaskShares): lambda r: r._on_unmask,
    # a silo that gives up drops out in whichever phase the round is in
    **{(phase, msgs.AbortNotice): lambda r: r._on_abort_notice for phase in _LIVE},
}


@dataclass(frozen=True, slots=True)
class _Close:
    """How a phase closes (all answered, or its deadline passed): `close` builds what to send
    and may abort; unless it did, the round moves to `next`."""

    close: Callable[[CoordinatorRound], Callable[[], list[Send]]]
    next: Phase


_CLOSES: dict[Phase, _Close] = {
    Phase.ADVERTISE: _Close(lambda r: r._close_advertise, Phase.SHARE_KEYS),
    Phase.SHARE_KEYS: _Close(lambda r: r._close_share_keys, Phase.MASKED),
    Phase.MASKED: _Close(lambda r: r._close_masked, Phase.CONSISTENCY),
    Phase.CONSISTENCY: _Close(lambda r: r._close_consistency, Phase.UNMASK),
    Phase.UNMASK: _Close(lambda r: r._close_unmask, Phase.ABORTED),
}

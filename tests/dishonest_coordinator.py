"""A dishonest coordinator for end-to-end tests: real transport, real silo processes, chosen lies.

Rule: the silos under test are unmodified `python -m silo_agent run` processes of a dev
federation; everything adversarial happens here, on the coordinator's side of the wire. The
harness is a gRPC server holding the REAL coordinator certificate (mTLS, the silos pin the CA),
implementing the `Federation` service of protos/federation.proto by hand: one outbound queue per
connected silo, and an inbox of what each silo sent (masked vectors reassembled from their
chunks). On top of it `Harness.run(plan)` drives one secure round with secagg's honest
`CoordinatorRound` and the plan's lies around it (per-silo configurations, offer fields or
models, ignored uploads, a chosen U3, an alive/dead split of the survivor views, silos run inside
the harness that hand their shares over), then does what a dishonest coordinator would: unmask
the sum, and try to unmask the victim's own input from every share it received. It reports what
it recovered, or which reason codes the silos refused with.

The test task `TASK` (spec "tests.dishonest_coordinator:TASK") records each silo's TRUE update
per round (flat float32 in layout order, `<record_dir>/round-<r>.npy`) and a line per training
step (`progress-<r>.txt`), so a test compares what the harness recovered with the truth.
Every wait here is bounded in time; nothing here starts or stops processes (the tests do, by PID,
through tests.federation_helpers).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from safetensors.torch import save as st_save

from coordinator.rounds.secure_config import (
    SecAggSettings,
    WeightingMode,
    build_round_config,
    layout_of,
    quantisation_bound,
)
from coordinator.transport.server import SERVER_OPTIONS
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos.names import STATUS, abort_code_in, abort_name
from secagg import encoding, primitives, shamir
from secagg.chunking import BlobMeta, ChunkError, Reassembler, describe, split
from secagg.config import GraphKind, RoundConfig, TensorSpec
from secagg.coordinator import CoordinatorRound, Phase, Send
from secagg.errors import MalformedMessage, ProtocolAbort
from secagg.graph import neighbours
from secagg.identity import Roster, SiloId, load_pem_certificate, silo_id_for, uri_san
from secagg.messages import (
    MAGIC,
    AbortNotice,
    Advertise,
    Consistency,
    ConsistencySet,
    KeyList,
    Kind,
    ShareKeys,
    SharesForYou,
    SignedEnvelope,
    SurvivorList,
    UnmaskShares,
    decode_as,
    decode_message,
    encode_message,
)
from secagg.silo import SiloPolicy, SiloSession, SiloStage
from secagg.transcript import consistency_digest, session_id
from secagg.trust import SiloIdentity, Trust
from tests.federation_helpers import Federation, Proc, processes, provision, write_silo_config

# ---- the test task ----------------------------------------------------------------------------

IN_FEATURES, OUT_FEATURES = 16, 8
NUM_EXAMPLES = 10


class AdversaryTestTask:
    """A linear model whose update is `lr · (direction + 0.5·noise)`: the direction is fixed by
    the silo (`silo_index`), the noise comes from `params["seed"]` (0 when absent), so a
    learning rate of 1e-12 makes a silo's contribution vanish and the same seed retrains the
    same update bit for bit. `epochs` steps, each recorded, each calling `params["progress"]`
    and then sleeping `step_sleep_s`. Options: `silo_index`, `record_dir`."""

    name = "dishonest-coordinator-test"

    def build_model(self) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(3)
        model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silofed import TrainResult

        index = int(data["silo_index"])
        lr, epochs = float(params.get("lr", 0.1)), int(params.get("epochs", 1))
        sleep_s, round_id = float(params.get("step_sleep_s", 0.0)), int(params.get("round", 0))
        seed = int(params.get("seed", 0))
        names = list(model.state_dict())
        direction_gen = torch.Generator().manual_seed(100 + index)
        direction = {
            n: torch.randn(model.get_parameter(n).shape, generator=direction_gen) * 0.1
            for n in names
        }
        noise_gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
        before = {n: t.detach().clone() for n, t in model.state_dict().items()}
        record = Path(data["record_dir"])
        record.mkdir(parents=True, exist_ok=True)
        progress = params.get("progress")
        for step in range(epochs):
            with torch.no_grad():
                for n in names:
                    noise = torch.randn(direction[n].shape, generator=noise_gen) * 0.05
                    model.get_parameter(n).add_((direction[n] + noise) * (lr / epochs))
            with (record / f"progress-{round_id}.txt").open("a") as fh:
                fh.write(f"{step + 1} {epochs} {time.time():.6f}\n")
            if callable(progress):
                progress(step + 1, epochs)  # raises once the round is over (fixed silos)
            if sleep_s:
                time.sleep(sleep_s)
        after = model.state_dict()
        # Exactly what the silo masks: (trained - received) in float64, as float32.
        delta = np.concatenate(
            [(after[n].double() - before[n].double()).reshape(-1).numpy() for n in names]
        ).astype(np.float32)
        np.save(record / f"round-{round_id}.npy", delta)
        return TrainResult(NUM_EXAMPLES, {"loss": float(np.abs(delta).sum())})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {"score": float(data["silo_index"])}


TASK = AdversaryTestTask()
SPEC = "tests.dishonest_coordinator:TASK"
LAYOUT: tuple[TensorSpec, ...] = layout_of(TASK.build_model().state_dict())
D = sum(s.size for s in LAYOUT)


def model_bytes(version: int, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """The global model of one round: the task's model moved by `version` (so each round has a
    model of its own); with `metadata`, the SAME tensors serialised with that safetensors
    metadata (other bytes, other SHA-256)."""
    state = TASK.build_model().state_dict()
    tensors = {k: (v + version * 1e-3).contiguous() for k, v in sorted(state.items())}
    data: bytes = st_save(tensors, metadata=dict(metadata) if metadata else None)
    return data


def true_update(record_dir: Path, round_id: int) -> np.ndarray:
    """The update a silo's task recorded for `round_id` (raises FileNotFoundError if none)."""
    return np.asarray(np.load(record_dir / f"round-{round_id}.npy"), dtype=np.float32)


def progress_times(record_dir: Path, round_id: int) -> list[float]:
    """When each training step of `round_id` ended (time.time()), in order."""
    path = record_dir / f"progress-{round_id}.txt"
    if not path.exists():
        return []
    return [float(line.split()[2]) for line in path.read_text().splitlines() if line.strip()]


def vm_rss_bytes(pid: int) -> int:
    """Resident set size of process `pid`, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- what a silo sent ---------------------------------------------------------------------------


class HarnessError(AssertionError):
    """The harness cannot stage this attack (e.g. the code it needs does not exist yet)."""


def secagg_abort_reason(payload: bytes) -> str | None:
    """The reason name of a secagg AbortNotice payload; None for any other payload. A code this
    tree's `AbortReason` lacks reads as CODE_<n>."""
    try:
        msg = decode_message(payload)
    except MalformedMessage:
        # MAGIC ‖ u8(ABORT) ‖ blob(session_id) ‖ u8(reason): the reason is the last byte.
        if payload[:3] == MAGIC and len(payload) > 4 and payload[3] == Kind.ABORT:
            return f"CODE_{payload[-1]}"
        return None
    return msg.reason.name if isinstance(msg, AbortNotice) else None


@dataclass(frozen=True)
class Received:
    """One message a silo sent: `kind` is the SiloMessage oneof name, or "blob" for a blob
    reassembled from its header and chunks (`message` is then the header, `blob` the bytes)."""

    kind: str
    message: pb.SiloMessage
    blob: bytes = b""
    at: float = 0.0

    @property
    def round_id(self) -> int | None:
        m = self.message
        if self.kind == "blob":
            return int(m.blob_header.round_id)
        if self.kind == "secagg":
            return int(m.secagg.round_id)
        if self.kind == "abort":
            return int(m.abort.round_id)
        if self.kind == "train_report":
            return int(m.train_report.round_id)
        return None

    def refusal(self) -> str | None:
        """The reason code's name when this is an abort: a secagg AbortNotice frame or a proto
        one (UNSPECIFIED from a silo that set no code)."""
        if self.kind == "abort":
            return abort_name(self.message.abort.code)
        if self.kind == "secagg":
            return secagg_abort_reason(self.message.secagg.payload)
        return None

    def secagg_message(self) -> object | None:
        if self.kind != "secagg":
            return None
        try:
            return decode_message(self.message.secagg.payload)
        except MalformedMessage:
            return None


ADVERTISED = "ADVERTISED"


def answer_to_offer(item: Received) -> str | None:
    """A silo's answer to an offer: its refusal reason, ADVERTISED for its signed key
    advertisement (M1), or None for anything else (a train report, a heartbeat...)."""
    reason = item.refusal()
    if reason is not None:
        return reason
    if isinstance(item.secagg_message(), SignedEnvelope):
        return ADVERTISED
    return None


# ---- the server ---------------------------------------------------------------------------------

MAX_UPLOAD_BYTES = 256 * 1024 * 1024
IDLE_POLL_S = 0.5


class HarnessServer(pb_grpc.FederationServicer):
    """The `Federation` service under the test's control, over mTLS with the coordinator's
    certificate. Silos are identified by the URI SAN of their client certificate."""

    def __init__(self, federation_id: str) -> None:
        self.federation_id = federation_id
        self.port = 0
        self._cond = threading.Condition()
        self._out: dict[str, queue.Queue[pb.CoordinatorMessage | None]] = {}
        self._inbox: dict[str, list[Received]] = {}
        self._blobs: dict[str, tuple[pb.SiloMessage, Reassembler]] = {}
        self._subscribers: list[queue.Queue[tuple[str, Received]]] = []
        self._stopping = threading.Event()
        self._server: Any = None

    @classmethod
    def start(cls, fed: Federation) -> HarnessServer:
        """Serve on 127.0.0.1 (a free port, chosen once: `port`)."""
        self = cls(fed.federation_id)
        credentials = grpc.ssl_server_credentials(
            [(fed.coordinator_key.read_bytes(), fed.coordinator_cert.read_bytes())],
            root_certificates=fed.ca_cert.read_bytes(),
            require_client_auth=True,
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=24), options=SERVER_OPTIONS)
        pb_grpc.add_FederationServicer_to_server(self, server)
        self.port = server.add_secure_port("127.0.0.1:0", credentials)
        if self.port == 0:
            raise RuntimeError("the harness could not bind 127.0.0.1")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            for q in self._out.values():
                q.put(None)
        if self._server is not None:
            self._server.stop(1.0).wait(3.0)

    # ---- the service ---------------------------------------------------------------------------

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: Any
    ) -> Iterator[pb.CoordinatorMessage]:
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        certs = context.auth_context().get("x509_pem_cert") or [None]
        silo_id = uri_san(load_pem_certificate(certs[0])) if certs[0] else None
        if first.WhichOneof("kind") != "hello" or silo_id is None or first.hello.silo_id != silo_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello must name the certificate's id")
            return
        out: queue.Queue[pb.CoordinatorMessage | None] = queue.Queue()
        with self._cond:
            old = self._out.get(silo_id)
            if old is not None:
                old.put(None)  # a reconnect replaces the old stream
            self._out[silo_id] = out
            self._inbox.setdefault(silo_id, [])
            self._cond.notify_all()
        threading.Thread(
            target=self._read, args=(silo_id, request_iterator, out), daemon=True
        ).start()
        welcome = pb.Welcome(federation_id=self.federation_id, silo_id=silo_id)
        try:
            yield pb.CoordinatorMessage(welcome=welcome)
            while not self._stopping.is_set() and context.is_active():
                try:
                    item = out.get(timeout=IDLE_POLL_S)
                except queue.Empty:
                    continue
                if item is None:
                    return
                yield item
                out.task_done()  # gRPC took it
        finally:
            with self._cond:
                if self._out.get(silo_id) is out:
                    del self._out[silo_id]
                self._cond.notify_all()

    def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.StatusRequest, context: Any
    ) -> pb.StatusReply:
        return pb.StatusReply(federation_id=self.federation_id)

    def _read(
        self,
        silo_id: str,
        messages: Iterator[pb.SiloMessage],
        out: queue.Queue[pb.CoordinatorMessage | None],
    ) -> None:
        try:
            for message in messages:
                self._receive(silo_id, message)
        except grpc.RpcError:
            pass
        finally:
            out.put(None)

    def _receive(self, silo_id: str, message: pb.SiloMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind in ("hello", None):
            return
        if kind == "blob_header":
            h = message.blob_header
            try:
                meta = BlobMeta(h.total_bytes, h.sha256, h.chunk_count)
                self._blobs[silo_id] = (
                    message,
                    Reassembler(meta, max_total_bytes=MAX_UPLOAD_BYTES),
                )
            except ChunkError:
                self._blobs.pop(silo_id, None)
            return
        if kind == "blob_chunk":
            entry = self._blobs.get(silo_id)
            if entry is None:
                return
            header, parts = entry
            try:
                parts.add(message.blob_chunk.index, message.blob_chunk.data)
                if not parts.complete:
                    return
                data = parts.finish()
            except ChunkError:
                self._blobs.pop(silo_id, None)
                return
            self._blobs.pop(silo_id, None)
            self._deliver(silo_id, Received("blob", header, data, time.time()))
            return
        self._deliver(silo_id, Received(kind, message, b"", time.time()))

    def _deliver(self, silo_id: str, item: Received) -> None:
        with self._cond:
            self._inbox.setdefault(silo_id, []).append(item)
            for sub in self._subscribers:
                sub.put((silo_id, item))
            self._cond.notify_all()

    # ---- the test's side -----------------------------------------------------------------------

    def connected(self) -> set[str]:
        with self._cond:
            return set(self._out)

    def wait_connected(self, silo_ids: Collection[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not set(silo_ids) <= set(self._out):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(silo_ids) - set(self._out))
                    raise AssertionError(f"silos not connected after {timeout_s} s: {missing}")
                self._cond.wait(min(left, 0.5))

    def send(self, silo_id: str, message: pb.CoordinatorMessage) -> None:
        with self._cond:
            out = self._out.get(silo_id)
        if out is None:
            raise HarnessError(f"{silo_id} is not connected to the harness")
        out.put(message)

    def offer(self, silo_id: str, offer: pb.RoundOffer, model: bytes) -> None:
        """RoundOffer, then the model as a GLOBAL_MODEL BlobHeader and chunks of <= 1 MiB."""
        self.send(silo_id, pb.CoordinatorMessage(round_offer=offer))
        meta = describe(model)
        header = pb.BlobHeader(
            round_id=offer.round_id,
            kind=pb.GLOBAL_MODEL,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            chunk_count=meta.chunk_count,
        )
        self.send(silo_id, pb.CoordinatorMessage(blob_header=header))
        for index, data in enumerate(split(model)):
            chunk = pb.BlobChunk(
                round_id=offer.round_id, kind=pb.GLOBAL_MODEL, index=index, data=data
            )
            self.send(silo_id, pb.CoordinatorMessage(blob_chunk=chunk))

    def send_frame(self, silo_id: str, round_id: int, payload: bytes) -> None:
        frame = pb.SecAggFrame(round_id=round_id, payload=payload)
        self.send(silo_id, pb.CoordinatorMessage(secagg=frame))

    def abort(
        self, silo_id: str, round_id: int, code: pb.AbortReason.ValueType, detail: str = ""
    ) -> None:
        notice = pb.AbortNotice(round_id=round_id, code=code, detail=detail)
        self.send(silo_id, pb.CoordinatorMessage(abort=notice))

    def round_result(
        self,
        silo_id: str,
        round_id: int,
        status: str,  # "completed" | "aborted", as the coordinator's round log names them
        *,
        survivors: Sequence[str] = (),
        reason: str = "",  # the sentence
        code: pb.AbortReason.ValueType = pb.ABORT_REASON_UNSPECIFIED,
        new_model_sha256: bytes = b"",
    ) -> None:
        result = pb.RoundResult(
            round_id=round_id,
            status=STATUS[status],
            survivors=list(survivors),
            abort_reason=reason,
            abort_code=code,
            new_model_sha256=new_model_sha256,
        )
        self.send(silo_id, pb.CoordinatorMessage(round_result=result))

    def flush(self, silo_id: str, timeout_s: float) -> bool:
        """Wait until gRPC has taken everything queued for `silo_id` (bounded)."""
        with self._cond:
            out = self._out.get(silo_id)
        deadline = time.monotonic() + timeout_s
        while out is not None and out.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return out is None or not out.unfinished_tasks

    def inbox(self, silo_id: str) -> list[Received]:
        with self._cond:
            return list(self._inbox.get(silo_id, ()))

    def mark(self, silo_id: str) -> int:
        """A position in `silo_id`'s inbox: `wait_for(..., since=mark)` sees only what follows."""
        with self._cond:
            return len(self._inbox.get(silo_id, ()))

    def wait_for(
        self,
        silo_id: str,
        predicate: Callable[[Received], bool],
        timeout_s: float,
        *,
        since: int = 0,
    ) -> Received | None:
        """The first message from `silo_id` (at or after `since`) matching `predicate`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self._inbox.get(silo_id, [])[since:]:
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def subscribe(self) -> queue.Queue[tuple[str, Received]]:
        """Every message from any silo from now on, in arrival order."""
        sub: queue.Queue[tuple[str, Received]] = queue.Queue()
        with self._cond:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: queue.Queue[tuple[str, Received]]) -> None:
        with self._cond:
            if sub in self._subscribers:
                self._subscribers.remove(sub)


# ---- round configuration -----------------------------------------------------------------------

SETTINGS = SecAggSettings(clip_l2=10.0, weighting=WeightingMode.UNIFORM)
# The silos' own watchdogs abort after twice these: short, so a stalled lie does not linger.
DEADLINES_S = (10, 10, 30, 10, 10)
HONEST_TRAIN: Mapping[str, Any] = {"epochs": 2, "lr": 0.1}


def canonical_json(params: Mapping[str, Any]) -> bytes:
    """The one byte form signed training parameters take (sorted keys, no spaces, ASCII)."""
    return json.dumps(
        dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def signs_train_params() -> bool:
    """True when RoundConfig carries the training parameters (field `train_params`)."""
    return "train_params" in {f.name for f in dataclasses.fields(RoundConfig)}


def with_signed_train_params(cfg: RoundConfig, params: Mapping[str, Any] | bytes) -> RoundConfig:
    """`cfg` with `params` (a mapping, or raw bytes: possibly hostile) inside the signed config."""
    if not signs_train_params():
        raise HarnessError(
            "RoundConfig has no `train_params` field: the silo-side fix that signs the training "
            "parameters has not landed, so this attack cannot be staged through the config"
        )
    raw = params if isinstance(params, bytes) else canonical_json(params)
    return dataclasses.replace(cfg, train_params=raw)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _offer_json(params: Mapping[str, Any] | str) -> str:
    """RoundOffer.train_params_json: `params` as JSON, or as given when it is a string."""
    return params if isinstance(params, str) else json.dumps(dict(params), sort_keys=True)


# ---- silos the harness runs itself ---------------------------------------------------------------


def _permissive_policy() -> SiloPolicy:
    """What a silo the adversary controls accepts: anything the protocol lets through."""
    names = {f.name for f in dataclasses.fields(SiloPolicy)}
    extra: dict[str, Any] = {"n_colluders_min": 0} if "n_colluders_min" in names else {}
    return SiloPolicy(last_round_id=0, **extra)


@dataclass
class _HarnessSilo:
    """A silo of the roster run inside the harness with its real certificate and an in-memory
    `SiloSession`: honest (it follows the protocol; its shares stay its own) or colluding (its
    shares, its own and those it holds of others, are handed to the adversary)."""

    silo_id: str
    identity: SiloIdentity
    colluding: bool
    session: SiloSession | None = None
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (s_share, b_share)
    own: tuple[bytes, bytes] = (b"", b"")

    def offer(self, trust: Trust, config: bytes, model_sha256: bytes) -> bytes:
        policy = _permissive_policy() if self.colluding else SiloPolicy(last_round_id=0)
        self.session = SiloSession(
            self.identity,
            trust,
            policy,
            random_bytes=os.urandom,
            rng=np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "big"))),
        )
        return self.session.handle_offer(config, model_sha256, now=_now())

    def handle(self, payload: bytes) -> tuple[list[bytes], tuple[bytes, np.ndarray] | None]:
        """Replies, and the masked upload (header, vector) once the shares (M4) are in."""
        s = self.session
        assert s is not None
        replies = s.handle(payload, now=_now())
        upload = None
        if s.stage is SiloStage.KEYS_RECEIVED:
            if self.colluding:  # what this silo holds of everyone, before it could be erased
                self.held = dict(s._shares)  # the colluder reveals its secrets
                self.own = s._own_shares
            masked = s.submit_update(np.zeros(D, dtype=np.float32), NUM_EXAMPLES)
            upload = (masked.header, masked.vector)
        return replies, upload


# ---- one round -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """U1 as the KeyList fixed it: indices, keys, neighbours and the Shamir threshold."""

    session_id: bytes
    index: Mapping[str, int]
    silo_of: Mapping[int, str]
    s_pk: Mapping[int, bytes]
    neighbours: Mapping[int, frozenset[int]]
    share_threshold: int

    def neighbours_of(self, silo_id: str) -> set[str]:
        return {self.silo_of[v] for v in self.neighbours[self.index[silo_id]]}


@dataclass(frozen=True)
class Split:
    """Alive/dead split of the survivor views: the silos in `alive` (the plan's victim among
    them) are shown a U3 with the victim, those in `dead` one without it; the plan's colluders
    are in both and sign both digests."""

    alive: frozenset[str]
    dead: frozenset[str]


@dataclass(frozen=True)
class Plan:
    """One secure round as the adversary runs it (silo ids throughout). Defaults are honest."""

    config: RoundConfig  # what the harness's CoordinatorRound runs (and every silo is shown)
    model: bytes
    offer_params: Mapping[str, Any] | str  # RoundOffer.train_params_json (unsigned), or raw
    configs: Mapping[str, RoundConfig] = field(default_factory=dict)  # per-silo configs instead
    offer_params_for: Mapping[str, Mapping[str, Any] | str] = field(default_factory=dict)
    models: Mapping[str, bytes] = field(default_factory=dict)  # per-silo model bytes
    not_offered: frozenset[str] = frozenset()  # invited, but never offered: dropped at once
    ignore_masked: Callable[[Topology], Collection[str]] | None = None  # "dropped" at upload
    split: Split | None = None
    colluders: frozenset[str] = frozenset()  # in-harness silos that hand over their shares
    victim: str | None = None  # try to unmask this silo's own input from what was received
    timeout_s: float = 30.0
    phase_timeout_s: float = 12.0


@dataclass
class Outcome:
    """What the round gave the adversary."""

    round_id: int
    config: RoundConfig
    completed: bool = False
    abort_reason: str | None = None  # the harness's CoordinatorRound's, when it aborted
    survivors: tuple[str, ...] = ()
    aggregate: np.ndarray | None = None  # ḡ (uniform weighting: the survivors' mean)
    refusals: dict[str, list[str]] = field(default_factory=dict)  # silo -> reasons it sent
    recovered: np.ndarray | None = None  # the victim's own input, unmasked by the adversary
    topology: Topology | None = None

    def sum(self) -> np.ndarray:
        """Σ of the survivors' updates (ḡ · |U3| under uniform weighting)."""
        if self.aggregate is None:
            raise AssertionError(f"round {self.round_id} produced no sum ({self.abort_reason})")
        return self.aggregate.astype(np.float64) * len(self.survivors)

    def reasons(self, silo_ids: Collection[str] | None = None) -> set[str]:
        return {
            r for s, rs in self.refusals.items() if silo_ids is None or s in silo_ids for r in rs
        }


class _AnyConfigRound(CoordinatorRound):
    """A CoordinatorRound that takes key advertisements made for ANY configuration: the
    adversary showed different silos different configs and carries on as if they agreed."""

    def _on_advertise(
        self, sid: SiloId, env: SignedEnvelope, raw: bytes, now: dt.datetime
    ) -> list[Send]:
        ad = decode_as(env.payload, Advertise)
        own = self.config_digest
        self.config_digest = ad.config_digest
        try:
            return super()._on_advertise(sid, env, raw, now)
        finally:
            self.config_digest = own


def _reconstruct(pool: Mapping[int, bytes], t: int, valid: Callable[[bytes], bool]) -> bytes | None:
    """A secret from `t` of the shares in `pool` that passes `valid`, or None."""
    if t < 1 or len(pool) < t:
        return None
    for subset in itertools.islice(itertools.combinations(sorted(pool), t), 64):
        try:
            secret = shamir.reconstruct({x: pool[x] for x in subset})
        except ValueError:
            continue
        if valid(secret):
            return secret
    return None


class _Run:
    """The adversary's state for one round; `execute` returns the Outcome."""

    def __init__(self, harness: Harness, plan: Plan) -> None:
        self.h, self.plan = harness, plan
        self.cfg = plan.config
        self.round_id = self.cfg.round_id
        cls = _AnyConfigRound if plan.configs else CoordinatorRound
        self.rnd = cls(self.cfg, harness.trust, now=_now())
        self.out = Outcome(self.round_id, self.cfg)
        self.offered_real: list[str] = []
        self.harness_silos = {
            s: harness.in_harness(s, colluding=s in plan.colluders)
            for s in self.cfg.invited
            if s in harness.in_harness_ids
        }
        self.masked: dict[str, np.ndarray] = {}
        self.u2_told: dict[str, tuple[int, ...]] = {}
        self.commits: dict[int, bytes] = {}
        self.b_pool: dict[int, dict[int, bytes]] = {}
        self.s_pool: dict[int, dict[int, bytes]] = {}
        self.survivor_lists: list[bytes] = []
        self.ignored: set[str] | None = None
        self.lost: set[str] = set()
        self.sub = harness.server.subscribe()

    # ---- driving ---------------------------------------------------------------------------

    def execute(self) -> Outcome:
        try:
            self._offer_all()
            self._loop()
            if self.plan.split is not None and self.rnd.phase is Phase.CONSISTENCY:
                self._split(self.plan.split)
        finally:
            self.h.server.unsubscribe(self.sub)
            self._finish()
        return self.out

    def _offer_all(self) -> None:
        plan, cfg = self.plan, self.cfg
        for sid in cfg.invited:
            cfg_for = plan.configs.get(sid, cfg)
            model = plan.models.get(sid, plan.model)
            if sid in plan.not_offered:
                self._lose(sid)
            elif sid in self.harness_silos:
                hs = self.harness_silos[sid]
                try:
                    m1 = hs.offer(self.h.trust, cfg_for.encode(), hashlib.sha256(model).digest())
                except ProtocolAbort as exc:
                    self._refused(sid, exc.reason.name)
                    self._lose(sid)
                    continue
                self._to_round(sid, m1)
            else:
                params = plan.offer_params_for.get(sid, plan.offer_params)
                offer = pb.RoundOffer(
                    round_id=self.round_id,
                    aggregation=pb.AGGREGATION_SECAGG,
                    config=cfg_for.encode(),
                    model_sha256=hashlib.sha256(model).digest(),
                    model_bytes=len(model),
                    train_params_json=_offer_json(params),
                )
                self.h.server.offer(sid, offer, model)
                self.offered_real.append(sid)

    def _loop(self) -> None:
        rnd, plan = self.rnd, self.plan
        deadline = time.monotonic() + plan.timeout_s
        phase, phase_started = rnd.phase, time.monotonic()
        while rnd.phase not in (Phase.DONE, Phase.ABORTED) and time.monotonic() < deadline:
            if plan.split is not None and rnd.phase is Phase.CONSISTENCY:
                return  # the split takes over from the survivor lists
            if rnd.phase is not phase:
                phase, phase_started = rnd.phase, time.monotonic()
            if rnd.unmask_ready:  # the shares are in: unmask, as the coordinator's driver does
                self._dispatch(rnd.finish())
                continue
            silenced = self.lost | ((self.ignored or set()) if rnd.phase is Phase.MASKED else set())
            overdue = time.monotonic() - phase_started > plan.phase_timeout_s
            if not (rnd.waiting_for() - silenced) or overdue:
                self._dispatch(rnd.deadline_passed(_now()))
                continue
            try:
                silo, item = self.sub.get(timeout=0.1)
            except queue.Empty:
                continue
            self._on_received(silo, item)

    def _on_received(self, silo: str, item: Received) -> None:
        if item.round_id != self.round_id or silo not in self.cfg.invited:
            return
        if item.kind == "abort":
            self._refused(silo, abort_name(item.message.abort.code))
            self._lose(silo)
        elif item.kind == "secagg":
            payload = item.message.secagg.payload
            reason = secagg_abort_reason(payload)
            if reason is not None:
                self._refused(silo, reason)
            self._to_round(silo, payload)
        elif item.kind == "blob" and item.message.blob_header.kind == pb.MASKED_VECTOR:
            vector = np.frombuffer(item.blob, dtype=primitives.ring_dtype(self.cfg.ring_bits))
            header = bytes(item.message.blob_header.protocol_header)  # secagg's signed M5 header
            self._masked(silo, header, vector.copy())

    def _masked(self, silo: str, header: bytes, vector: np.ndarray) -> None:
        self.masked[silo] = vector
        self._compute_ignored()
        if self.ignored is not None and silo in self.ignored:
            return  # the adversary declares it dropped; it still keeps the vector
        self._dispatch(self.rnd.add_masked_vector(silo, header, vector))

    def _to_round(self, silo: str, payload: bytes) -> None:
        self._record_from_silo(payload)
        self._dispatch(self.rnd.handle(silo, payload, now=_now()))

    def _lose(self, silo: str) -> None:
        self.lost.add(silo)
        self._dispatch(self.rnd.silo_lost(silo))

    def _refused(self, silo: str, reason: str) -> None:
        self.out.refusals.setdefault(silo, []).append(reason)

    def _dispatch(self, sends: list[Send]) -> None:
        work: deque[tuple[str, bytes]] = deque(sends)
        while work:
            sid, payload = work.popleft()
            msg = decode_message(payload)
            if isinstance(msg, KeyList):
                self._on_key_list(msg)
                cfg_for = self.plan.configs.get(sid)
                if cfg_for is not None:  # each silo sees the KeyList of the config it was shown
                    payload = encode_message(
                        dataclasses.replace(msg, config_digest=cfg_for.digest())
                    )
            elif isinstance(msg, SharesForYou):
                self.u2_told[sid] = msg.u2
                self._compute_ignored()
            elif isinstance(msg, SurvivorList) and self.plan.split is not None:
                self.survivor_lists.append(payload)
                continue  # withheld: the split sends its own views
            hs = self.harness_silos.get(sid)
            if hs is None:
                self.h.server.send_frame(sid, self.round_id, payload)
                continue
            try:
                replies, upload = hs.handle(payload)
            except ProtocolAbort as exc:
                self._refused(sid, exc.reason.name)
                assert hs.session is not None
                replies, upload = (
                    ([hs.session.abort_notice] if hs.session.abort_notice else []),
                    None,
                )
            for reply in replies:
                self._record_from_silo(reply)
                work.extend(self.rnd.handle(sid, reply, now=_now()))
            if upload is not None:
                header, vector = upload
                self.masked[sid] = vector
                if self.ignored is None or sid not in self.ignored:
                    work.extend(self.rnd.add_masked_vector(sid, header, vector))

    def _record_from_silo(self, payload: bytes) -> None:
        """Keep what the adversary needs later: commitments to b and every unmasking share."""
        try:
            msg = decode_message(payload)
            if isinstance(msg, SignedEnvelope):
                inner = decode_message(msg.payload)
                if isinstance(inner, ShareKeys):
                    self.commits[inner.index] = inner.commit_b
            elif isinstance(msg, UnmaskShares):
                for v, share in msg.b_shares:
                    self.b_pool.setdefault(v, {})[msg.index] = share
                for v, share in msg.s_shares:
                    self.s_pool.setdefault(v, {})[msg.index] = share
        except MalformedMessage:
            pass

    def _on_key_list(self, msg: KeyList) -> None:
        if self.out.topology is not None:
            return
        ads = [decode_as(decode_as(e, SignedEnvelope).payload, Advertise) for e in msg.entries]
        sid = session_id(msg.config_digest, [(a.silo_id, a.c_pk, a.s_pk) for a in ads])
        n, cfg = len(ads), self.cfg
        harary = cfg.graph_k if cfg.graph is GraphKind.HARARY else None
        sparse = cfg.graph is GraphKind.HARARY and cfg.graph_k < n - 1
        self.out.topology = Topology(
            session_id=sid,
            index={a.silo_id: i + 1 for i, a in enumerate(ads)},
            silo_of={i + 1: a.silo_id for i, a in enumerate(ads)},
            s_pk={i + 1: a.s_pk for i, a in enumerate(ads)},
            neighbours=neighbours(n, sid, harary),
            share_threshold=cfg.graph_t_k if sparse else cfg.threshold,
        )

    def _compute_ignored(self) -> None:
        if self.ignored is None and self.out.topology is not None:
            chosen = self.plan.ignore_masked
            self.ignored = set(chosen(self.out.topology)) if chosen is not None else set()

    # ---- the alive/dead split ----------------------------------------------------------------

    def _split(self, split_: Split) -> None:
        topo = self.out.topology
        assert topo is not None and self.survivor_lists
        first = decode_as(self.survivor_lists[0], SurvivorList)
        sess, u2 = first.session_id, first.u2
        colluders = [s for s in self.plan.colluders if s in topo.index]
        views = {
            camp: tuple(sorted(topo.index[s] for s in (*members, *colluders)))
            for camp, members in (("alive", split_.alive), ("dead", split_.dead))
        }
        members = {"alive": sorted(split_.alive), "dead": sorted(split_.dead)}
        cfg_digest = self.cfg.digest()
        sigs: dict[str, list[bytes]] = {}
        for camp, u3 in views.items():
            digest = consistency_digest(sess, cfg_digest, self.cfg.model_sha256, u2, u3)
            sigs[camp] = [
                encode_message(
                    self.harness_silos[c].identity.seal(
                        b"consistency", encode_message(Consistency(sess, topo.index[c], digest))
                    )
                )
                for c in colluders
            ]
            for s in members[camp]:
                self.h.server.send_frame(
                    s, self.round_id, encode_message(SurvivorList(sess, u2, u3))
                )
        signed = self._collect(
            [s for camp in members.values() for s in camp], SignedEnvelope, timeout_s=10.0
        )
        for camp in views:
            camp_sigs = sigs[camp] + [signed[s] for s in members[camp] if s in signed]
            for s in members[camp]:
                if s in signed:
                    msg = encode_message(ConsistencySet(sess, tuple(camp_sigs)))
                    self.h.server.send_frame(s, self.round_id, msg)
        self._collect(sorted(signed), UnmaskShares, timeout_s=10.0)

    def _collect(self, silos: Sequence[str], kind: type, timeout_s: float) -> dict[str, bytes]:
        """The first message of `kind` from each of `silos` (refusals end a silo's wait)."""
        got: dict[str, bytes] = {}
        done: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while set(silos) - done and time.monotonic() < deadline:
            try:
                silo, item = self.sub.get(timeout=0.1)
            except queue.Empty:
                continue
            if silo not in silos or item.round_id != self.round_id:
                continue
            reason = item.refusal()
            if reason is not None:
                self._refused(silo, reason)
                done.add(silo)
                continue
            if item.kind == "secagg" and isinstance(item.secagg_message(), kind):
                payload = item.message.secagg.payload
                self._record_from_silo(payload)
                got[silo] = payload
                done.add(silo)
        return got

    # ---- the end ----------------------------------------------------------------------------

    def _finish(self) -> None:
        rnd, out = self.rnd, self.out
        out.completed = rnd.phase is Phase.DONE and rnd.result is not None
        if out.completed:
            assert rnd.result is not None
            out.aggregate = np.array(rnd.result.aggregate, dtype=np.float32)
            out.survivors = tuple(rnd.result.survivors)
            new_sha = hashlib.sha256(b"harness model %d" % self.round_id).digest()
            self._dispatch(rnd.announce(new_sha))
            for sid in self.offered_real:
                self.h.server.round_result(
                    sid,
                    self.round_id,
                    "completed",
                    survivors=out.survivors,
                    new_model_sha256=new_sha,
                )
        else:
            reason = rnd.abort_reason.name if rnd.abort_reason is not None else "HARNESS_ENDED"
            code = abort_code_in(reason)  # the secagg code's, as the coordinator sends it
            out.abort_reason = (
                reason if rnd.phase is Phase.ABORTED else f"stopped in {rnd.phase.value}"
            )
            for sid in self.offered_real:
                self.h.server.round_result(sid, self.round_id, "aborted", reason=reason, code=code)
        if self.plan.victim is not None:
            out.recovered = self._unmask_victim(self.plan.victim)

    def _unmask_victim(self, victim: str) -> np.ndarray | None:
        """The victim's own input from its masked vector and every share the adversary holds
        (released in UnmaskShares, or held by colluders), or None when they do not suffice."""
        topo, cfg = self.out.topology, self.cfg
        y = self.masked.get(victim)
        if topo is None or y is None or victim not in topo.index or victim not in self.u2_told:
            return None
        b_pool = {v: dict(p) for v, p in self.b_pool.items()}
        s_pool = {v: dict(p) for v, p in self.s_pool.items()}
        for hs in self.harness_silos.values():
            if not hs.colluding or hs.silo_id not in topo.index:
                continue
            me = topo.index[hs.silo_id]
            for v, (s_share, b_share) in {**hs.held, me: hs.own}.items():
                if s_share:
                    s_pool.setdefault(v, {})[me] = s_share
                    b_pool.setdefault(v, {})[me] = b_share
        sess, t, v = topo.session_id, topo.share_threshold, topo.index[victim]

        def s_key(u: int) -> X25519PrivateKey | None:
            secret = _reconstruct(
                s_pool.get(u, {}),
                t,
                lambda s: (
                    primitives.raw_public(X25519PrivateKey.from_private_bytes(s)) == topo.s_pk[u]
                ),
            )
            return None if secret is None else X25519PrivateKey.from_private_bytes(secret)

        b_v = _reconstruct(
            b_pool.get(v, {}), t, lambda s: primitives.commit_b(sess, v, s) == self.commits.get(v)
        )
        if b_v is None:
            return None
        x = y.copy()
        primitives.add_mask(x, primitives.k_self(b_v, sess, v), -1)
        sk_v = s_key(v)
        for u in sorted(set(self.u2_told[victim]) & topo.neighbours[v]):
            if sk_v is not None:
                shared = primitives.agree(sk_v, topo.s_pk[u])
            else:
                sk_u = s_key(u)
                if sk_u is None:
                    return None
                shared = primitives.agree(sk_u, topo.s_pk[v])
            primitives.add_mask(x, primitives.k_pair(shared, sess, v, u), -1 if v < u else 1)
        signed = encoding.to_signed(x)
        q_w = int(signed[0])
        if q_w < 1:
            return None
        factor = cfg.weight_scale / (cfg.scale * q_w)
        return (signed[1:].astype(np.float64) * factor).astype(np.float32)


# ---- the harness -----------------------------------------------------------------------------


class Harness:
    """The dishonest coordinator of one test module: the server, the real silo processes it
    drives (by name), the silos it runs itself, and a round counter."""

    def __init__(
        self,
        fed: Federation,
        server: HarnessServer,
        procs: Mapping[str, Proc],
        records: Path,
        in_harness_names: Sequence[str],
    ) -> None:
        self.fed, self.server, self.procs, self.records = fed, server, dict(procs), records
        self.roster = Roster.from_json(fed.roster.read_text())
        self.trust = Trust(load_pem_certificate(fed.ca_cert.read_bytes()), self.roster)
        self._identities = {self.silo_id(n): self._identity(n) for n in in_harness_names}
        self.in_harness_ids = frozenset(self._identities)
        self._round = 0

    def _identity(self, name: str) -> SiloIdentity:
        files = self.fed.silos[name]
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        der = load_pem_certificate(files.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        return SiloIdentity(SiloId(self.silo_id(name)), key, (der,))

    def in_harness(self, silo_id: str, *, colluding: bool) -> _HarnessSilo:
        return _HarnessSilo(silo_id, self._identities[silo_id], colluding)

    # ---- names ----------------------------------------------------------------------------------

    def silo_id(self, name: str) -> str:
        return silo_id_for(self.fed.federation_id, name)

    def ids(self, *names: str) -> tuple[str, ...]:
        return tuple(self.silo_id(n) for n in names)

    def record_dir(self, name: str) -> Path:
        return self.records / name

    def true_update(self, name: str, round_id: int) -> np.ndarray:
        return true_update(self.record_dir(name), round_id)

    def next_round_id(self, gap: int = 1) -> int:
        self._round += gap
        return self._round

    def note_round_id(self, round_id: int) -> None:
        """A silo may have accepted `round_id`: later rounds start above it."""
        self._round = max(self._round, round_id)

    # ---- configs --------------------------------------------------------------------------------

    def config(
        self,
        round_id: int,
        names: Sequence[str],
        model: bytes,
        *,
        signed_params: Mapping[str, Any] | bytes | None = None,
        **changes: Any,
    ) -> RoundConfig:
        """The honest coordinator's config for `names`, with `changes` (RoundConfig fields) and
        `signed_params` inside it (when given; raises HarnessError if configs cannot carry
        them yet)."""
        cfg = build_round_config(
            SETTINGS,
            federation_id=self.fed.federation_id,
            roster_version=self.roster.version,
            roster_digest=self.roster.digest(),
            round_id=round_id,
            invited=self.ids(*names),
            model_version=round_id,
            model_sha256=hashlib.sha256(model).digest(),
            layout=LAYOUT,
            deadlines_s=DEADLINES_S,
        )
        if changes:
            cfg = dataclasses.replace(cfg, **changes)
        if signed_params is not None:
            cfg = with_signed_train_params(cfg, signed_params)
        return cfg

    def honest_config(
        self,
        round_id: int,
        names: Sequence[str],
        model: bytes,
        *,
        params: Mapping[str, Any] = HONEST_TRAIN,
        **changes: Any,
    ) -> RoundConfig:
        """`params` signed when the tree supports it (else they travel in the offer only)."""
        signed = params if signs_train_params() else None
        return self.config(round_id, names, model, signed_params=signed, **changes)

    # ---- rounds ---------------------------------------------------------------------------------

    def run(self, plan: Plan) -> Outcome:
        self.note_round_id(plan.config.round_id)
        try:
            return _Run(self, plan).execute()
        except HarnessError:
            self.assert_alive()  # a silo that is gone says more than "not connected"
            raise

    def honest_round(self, names: Sequence[str]) -> Outcome:
        """A whole honest round with `names`; checks the unmasked mean against the silos'
        recorded true updates within the quantisation bound, and returns the outcome."""
        rid = self.next_round_id()
        model = model_bytes(rid)
        cfg = self.honest_config(rid, names, model)
        out = self.run(Plan(cfg, model, HONEST_TRAIN))
        assert out.completed, (
            f"honest round {rid} did not complete: {out.abort_reason}; refusals "
            f"{out.refusals}\n{self.logs()}"
        )
        assert sorted(out.survivors) == sorted(self.ids(*names)), out.survivors
        truth = np.mean([self.true_update(n, rid).astype(np.float64) for n in names], axis=0)
        assert out.aggregate is not None
        bound = quantisation_bound(cfg, [NUM_EXAMPLES] * len(names))
        err = float(np.max(np.abs(out.aggregate - truth)))
        assert err <= bound + float(np.max(np.abs(truth))) * 2.0**-23, (err, bound)
        return out

    def answers(
        self, names: Sequence[str], round_id: int, since: Mapping[str, int], timeout_s: float
    ) -> dict[str, str | None]:
        """Each silo's first answer to round `round_id`'s offer (see `answer_to_offer`)."""
        found: dict[str, str | None] = {}
        deadline = time.monotonic() + timeout_s
        for name in names:
            sid = self.silo_id(name)
            item = self.server.wait_for(
                sid,
                lambda r: r.round_id == round_id and answer_to_offer(r) is not None,
                max(0.0, deadline - time.monotonic()),
                since=since.get(sid, 0),
            )
            found[name] = None if item is None else answer_to_offer(item)
        return found

    def end_round(self, names: Sequence[str], round_id: int) -> None:
        """Tell `names` the round is over (aborted), so no session lingers."""
        for name in names:
            self.server.round_result(self.silo_id(name), round_id, "aborted", reason="HARNESS")

    def marks(self, names: Sequence[str]) -> dict[str, int]:
        return {self.silo_id(n): self.server.mark(self.silo_id(n)) for n in names}

    def offer(
        self,
        names: Sequence[str],
        cfg: RoundConfig | bytes,
        model: bytes,
        *,
        round_id: int,
        offer_params: Mapping[str, Any] | str = HONEST_TRAIN,
    ) -> None:
        """Offer round `round_id` with config `cfg` (or raw config bytes) to `names`. The
        caller notes round ids a silo may accept (`note_round_id`)."""
        config = cfg if isinstance(cfg, bytes) else cfg.encode()
        params = _offer_json(offer_params)
        for name in names:
            offer = pb.RoundOffer(
                round_id=round_id,
                aggregation=pb.AGGREGATION_SECAGG,
                config=config,
                model_sha256=hashlib.sha256(model).digest(),
                model_bytes=len(model),
                train_params_json=params,
            )
            self.server.offer(self.silo_id(name), offer, model)

    # ---- processes ------------------------------------------------------------------------------

    def assert_alive(self) -> None:
        dead = {n: p.popen.returncode for n, p in self.procs.items() if p.popen.poll() is not None}
        assert not dead, f"silo processes exited: {dead}\n{self.logs()}"

    def rss(self, name: str) -> int:
        return vm_rss_bytes(self.procs[name].pid)

    def logs(self) -> str:
        return "\n".join(f"===== {n} =====\n{p.log()[-3000:]}" for n, p in self.procs.items())


def error_vs_bound(recovered: np.ndarray, truth: np.ndarray, bound: float) -> tuple[float, float]:
    """(max |recovered − truth|, that error in units of `bound`)."""
    err = float(np.max(np.abs(recovered.astype(np.float64) - truth.astype(np.float64))))
    return err, err / bound


REAL_SILOS = ("a", "b", "c", "d")  # real `silo_agent run` processes
HARNESS_SILOS = ("e", "f")  # on the roster, run inside the harness when a plan invites them


@contextmanager
def running_harness(
    root: Path,
    *,
    real: Sequence[str] = REAL_SILOS,
    in_harness: Sequence[str] = HARNESS_SILOS,
    federation_id: str = "adv",
    connect_timeout_s: float = 90.0,
) -> Iterator[Harness]:
    """A dev federation under `root`, the harness server on 127.0.0.1, and one real silo
    process per name of `real` connected to it; everything is stopped on exit (silos by PID)."""
    fed = provision(root / "fed", federation_id, [*real, *in_harness])
    server = HarnessServer.start(fed)
    try:
        with processes(root / "logs") as procs:
            started = {}
            for index, name in enumerate(real):
                toml = write_silo_config(
                    root / f"{name}.toml",
                    fed.silos[name],
                    port=server.port,
                    task_spec=SPEC,
                    options={"silo_index": index, "record_dir": str(root / "records" / name)},
                    allow_plaintext_insecure=False,
                )
                started[name] = procs.silo(name, toml)
            harness = Harness(fed, server, started, root / "records", in_harness)
            try:
                server.wait_connected(harness.ids(*real), connect_timeout_s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{procs.logs()}") from None
            try:
                yield harness
            finally:
                # Each agent needs seconds to exit: signal them all (by PID) before
                # `processes` waits for each in turn.
                for proc in started.values():
                    if proc.popen.poll() is None:
                        proc.popen.send_signal(signal.SIGTERM)
    finally:
        server.stop()

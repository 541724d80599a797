"""A real coordinator `Hub` driven in memory: no gRPC server, no processes, a fake clock.

Rule: everything below the transport is the production code (admission with real certificates
from `provision`, the round log in a temporary directory, the outbound queues, the round
machines); only the transport is replaced. A `FakeSilo` holds the stream `Hub.admit` returned,
drains it with `next_messages(0)` as the servicer's writer would, and answers through
`Hub.on_message` as the servicer's reader would. Time is a `FakeClock`: deadlines pass when a
test advances it.

The round is run by the driver's own `run_one_round` on a driver thread (`RoundThread`), as
`run_rounds` runs it. Its clock's `wait` gives the other threads a turn (at most 10 ms of real
time, ended early by a notify) without moving the clock (`DriverClock`), so the driver ticks at
the test's pace and no deadline passes unless the test advances the clock. A masked header that
must wait for an upload slot is sent from a thread of its own, as the servicer's reader for that
silo would. Loops that need no second thread (`Hub.run_rounds` without silos, backoff) run on the
plain `FakeClock`, whose `wait` advances time. Every wait for another thread is bounded
(`WAIT_S`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.observability.ratelimit import PeerLog
from coordinator.runtime import driver
from coordinator.runtime.hub import Hub
from coordinator.runtime.stream import SiloStream
from protos import federation_pb2 as pb
from protos.blobs import Serialized
from secagg.chunking import MAX_CHUNK_BYTES, describe, split
from secagg.identity import Roster, SiloId, load_pem_certificate, silo_id_for
from secagg.silo import MaskedUpload, SiloPolicy, SiloSession, SiloStage
from secagg.trust import SiloIdentity, Trust
from silofed import wire
from silofed.tensors import state_from_bytes, state_to_bytes
from tests.fakes import FakeClock
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    provision,
    write_coordinator_config,
)

DRIVER_THREAD = "round-driver"
WAIT_S = 5.0  # the longest a test waits for the driver thread (real seconds)
FEDERATION_ID = "hubtest"


class DriverClock(FakeClock):
    """A `FakeClock` for a hub whose driver runs on its own thread: `wait` gives the other
    threads a turn (a few real milliseconds on the condition, which a notify ends early) but
    does not move the clock, so only the test's `advance` makes deadlines pass."""

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.driver_reads = 0  # clock reads on the driver thread: at least one per tick

    def now(self) -> float:
        if threading.current_thread().name == DRIVER_THREAD:
            self.driver_reads += 1
        return super().now()

    def wait(self, cond: threading.Condition, timeout_s: float) -> None:
        self.waits += 1
        cond.wait(min(timeout_s, 0.01))


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


@dataclass
class FakeSilo:
    """One silo as the hub sees it through its stream."""

    name: str
    silo_id: str
    cert_pem: bytes
    hub: Hub
    stream: SiloStream | None = None
    received: list[pb.CoordinatorMessage] = field(default_factory=list)
    # Blob being received (header, chunks so far) and the blobs received whole, by kind.
    _blob: tuple[pb.BlobHeader, list[bytes]] | None = None
    blobs: list[tuple[pb.BlobHeader, bytes]] = field(default_factory=list)
    _update: bytes = b""  # the plaintext update being uploaded
    # The hello's wire version: "" as before 1.1 (no upload grants: a masked header blocks
    # until a slot frees), "1.1" for a silo that waits for grants.
    wire_version: str = ""
    # The size its uploads are cut into; None: what an honest silo of `wire_version` is told
    # (silofed.wire.upload_chunk_bytes).
    chunk_bytes: int | None = None

    @property
    def upload_chunk_bytes(self) -> int:
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return wire.upload_chunk_bytes(self.wire_version) or MAX_CHUNK_BYTES

    def connect(self, *, roster_digest: bytes | None = None) -> SiloStream:
        """Open a stream (a reconnect replaces the previous one): `Hub.admit` with a hello."""
        digest = self.hub.roster.digest() if roster_digest is None else roster_digest
        hello = pb.Hello(silo_id=self.silo_id, roster_digest=digest, wire_version=self.wire_version)
        self.stream = self.hub.admit(self.cert_pem, hello)
        return self.stream

    def grants(self) -> list[pb.UploadGrant]:
        return [m.upload_grant for m in self.received if m.HasField("upload_grant")]

    def drain(self, limit: int = 10_000) -> list[pb.CoordinatorMessage]:
        """Everything queued for this silo now, as the stream's writer would send it (the
        hub's delivery markers fire on the way). Returns the new messages."""
        assert self.stream is not None, f"{self.name} is not connected"
        new: list[pb.CoordinatorMessage] = []
        for _ in range(limit):
            if not self.stream.queue._items:  # nothing queued (a delivery marker counts 0 bytes)
                break
            batch = self.stream.next_messages(0)
            if batch is None:  # the end marker: the hub closed this stream
                break
            for sent in batch:  # a model's chunks come pre-serialised
                message = (
                    pb.CoordinatorMessage.FromString(sent.take())
                    if isinstance(sent, Serialized)
                    else sent
                )
                new.append(message)
                self._take(message)
        else:
            raise AssertionError(f"{self.name}: more than {limit} items queued")
        self.received.extend(new)
        return new

    def _take(self, message: pb.CoordinatorMessage) -> None:
        if message.HasField("blob_header"):
            self._blob = (message.blob_header, [])
        elif message.HasField("blob_chunk"):
            assert self._blob is not None
            header, chunks = self._blob
            chunks.append(message.blob_chunk.data)
            if len(chunks) == header.chunk_count:
                self.blobs.append((header, b"".join(chunks)))
                self._blob = None

    def send(self, **kind: Any) -> None:
        """One SiloMessage through the hub, as the servicer's reader delivers it."""
        assert self.stream is not None, f"{self.name} is not connected"
        self.hub.on_message(self.stream, pb.SiloMessage(**kind))

    # -- what arrived ---------------------------------------------------------------------------

    def offers(self) -> list[pb.RoundOffer]:
        return [m.round_offer for m in self.received if m.HasField("round_offer")]

    def aborts(self) -> list[pb.AbortNotice]:
        return [m.abort for m in self.received if m.HasField("abort")]

    def results(self) -> list[pb.RoundResult]:
        return [m.round_result for m in self.received if m.HasField("round_result")]

    def model(self) -> dict[str, torch.Tensor]:
        """The last global model received."""
        data = [d for h, d in self.blobs if h.kind == pb.GLOBAL_MODEL]
        assert data, f"{self.name} received no model"
        return state_from_bytes(data[-1])

    # -- the plaintext baseline's answer --------------------------------------------------------

    def report_and_upload(
        self,
        round_id: int,
        delta: Mapping[str, torch.Tensor],
        *,
        num_examples: int = 10,
        metrics: Mapping[str, float] | None = None,
        chunks: int | None = None,
    ) -> pb.BlobHeader:
        """A TrainReport and the update blob; only the first `chunks` chunks when given (an
        upload that stops)."""
        data = state_to_bytes(dict(delta))
        sha = hashlib.sha256(data).digest()
        self.send(
            train_report=pb.TrainReport(
                round_id=round_id,
                num_examples=num_examples,
                metrics=dict(metrics or {"eval_score": 1.0}),
                update_sha256=sha,
            )
        )
        meta = describe(data, sha, self.upload_chunk_bytes)
        header = pb.BlobHeader(
            round_id=round_id,
            kind=pb.PLAINTEXT_UPDATE,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            chunk_count=meta.chunk_count,
        )
        self.send(blob_header=header)
        self._update = data
        self.send_chunks(round_id, 0, meta.chunk_count if chunks is None else chunks)
        return header

    def send_chunks(self, round_id: int, start: int, stop: int) -> None:
        """Chunks [start, stop) of the update `report_and_upload` began."""
        for index, piece in enumerate(split(self._update, self.upload_chunk_bytes)):
            if start <= index < stop:
                chunk = pb.BlobChunk(
                    round_id=round_id, kind=pb.PLAINTEXT_UPDATE, index=index, data=piece
                )
                self.send(blob_chunk=chunk)


@dataclass
class SecureSilo(FakeSilo):
    """A silo that takes part in secure rounds with a real `secagg.SiloSession` (the protocol
    code the silo agent runs), answering every secagg frame as it drains its stream."""

    key_pem: bytes = b""
    ca_pem: bytes = b""
    roster_json: str = ""
    session: SiloSession | None = None
    upload: MaskedUpload | None = None
    _frames_seen: int = 0

    def new_session(self) -> SiloSession:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        der = load_pem_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
        identity = SiloIdentity(SiloId(self.silo_id), key, (der,))
        trust = Trust(load_pem_certificate(self.ca_pem), Roster.from_json(self.roster_json))
        seed = int.from_bytes(os.urandom(16), "big")
        return SiloSession(
            identity,
            trust,
            SiloPolicy(last_round_id=0),
            random_bytes=os.urandom,
            rng=np.random.Generator(np.random.PCG64DXSM(seed)),
        )

    def answer(self) -> None:
        """Drain, then answer what arrived: an offer with the protocol's M1, each secagg frame
        with the session's replies."""
        self.drain()
        now = dt.datetime.now(dt.UTC)  # certificates are checked on the real clock
        new = self.received[self._frames_seen :]
        self._frames_seen = len(self.received)
        for message in new:
            if message.HasField("round_offer"):
                offer = message.round_offer
                self.session, self.upload = self.new_session(), None
                sha = hashlib.sha256(self._model_bytes()).digest()
                m1 = self.session.handle_offer(offer.config, sha, now=now)
                self._frame(offer.round_id, m1)
            elif message.HasField("secagg") and self.session is not None:
                for reply in self.session.handle(message.secagg.payload, now=now):
                    self._frame(message.secagg.round_id, reply)

    def _model_bytes(self) -> bytes:
        data = [d for h, d in self.blobs if h.kind == pb.GLOBAL_MODEL]
        assert data, f"{self.name} received no model"
        return data[-1]

    def _frame(self, round_id: int, payload: bytes) -> None:
        self.send(secagg=pb.SecAggFrame(round_id=round_id, payload=payload))

    def ready_to_upload(self) -> bool:
        return self.session is not None and self.session.stage is SiloStage.KEYS_RECEIVED

    def masked_upload(self, value: float, num_examples: int = 10) -> MaskedUpload:
        """The session's masked vector of an update with every element `value`."""
        assert self.session is not None and self.session.config is not None
        length = sum(spec.size for spec in self.session.config.layout)
        self.upload = self.session.submit_update(
            np.full(length, value, dtype=np.float32), num_examples
        )
        return self.upload

    def send_masked_header(self, round_id: int) -> pb.BlobHeader:
        """The blob header of the masked vector (secagg's signed header inside)."""
        assert self.upload is not None
        data = self.upload.vector.tobytes()
        meta = describe(data, hashlib.sha256(data).digest(), self.upload_chunk_bytes)
        header = pb.BlobHeader(
            round_id=round_id,
            kind=pb.MASKED_VECTOR,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            chunk_count=meta.chunk_count,
            protocol_header=self.upload.header,
        )
        self.send(blob_header=header)
        return header

    def send_masked_chunks(self, round_id: int) -> None:
        assert self.upload is not None
        vector = self.upload.vector.tobytes()
        for index, piece in enumerate(split(vector, self.upload_chunk_bytes)):
            chunk = pb.BlobChunk(round_id=round_id, kind=pb.MASKED_VECTOR, index=index, data=piece)
            self.send(blob_chunk=chunk)


def delta_of(model: Mapping[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """An update of `model`'s shape with every element `value`."""
    return {k: torch.full_like(v, value) for k, v in model.items()}


@dataclass
class HubHarness:
    fed: Federation
    config: CoordinatorConfig
    hub: Hub
    clock: FakeClock
    silos: dict[str, FakeSilo]

    def silo(self, name: str) -> FakeSilo:
        return self.silos[name]

    def connect(self, *names: str) -> list[FakeSilo]:
        out = [self.silos[n] for n in names]
        for s in out:
            s.connect()
        return out

    def wait_until(
        self, what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S
    ) -> None:
        """Wait (bounded, real time) until `condition()` holds under the hub's lock; the
        driver's every tick notifies."""
        deadline = time.monotonic() + timeout_s
        with self.hub.lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
                self.hub.changed.wait(min(left, 0.02))

    def ticks(self, n: int = 2) -> None:
        """Let the driver tick `n` more times at the current time (each tick reads the clock)."""
        assert isinstance(self.clock, DriverClock)
        clock = self.clock
        target = clock.driver_reads + n
        self.wait_until(f"{n} ticks", lambda: clock.driver_reads >= target)

    def phase(self) -> str:
        """The phase of the round in progress ("" between rounds), as `status` shows it."""
        return self.hub.status().phase

    @contextmanager
    def round_thread(self) -> Iterator[RoundThread]:
        """`driver.run_one_round` on a driver thread; on leaving, the round must have ended."""
        thread = RoundThread(self.hub)
        thread.start()
        try:
            yield thread
        finally:
            if thread.is_alive() and not thread.ended.is_set():
                self.hub.stopping.set()  # a failed test: end the round, then report
            thread.join(WAIT_S)
            assert not thread.is_alive(), "the round driver did not end"
        if thread.error is not None:
            raise thread.error


class RoundThread(threading.Thread):
    """One `run_one_round` call; `error` holds what it raised."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(name=DRIVER_THREAD, daemon=True)
        self.hub = hub
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.completed_before = hub.completed_rounds()

    def run(self) -> None:
        try:
            driver.run_one_round(self.hub, self.completed_before)
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.ended.set()
            with self.hub.lock:
                self.hub.changed.notify_all()

    def finish(self, timeout_s: float = WAIT_S) -> None:
        """Wait for the round to end (bounded)."""
        assert self.ended.wait(timeout_s), "the round did not end"


def make_harness(
    tmp_path: Path,
    names: Sequence[str] = ("a", "b", "c"),
    *,
    min_silos: int = 1,
    aggregation: str = "plaintext-insecure",
    offer_s: float = 30.0,
    train_s: float = 60.0,
    deadlines: Mapping[str, float] | None = None,
    rounds_extra: Mapping[str, Any] | None = None,
    secagg: Mapping[str, Any] | None = None,
    model_factory: Callable[[], torch.nn.Module] = small_model,
    clock: FakeClock | None = None,
) -> HubHarness:
    """A federation of `names` under `tmp_path` and a real `Hub` on its config."""
    fed = provision(tmp_path / "fed", FEDERATION_ID, list(names))
    path = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=tmp_path / "coord",
        task_spec=RECORDING_SPEC,
        rounds=5,
        min_silos=min_silos,
        offer_s=offer_s,
        train_s=train_s,
        aggregation=aggregation,
        secagg=secagg,
        deadlines=deadlines,
        rounds_extra=rounds_extra,
    )
    config = load_coordinator_config(path)
    # The fake clock starts at the real time: the certificates `provision` made are checked
    # against it (Hub.admit).
    clock = clock or DriverClock(now=time.time())
    hub = Hub(config, model_factory=model_factory, clock=clock)
    # The hub's rate-limited peer log reads the real monotonic clock; on the fake one, its
    # intervals end when the test advances time. (Stands in for Hub passing its clock.)
    hub.peer_log = PeerLog(hub.peer_log.logger, clock=clock.monotonic)
    silos: dict[str, FakeSilo] = {}
    for n in names:
        files = fed.silos[n]
        silo_id = silo_id_for(FEDERATION_ID, n)
        cert = files.cert.read_bytes()
        if aggregation == "secagg":
            silos[n] = SecureSilo(
                n,
                silo_id,
                cert,
                hub,
                key_pem=files.key.read_bytes(),
                ca_pem=files.ca_cert.read_bytes(),
                roster_json=files.roster.read_text(),
            )
        else:
            silos[n] = FakeSilo(n, silo_id, cert, hub)
    return HubHarness(fed, config, hub, clock, silos)

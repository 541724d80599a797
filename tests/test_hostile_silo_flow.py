"""A hostile member costs at most its own contribution: outbound queues and upload slots (issue 10).

The coordinator runs in this process (hub + gRPC server over mTLS on loopback, as `serve` builds
it) with honest silo agents as real processes beside members that misbehave:

- a raw gRPC client (protos/ stubs, an enrolled certificate) that says hello and never reads its
  stream: its queue passes one model, it is dropped and disconnected, the coordinator's memory
  (VmRSS from /proc/self/status) stays flat over 15 rounds of an 8 MiB model;
- two raw members not invited to the round that announce masked vectors and send no chunk: they
  get no upload slot, and every honest upload goes through;
- a patched agent (tests/stalling_agent.py) that stops in the middle of its masked upload: its
  slot is freed after `[deadlines] upload_progress_s` and the round completes without it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coordinator.runtime.hub import Hub
from coordinator.runtime.serve import Outcome
from coordinator.storage.roundlog import RoundDetail, RoundLog
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.chunking import MAX_CHUNK_BYTES, chunk_count_for
from secagg.identity import Roster, silo_id_for
from secagg.messages import MaskedHeader, SignedEnvelope, encode_message
from silofed.wire import WIRE_VERSION, upload_chunk_bytes
from tests.federation_helpers import (
    Federation,
    InProcessCoordinator,
    Processes,
    coordinator_in_process,
    processes,
    provision,
    write_coordinator_config,
    write_silo_config,
)
from tests.sized_task import TASK_3MB, TASK_8MB, SizedTask

pytestmark = pytest.mark.e2e

HONEST = ("a", "b", "c")
SECAGG = {"clip_l2": 100.0, "weighting": "uniform"}
MIB = 1 << 20
# The chunk size the coordinator names to a member announcing this build's wire version.
UPLOAD_CHUNK = upload_chunk_bytes(str(WIRE_VERSION)) or MAX_CHUNK_BYTES


# ---- a member speaking the protocol by hand ---------------------------------------------------


class RawMember:
    """A roster member's own stream, built from protos/ with its enrolled certificate: it sends
    hello and then what the test gives it; it reads its stream only when `reads` (and then
    leaves when the final evaluation is offered)."""

    def __init__(self, fed: Federation, name: str, port: int, *, reads: bool) -> None:
        silo = fed.silos[name]
        self.silo_id = silo_id_for(fed.federation_id, name)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=silo.ca_cert.read_bytes(),
            private_key=silo.key.read_bytes(),
            certificate_chain=silo.cert.read_bytes(),
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.max_receive_message_length", 4 * MIB),
                # A reader that never reads must not have its window grown for it either.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self._out: queue.Queue[pb.SiloMessage | None] = queue.Queue()
        self._closed = threading.Event()
        self.received = 0
        self.offers: queue.Queue[pb.RoundOffer] = queue.Queue()  # what the reader saw offered
        hello = pb.Hello(
            silo_id=self.silo_id,
            roster_digest=Roster.from_json(fed.roster.read_text()).digest(),
            wire_version=str(WIRE_VERSION),
        )
        stub = pb_grpc.FederationStub(self.channel)
        self.call = stub.Connect(self._requests(hello), timeout=900)
        self._reader: threading.Thread | None = None
        if reads:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _requests(self, hello: pb.Hello) -> Iterator[pb.SiloMessage]:
        yield pb.SiloMessage(hello=hello)
        while not self._closed.is_set():
            try:
                item = self._out.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received += 1
                if message.HasField("round_offer"):
                    if message.round_offer.aggregation == pb.AGGREGATION_EVALUATE:
                        # The rounds are over: leave, so the final evaluation waits for no one.
                        self._closed.set()
                        self.call.cancel()
                        return
                    self.offers.put(message.round_offer)
        except grpc.RpcError:
            pass

    def send(self, message: pb.SiloMessage) -> None:
        self._out.put(message)

    def ended(self, timeout_s: float) -> grpc.StatusCode | None:
        """Read what is left of the stream now: the status it ended with, or None when it is
        still open after `timeout_s`."""
        ended: list[grpc.StatusCode] = []

        def drain() -> None:
            try:
                for _ in self.call:
                    pass
            except grpc.RpcError as exc:
                ended.append(exc.code())

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        reader.join(timeout_s)
        return ended[0] if ended else None

    def close(self) -> None:
        self._closed.set()
        self._out.put(None)
        self.call.cancel()
        if self._reader is not None:
            self._reader.join(5)
        self.channel.close()


@contextmanager
def raw_members(
    fed: Federation, names: Sequence[str], port: int, *, reads: bool
) -> Iterator[list[RawMember]]:
    members: list[RawMember] = []
    try:
        for name in names:
            members.append(RawMember(fed, name, port, reads=reads))
        yield members
    finally:
        for member in members:
            member.close()


# ---- the federation ---------------------------------------------------------------------------


@dataclass
class Run:
    fed: Federation
    state: Path
    coordinator: InProcessCoordinator
    procs: Processes
    outcome: list[Outcome] = field(default_factory=list)

    @property
    def hub(self) -> Hub:
        return self.coordinator.hub

    def start_rounds(self) -> threading.Event:
        return self.coordinator.drive(lambda hub: self.outcome.append(hub.run_rounds()))

    def start_honest(self, task_spec: str, *, plaintext: bool = False) -> None:
        for i, name in enumerate(HONEST):
            toml = write_silo_config(
                self.procs.log_dir.parent / f"{name}.toml",
                self.fed.silos[name],
                port=self.coordinator.port,
                task_spec=task_spec,
                options={"silo_index": i},
                allow_plaintext_insecure=plaintext,
            )
            self.procs.silo(name, toml)

    def wait_connected(self, names: Sequence[str], timeout_s: float) -> None:
        ids = {silo_id_for(self.fed.federation_id, n) for n in names}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ids <= set(self.hub.sessions):
                return
            time.sleep(0.05)
        raise AssertionError(f"{sorted(ids - set(self.hub.sessions))} did not connect\n")

    def details(self) -> list[RoundDetail]:
        log = RoundLog.open_readonly(self.state / "rounds.sqlite")
        try:
            return [log.round_detail(r.round_id) for r in log.rounds()]
        finally:
            log.close()


@contextmanager
def federation(
    tmp_path: Path,
    members: Sequence[str],
    task: SizedTask,
    *,
    rounds: int,
    start_silos: int,
    offer_s: float = 30.0,
    train_s: float = 60.0,
    deadlines: dict[str, float] | None = None,
    secagg: dict[str, object] | None = None,
    rounds_extra: dict[str, object] | None = None,
    train: dict[str, object] | None = None,
    aggregation: str = "secagg",
) -> Iterator[Run]:
    fed = provision(tmp_path / "fed", "hostile", members)
    state = tmp_path / "coord"
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        fed,
        state_dir=state,
        task_spec=f"tests.sized_task:{_spec_name(task)}",
        rounds=rounds,
        min_silos=3,
        start_silos=start_silos,
        offer_s=offer_s,
        train_s=train_s,
        aggregation=aggregation,
        secagg={**SECAGG, **(secagg or {})} if aggregation == "secagg" else None,
        deadlines=deadlines,
        rounds_extra=rounds_extra,
        train=train,
    )
    with (
        processes(tmp_path / "logs") as procs,
        coordinator_in_process(config) as coordinator,
    ):
        yield Run(fed, state, coordinator, procs)


def _spec_name(task: SizedTask) -> str:
    return {id(TASK_8MB): "TASK_8MB", id(TASK_3MB): "TASK_3MB"}[id(task)]


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ---- (a) a member that never reads --------------------------------------------------------------


def test_a_member_that_never_reads_is_dropped_and_memory_stays_flat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the old unbounded queue the idle member got every round's model queued (+8 MiB per
    round) and was invited, and waited for, in every round."""
    caplog.set_level(logging.INFO, logger="silofed")
    rounds, model = 15, TASK_8MB.model_bytes
    members = (*HONEST, "idle")
    with federation(tmp_path, members, TASK_8MB, rounds=rounds, start_silos=4, offer_s=8) as run:
        samples: list[tuple[int | None, int]] = []  # (round running, VmRSS)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                rnd = run.hub.round
                samples.append((None if rnd is None else rnd.round_id, _rss_bytes()[0]))

        with raw_members(run.fed, ["idle"], run.coordinator.port, reads=False) as (idle,):
            run.wait_connected(["idle"], 10)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            done = run.start_rounds()
            run.start_honest("tests.sized_task:TASK_8MB")
            try:
                assert done.wait(600), run.procs.logs()
            finally:
                stop.set()
                sampler.join(5)
            elapsed = time.monotonic() - started
            assert run.outcome == [Outcome.FINISHED], run.procs.logs()
            assert idle.silo_id not in run.hub.sessions
            # Cancelled by the coordinator (the member itself never ended it).
            assert idle.ended(10) is grpc.StatusCode.CANCELLED
        details = run.details()

    assert [d.status.value for d in details] == ["completed"] * rounds
    # Round 1 sent it the model and waited out the advertisement for it; round 2 would have
    # queued a second model behind the first: it was dropped at once, and never invited again.
    drops = {d.round_id: {x.silo_id: (x.phase, x.reason) for x in d.dropouts} for d in details}
    assert drops[1] == {idle.silo_id: ("advertise", "TIMEOUT")}
    assert drops[2] == {idle.silo_id: ("advertise", "DISCONNECTED")}
    for d in details[2:]:
        assert idle.silo_id not in d.participants["invited"], d.round_id
        assert not d.dropouts, d.round_id
    text = _messages(caplog)
    assert f"{idle.silo_id}: its outbound queue would hold" in text
    assert "dropped from the round and disconnected" in text

    warm = 5  # the allocator's working set fills up over the first rounds
    early = max(rss for r, rss in samples if r is not None and r <= warm)
    late = max(rss for r, rss in samples if r is None or r > warm)
    peak = _rss_bytes()[1]
    print(
        f"\n{rounds} rounds of a {model / MIB:.0f} MiB model in {elapsed:.0f} s; VmRSS max "
        f"rounds 1-{warm} {early / MIB:.0f} MiB, rounds {warm + 1}-{rounds} and after "
        f"{late / MIB:.0f} MiB ({(late - early) / MIB:+.0f} MiB); VmHWM {peak / MIB:.0f} MiB"
    )
    # The bound: what the first rounds needed, plus three models of slack for allocator noise
    # (40 rounds measured: within +23 MiB). The unbounded queue grew by one model per round:
    # ten models past round 5.
    assert late <= early + 3 * model, (early, late)


# ---- (b) members not invited announce masked vectors --------------------------------------------


def _masked_announcement(round_id: int, length: int) -> list[pb.SiloMessage]:
    """A MASKED_VECTOR blob header carrying a MaskedHeader, exactly sized, with no chunk after."""
    header = MaskedHeader(b"\0" * 32, 0, length, 32, b"\0" * 32, 0, 1 << 16, True)
    # Wrapped like a real one (the signature is never checked: the upload is refused first).
    signed = SignedEnvelope(encode_message(header), b"", ())
    total = length * 4
    return [
        pb.SiloMessage(
            blob_header=pb.BlobHeader(
                round_id=round_id,
                kind=pb.MASKED_VECTOR,
                total_bytes=total,
                sha256=b"\0" * 32,
                chunk_count=chunk_count_for(total, UPLOAD_CHUNK),
                protocol_header=encode_message(signed),
            )
        ),
    ]


def test_members_not_invited_cannot_take_the_upload_slots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With slots for anyone who asked, the two announcements held both slots (there are two)
    for the whole round and every honest upload waited until the masked deadline."""
    caplog.set_level(logging.INFO, logger="silofed")
    rounds, train_s = 3, 30.0
    # Silo ids sort bytewise: with silos_per_round = 3, x1 and x2 are never invited.
    members = (*HONEST, "x1", "x2")
    with federation(
        tmp_path,
        members,
        TASK_3MB,
        rounds=rounds,
        start_silos=3,
        train_s=train_s,
        rounds_extra={"silos_per_round": 3},
        train={"sleep_s": 1.0},  # a masked phase of about a second: announced in, for sure
    ) as run:
        run.start_honest("tests.sized_task:TASK_3MB")
        run.wait_connected(HONEST, 60)
        with raw_members(run.fed, ["x1", "x2"], run.coordinator.port, reads=True) as hostile:
            run.wait_connected(["x1", "x2"], 10)
            done = run.start_rounds()
            announced: set[tuple[int, str]] = set()
            held: set[str] = set()  # hostile members seen holding an upload slot
            deadline = time.monotonic() + 300
            while not done.is_set() and time.monotonic() < deadline:
                for member in hostile:
                    session = run.hub.sessions.get(member.silo_id)
                    if session is not None and session.upload_slot:
                        held.add(member.silo_id)
                with run.hub.lock:
                    st = None if run.hub.round is None else run.hub.round.status()
                    # L = d + 1: the model's elements and the weight (secagg RoundConfig.length)
                    length = 1 + sum(t.numel() for t in run.hub.global_state.values())
                if st is not None and (st.round_id, st.phase) not in announced:
                    # Once per phase: early enough to be first in line for the slots.
                    announced.add((st.round_id, st.phase))
                    for member in hostile:
                        for message in _masked_announcement(st.round_id, length):
                            member.send(message)
                time.sleep(0.02)
            assert done.is_set(), run.procs.logs()
            assert run.outcome == [Outcome.FINISHED], run.procs.logs()
            assert not held
        details = run.details()

    assert {(r, p) for r, p in announced if p == "masked"} == {(r, "masked") for r in (1, 2, 3)}
    honest_ids = sorted(silo_id_for(run.fed.federation_id, n) for n in HONEST)
    masked_s = [next(p for p in d.phases if p.phase == "masked").duration_s for d in details]
    print("\nmasked phases (s): " + ", ".join(f"{s:.2f}" for s in masked_s))
    for d, duration_s in zip(details, masked_s, strict=True):
        assert d.status.value == "completed", d
        assert sorted(d.participants["finished"]) == honest_ids, d.round_id
        # Honest uploads of 3 MiB on loopback: seconds, nowhere near the deadline.
        assert duration_s < train_s / 3, (d.round_id, duration_s)
    text = _messages(caplog)
    for member in hostile:
        assert f"refused a masked vector from {member.silo_id}" in text


# ---- (c) an invited member stops in the middle of its upload ------------------------------------


def _one_slot_round_with(
    tmp_path: Path, name: str, task: SizedTask, env: dict[str, str], train_s: float
) -> tuple[RoundDetail, str, str]:
    """One secure round with a single upload slot ([deadlines] upload_progress_s = 2), the
    honest silos and member `name` running tests.stalling_agent with `env`. Returns the round's
    log entry, the member's silo id and its agent log."""
    with federation(
        tmp_path,
        (*HONEST, name),
        task,
        rounds=1,
        start_silos=4,
        train_s=train_s,
        deadlines={"upload_progress_s": 2.0},
        secagg={"max_concurrent_uploads": 1},
    ) as run:
        done = run.start_rounds()
        spec = f"tests.sized_task:{_spec_name(task)}"
        run.start_honest(spec)
        toml = write_silo_config(
            tmp_path / f"{name}.toml",
            run.fed.silos[name],
            port=run.coordinator.port,
            task_spec=spec,
            options={"silo_index": 3},
            allow_plaintext_insecure=False,
        )
        agent = run.procs.start(
            f"silo-{name}", ["-m", "tests.stalling_agent", "run", "--config", str(toml)], env=env
        )
        assert done.wait(240), run.procs.logs()
        assert run.outcome == [Outcome.FINISHED], run.procs.logs()
        (detail,) = run.details()
        log = agent.log()
    member = silo_id_for(run.fed.federation_id, name)
    honest = sorted(silo_id_for(run.fed.federation_id, n) for n in HONEST)
    assert detail.status.value == "completed", detail
    assert sorted(detail.participants["finished"]) == honest
    assert [(x.silo_id, x.phase, x.reason) for x in detail.dropouts] == [
        (member, "masked", "INVALID")
    ]
    return detail, member, log


def test_a_stalled_upload_frees_its_slot_and_the_round_completes_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One upload slot, held by a member whose chunks stop: without a progress deadline the
    others waited for it until it went on (`STALL_S` later) and it stayed in the round."""
    caplog.set_level(logging.INFO, logger="silofed")
    stall_s = 15.0
    env = {"SILOFED_TEST_STALL_S": str(stall_s)}
    detail, stalls, log = _one_slot_round_with(tmp_path, "stalls", TASK_3MB, env, 60.0)
    assert "upload stopped" in log, log  # it did stall
    masked = next(p for p in detail.phases if p.phase == "masked")
    print(f"\nmasked phase {masked.duration_s:.2f} s (stall {stall_s:g} s, progress 2 s)")
    # Freed after about progress_s without a chunk; nobody waited for the stall to end.
    assert masked.duration_s < stall_s - 3, masked.duration_s
    assert f"{stalls}: upload stalled: no chunk for" in _messages(caplog)


def test_a_trickling_upload_cannot_hold_its_slot_for_the_whole_phase(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: a member in U2 that sends one chunk just before each progress deadline
    kept its slot for the whole masked phase. A slot is also bounded in total (upload_progress_s
    plus the size at 1 MiB/s): 9 chunks of an 8 MiB vector every 1.5 s (13.5 s) against
    2 s + 8 s: it is released at about 10 s and the round completes with the others."""
    caplog.set_level(logging.INFO, logger="silofed")
    env = {"SILOFED_TEST_TRICKLE_S": "1.5"}
    _, trickles, log = _one_slot_round_with(tmp_path, "trickles", TASK_8MB, env, 90.0)
    assert "trickling a chunk" in log, log  # it did trickle, under the progress deadline
    assert f"{trickles}: upload too slow" in _messages(caplog)


# ---- (d) the plaintext baseline: an update that stops after its header ---------------------------


def test_a_plaintext_update_that_stops_is_dropped_after_the_progress_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A member reports, announces its update and sends no chunk: without a progress deadline
    the train phase waited for it until `train_s`."""
    caplog.set_level(logging.INFO, logger="silofed")
    progress_s, train_s = 2.0, 60.0
    with federation(
        tmp_path,
        (*HONEST, "stops"),
        TASK_3MB,
        rounds=1,
        start_silos=4,
        train_s=train_s,
        deadlines={"upload_progress_s": progress_s},
        aggregation="plaintext-insecure",
    ) as run:
        with raw_members(run.fed, ["stops"], run.coordinator.port, reads=True) as (stops,):
            run.wait_connected(["stops"], 10)
            done = run.start_rounds()
            run.start_honest("tests.sized_task:TASK_3MB", plaintext=True)
            offer = stops.offers.get(timeout=60)
            digest = b"\x01" * 32
            total = offer.model_bytes  # an update has the model's size
            stops.send(
                pb.SiloMessage(
                    train_report=pb.TrainReport(
                        round_id=offer.round_id, num_examples=10, update_sha256=digest
                    )
                )
            )
            stops.send(
                pb.SiloMessage(
                    blob_header=pb.BlobHeader(
                        round_id=offer.round_id,
                        kind=pb.PLAINTEXT_UPDATE,
                        total_bytes=total,
                        sha256=digest,
                        chunk_count=chunk_count_for(total, UPLOAD_CHUNK),
                    )
                )
            )
            assert done.wait(120), run.procs.logs()
            assert run.outcome == [Outcome.FINISHED], run.procs.logs()
        (detail,) = run.details()

    assert detail.status.value == "completed", detail
    assert [(x.silo_id, x.phase, x.reason) for x in detail.dropouts] == [
        (stops.silo_id, "train", "INVALID")
    ]
    trained = next(p for p in detail.phases if p.phase == "train")
    print(f"\ntrain phase {trained.duration_s:.2f} s (progress {progress_s:g} s)")
    assert trained.duration_s < train_s / 3, trained.duration_s
    assert f"{stops.silo_id}: upload stalled: no chunk for" in _messages(caplog)

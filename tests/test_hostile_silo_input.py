"""A hostile or broken silo costs at most its own contribution: what it sends (issue 10).

The coordinator runs in this process (a real `Hub` behind the real gRPC server over mTLS on
loopback) and drives secure rounds with three honest silo agents running as processes; silo c
is broken (its evaluation returns NaN). A fourth roster member, x, is a raw gRPC client built
from protos/ with its enrolled certificate, and sends what no agent would:

1. TrainReports with a metric named "", a 3.9 MB name, 50,000 keys, NaN and inf values, in
   rounds it is invited to;
2. 20,000 secagg frames for a round id that does not exist;
3. garbage in every field of the SiloMessage oneof, bytes that are no SiloMessage at all, and a
   message whose handling fails unexpectedly (a fault injected into the hub).

After each attack: the coordinator still serves (health check over mTLS, the round driver
alive, no unhandled exception in any thread), honest rounds keep completing with the honest
silos' metrics (c's NaN dropped, the global metric the mean over finite values), every round in
the log is completed or aborted with finite metrics, the round log grew by less than 1 MB, the
coordinator logged at most a handful of lines per cause, and its peak memory (VmHWM, reset at
the start of the attack) stayed within MEMORY_BOUND_MB of its resident size then.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.config import load_coordinator_config
from coordinator.rounds.kind import Frame, SecAggPayload
from coordinator.runtime.hub import Hub
from coordinator.runtime.peer_input import MAX_METRICS, valid_metric_name
from coordinator.runtime.serve import Outcome
from coordinator.storage.roundlog import RoundLog
from coordinator.transport.server import RunningServer, start_server
from coordinator.transport.servicer import FederationServicer
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.identity import Roster, silo_id_for
from silofed.task import load_model_factory
from silofed.wire import WIRE_VERSION
from tests.federation_helpers import (
    Federation,
    RecordingTask,
    processes,
    provision,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e

FED = "hostile"
HONEST = ("a", "b", "c")
SPEC = "tests.test_hostile_silo_input:TASK"
X = silo_id_for(FED, "x")
IDS = {n: silo_id_for(FED, n) for n in HONEST}
MEMORY_BOUND_MB = 150  # peak RSS above the RSS at the start of the attack
ROUNDLOG_GROWTH_BYTES = 1 << 20
LINES_PER_CAUSE = 5
ROUND_LINES = 6  # a round's lines of one template: a phase ends five times in a secure round
MAX_LINE = 2048
FAULT = b"inject a fault"  # a secagg payload the patched hub fails on
SUMMARY = "%s: %s more like it (%s) in the last %.0f s"
GRPC_UNDECODABLE = "Exception deserializing message!"


class BrokenEvalTask(RecordingTask):
    """The recording task whose evaluation returns NaN on a silo with `nan_eval` set."""

    def evaluate(self, model: Any, data: Any) -> dict[str, float]:
        return {"score": math.nan if data.get("nan_eval") else float(data["silo_index"])}


TASK = BrokenEvalTask()


def _wait(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _memory_kb() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> None:
    # Linux: "5" resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


@dataclass
class Record:
    created: float
    level: int
    template: str
    args: tuple[Any, ...]
    message: str


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        entry = Record(record.created, record.levelno, str(record.msg), args, record.getMessage())
        with self._lock:
            self.records.append(entry)

    def since(self, t: float) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.created >= t]


@dataclass
class Live:
    """The in-process coordinator and what the test watches of it."""

    fed: Federation
    hub: Hub
    running: RunningServer
    driver: threading.Thread
    capture: Capture
    thread_errors: list[str]
    received: Counter[str] = field(default_factory=Counter)

    @property
    def port(self) -> int:
        return self.running.port

    def completed(self) -> list[int]:
        return [r.round_id for r in self.hub.roundlog.rounds() if r.status.value == "completed"]

    def wait_completed(self, n: int, after: int, timeout_s: float = 120.0) -> list[int]:
        _wait(
            lambda: len([r for r in self.completed() if r > after]) >= n,
            timeout_s,
            f"{n} completed rounds after round {after}",
        )
        return [r for r in self.completed() if r > after]

    def roundlog_bytes(self) -> int:
        path = self.hub.roundlog.path
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            conn.close()
        return int(pages) * int(size)


@contextmanager
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    """Three honest silo processes (c's evaluation is NaN) and the in-process coordinator,
    running secure rounds until the test ends; stopped and checked on the way out."""
    fed = provision(tmp_path / "fed", FED, (*HONEST, "x"))
    state = tmp_path / "coord"
    cfg = write_coordinator_config(
        tmp_path / "c.toml", fed, state_dir=state, task_spec=SPEC, rounds=1000, min_silos=3,
        aggregation="secagg", secagg={"clip_l2": 10.0}, offer_s=3.0, train_s=30.0,
        start_timeout_s=120.0,
        deadlines={"share_keys_s": 15.0, "consistency_s": 15.0, "unmask_s": 15.0},
    )  # fmt: skip
    config = load_coordinator_config(cfg)
    hub = Hub(config, model_factory=load_model_factory(config.task_spec))
    live_received: Counter[str] = Counter()
    count_lock = threading.Lock()

    def count(silo_id: str, message: pb.SiloMessage) -> None:
        with count_lock:
            live_received[silo_id] += 1

    servicer = FederationServicer(hub, on_receive=count)
    running = start_server(
        servicer,
        listen=config.listen,
        ca_cert=config.tls.ca_cert,
        cert=config.tls.cert,
        key=config.tls.key,
    )
    capture = Capture()
    levels = {}
    for name in ("silofed", "grpc"):
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.INFO)  # setLevel: the loggers' cached levels are reset too
        logger.addHandler(capture)
    errors: list[str] = []
    previous_hook = threading.excepthook

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")
        previous_hook(args)

    monkeypatch.setattr(threading, "excepthook", on_thread_error)
    outcome: list[Outcome] = []
    driver = threading.Thread(target=lambda: outcome.append(hub.run_rounds()), daemon=True)
    live = Live(fed, hub, running, driver, capture, errors, live_received)
    try:
        with processes(tmp_path / "logs") as procs:
            for i, name in enumerate(HONEST):
                toml = write_silo_config(
                    tmp_path / f"{name}.toml",
                    fed.silos[name],
                    port=running.port,
                    task_spec=SPEC,
                    options={
                        "silo_index": i,
                        "num_examples": 10,
                        "record_dir": str(tmp_path / "sent" / name),
                        "nan_eval": name == "c",
                    },
                    allow_plaintext_insecure=False,
                )
                procs.silo(name, toml)
            driver.start()
            try:
                live.wait_completed(1, 0)
                yield live
            except BaseException:
                print(procs.logs())
                raise
            finally:
                hub.stopping.set()
                with hub.lock:
                    hub.changed.notify_all()
                driver.join(60)
            assert not driver.is_alive()
            assert outcome == [Outcome.STOPPED], (outcome, errors)
    finally:
        hub.stopping.set()
        hub.close_all(finished=False)
        running.stop()
        driver.join(10)
        hub.roundlog.close()
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(capture)
            logging.getLogger(name).setLevel(level)
    _check_roundlog(state / "rounds.sqlite")


def _check_roundlog(path: Path) -> None:
    """Every round completed or aborted; every metric a valid name with a finite value."""
    log = RoundLog.open_readonly(path)
    try:
        rounds = log.rounds()
        assert rounds
        for r in rounds:
            assert r.status.value in ("completed", "aborted"), (r.round_id, r.status)
            assert all(math.isfinite(v) for v in r.global_metrics.values()), r
            for silo, metrics in r.silo_metrics.items():
                assert len(metrics) <= MAX_METRICS, (r.round_id, silo)
                for name, value in metrics.items():
                    assert valid_metric_name(name) and math.isfinite(value), (r.round_id, silo)
    finally:
        log.close()


class RawSilo:
    """Silo x speaking the wire protocol directly: protos/ stubs, its enrolled certificate."""

    def __init__(self, live: Live) -> None:
        files = live.fed.silos["x"]
        creds = grpc.ssl_channel_credentials(
            live.fed.ca_cert.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{live.port}",
            creds,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.max_send_message_length", 8 << 20),
            ],
        )
        self._out: queue.Queue[pb.SiloMessage | None] = queue.Queue()
        self.offers: queue.Queue[int] = queue.Queue()  # round ids, as offers arrive
        self.ended: grpc.StatusCode | None = None
        self.ended_detail = ""
        self.done = threading.Event()
        digest = Roster.from_json(live.fed.roster.read_text()).digest()
        self._hello = pb.SiloMessage(
            hello=pb.Hello(silo_id=X, roster_digest=digest, wire_version=str(WIRE_VERSION))
        )
        stub = pb_grpc.FederationStub(self.channel)
        self._call = stub.Connect(self._requests(), timeout=300)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.SiloMessage]:
        yield self._hello
        while (item := self._out.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for message in self._call:  # read everything: x is a silo that does read
                if message.WhichOneof("kind") == "round_offer":
                    self.offers.put(message.round_offer.round_id)
        except grpc.RpcError as exc:
            self.ended, self.ended_detail = exc.code(), str(exc.details())
        finally:
            self.done.set()

    def send(self, message: pb.SiloMessage) -> None:
        self._out.put(message)

    def next_offer(self, timeout_s: float = 60.0) -> int:
        """The round id of the next offer to arrive from now on: x then has the whole
        advertise deadline of that round to act in (earlier offers are skipped)."""
        while not self.offers.empty():
            self.offers.get_nowait()
        return self.offers.get(timeout=timeout_s)

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self._reader.join(10)
        self.channel.close()


@contextmanager
def raw_silo(live: Live) -> Iterator[RawSilo]:
    x = RawSilo(live)
    try:
        yield x
    finally:
        x.close()


@dataclass
class Attack:
    """What the test measured from the start of an attack."""

    started: float
    last_round: int
    roundlog_bytes: int
    rss_kb: int


def _begin(live: Live) -> Attack:
    _reset_peak()
    last = live.hub.roundlog.last_round_id()
    return Attack(time.time(), last, live.roundlog_bytes(), _memory_kb()["VmRSS"])


def _cause(record: Record) -> str:
    # A summary line counts towards the cause it summarises; any other line is its template.
    return f"summary of {record.args[2]}" if record.template == SUMMARY else record.template


def _assert_unharmed(live: Live, attack: Attack, *, min_rounds_after: int = 2) -> list[int]:
    """The checks every attack ends with (see the module docstring). Returns the rounds that
    completed since the attack began."""
    after = live.wait_completed(min_rounds_after, attack.last_round)
    assert live.driver.is_alive()
    assert not live.thread_errors, live.thread_errors
    # Still serving: the standard health check over mTLS.
    files = live.fed.silos["a"]
    creds = grpc.ssl_channel_credentials(
        live.fed.ca_cert.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{live.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="silofed.v1.Federation"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    # Honest rounds complete with the honest silos' metrics; c's NaN is not among them and the
    # global metric is the mean of a's 0.0 and b's 1.0.
    for round_id in after:
        detail = live.hub.roundlog.round_detail(round_id)
        assert sorted(detail.participants["finished"]) == sorted(IDS.values()), round_id
        stats = {s.silo_id: dict(s.metrics) for s in detail.silos}
        train_loss = 1.0 / (round_id + 1)
        assert stats[IDS["a"]] == {"eval_score": 0.0, "train_loss": train_loss}, stats
        assert stats[IDS["b"]] == {"eval_score": 1.0, "train_loss": train_loss}, stats
        assert stats[IDS["c"]] == {"train_loss": train_loss}, stats
        assert dict(detail.global_metrics) == {"eval_score": 0.5}, round_id
    # The round log stays small.
    growth = live.roundlog_bytes() - attack.roundlog_bytes
    assert growth < ROUNDLOG_GROWTH_BYTES, growth
    # A handful of lines per cause; what a round logs (its start, phases, dropouts, end) is
    # bounded by the rounds, not by what x sends.
    records = live.capture.since(attack.started)
    rounds_seen = live.hub.roundlog.last_round_id() - attack.last_round + 1
    per_cause = Counter(_cause(r) for r in records)
    for cause, n in per_cause.items():
        limit = ROUND_LINES * rounds_seen if cause.startswith("round %d") else LINES_PER_CAUSE
        assert n <= limit, (cause, n, limit)
    longest = max((len(r.message) for r in records), default=0)
    assert longest <= MAX_LINE, longest
    # No error of the coordinator's own; grpc logs one per stream whose bytes do not decode.
    errors = [r.message[:300] for r in records if r.level >= logging.ERROR]
    assert not [e for e in errors if e != GRPC_UNDECODABLE], errors
    # Peak memory since the attack began.
    peak_mb = (_memory_kb()["VmHWM"] - attack.rss_kb) / 1024
    peer_causes = Counter({k: v for k, v in per_cause.items() if not k.startswith("round %d")})
    print(
        f"attack figures: peak +{peak_mb:.1f} MB over {attack.rss_kb / 1024:.0f} MB RSS, "
        f"round log +{growth:,} bytes, {len(records)} log lines "
        f"(most per cause outside the round lines: {peer_causes.most_common(4)}), rounds "
        f"completed after: {after}"
    )
    assert peak_mb <= MEMORY_BOUND_MB, peak_mb
    return after


MANY = {f"eval_m{i}": float(i) for i in range(50_000)}
HOSTILE: list[dict[str, float]] = [
    {"": 1.0, "eval_ok": 2.0},
    {"n" * 3_900_000: 1.0},
    MANY,
    {"eval_nan": math.nan, "eval_inf": math.inf, "eval_minf": -math.inf, "eval_ok": 2.0},
]
# What the coordinator keeps of each report (its valid metrics, at most 64: the first names).
KEPT: list[dict[str, float]] = [
    {"eval_ok": 2.0},
    {},
    {k: MANY[k] for k in sorted(MANY)[:64]},
    {"eval_ok": 2.0},
]


def test_hostile_metrics_are_dropped_at_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with coordinator(tmp_path, monkeypatch) as live, raw_silo(live) as x:
        attack = _begin(live)
        expected: dict[int, dict[str, float]] = {}
        for last in range(len(HOSTILE)):  # four rounds x is invited to, while each runs
            round_id = x.next_offer()
            order = [*range(last + 1, len(HOSTILE)), *range(last + 1)]  # report `last` last
            before = live.received[X]
            for i in order:
                metrics = HOSTILE[i]
                x.send(
                    pb.SiloMessage(train_report=pb.TrainReport(round_id=round_id, metrics=metrics))
                )
            target = before + len(HOSTILE)
            _wait(lambda: live.received[X] >= target, 30, "x's reports")  # noqa: B023
            expected[round_id] = KEPT[last]
        live.wait_completed(1, max(expected))
        for round_id, kept in expected.items():
            detail = live.hub.roundlog.round_detail(round_id)
            assert detail.status.value == "completed", (round_id, detail.abort_reason)
            # x was invited, dropped (it never advertised a key), and its last report recorded
            # with its valid metrics only.
            stored = {s.silo_id: dict(s.metrics) for s in detail.silos}
            assert stored[X] == kept, (round_id, sorted(stored[X])[:5])
        _assert_unharmed(live, attack)
        records = live.capture.since(attack.started)
        assert [r for r in records if r.template == "%s: report for round %d: %s"]
        assert x.ended is None  # x broke no protocol rule: its stream stays open


def test_frames_for_a_wrong_round_are_ignored_in_a_few_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000
    with coordinator(tmp_path, monkeypatch) as live, raw_silo(live) as x:
        attack = _begin(live)
        _wait(lambda: X in live.hub.sessions, 30, "x to be admitted")
        before = live.received[X]
        frame = pb.SiloMessage(secagg=pb.SecAggFrame(round_id=987_654_321, payload=os.urandom(64)))
        for _ in range(n):
            x.send(frame)
        _wait(lambda: live.received[X] >= before + n, 120, "x's frames to be handled")
        _assert_unharmed(live, attack)
        # One line, then the count of the rest: 1 + 19,999 = 20,000, once its interval is over.
        template = "ignoring a secagg frame from %s for round %d"

        def accounted() -> int:
            total = 0
            for r in live.capture.since(attack.started):
                if r.template.startswith(template):
                    total += 1 + (int(r.args[2].replace(",", "")) if len(r.args) > 2 else 0)
                elif r.template == SUMMARY and r.args[2] == "stray secagg frame":
                    total += int(r.args[1].replace(",", ""))
            return total

        _wait(lambda: accounted() == n, 30, f"the log to account for all {n:,} frames")
        assert x.ended is None


def _garbage(round_id: int) -> list[pb.SiloMessage]:
    huge = "\n\x1b[31m" + "z" * 1_900_000  # two of them still fit in one 4 MiB message
    big = 2**64 - 1
    blobs = []
    kinds = (0, pb.GLOBAL_MODEL, pb.PLAINTEXT_UPDATE, pb.MASKED_VECTOR, 77)
    for kind in (pb.BlobKind.ValueType(k) for k in kinds):
        for rid in (round_id, big):
            blobs.append(
                pb.SiloMessage(
                    blob_header=pb.BlobHeader(
                        round_id=rid, kind=kind, total_bytes=big, sha256=os.urandom(999),
                        chunk_count=2**32 - 1,
                    )
                )
            )  # fmt: skip
            blobs.append(
                pb.SiloMessage(
                    blob_chunk=pb.BlobChunk(
                        round_id=rid, kind=kind, index=2**32 - 1, data=os.urandom(1 << 20)
                    )
                )
            )
    return [
        pb.SiloMessage(hello=pb.Hello(silo_id=huge, agent_version=huge, roster_digest=b"\0" * 99)),
        *blobs,
        pb.SiloMessage(
            train_report=pb.TrainReport(
                round_id=big,
                num_examples=big,
                metrics={"eval_x": math.nan},
                update_sha256=os.urandom(4096),
            )
        ),
        pb.SiloMessage(train_report=pb.TrainReport(round_id=round_id, num_examples=big)),
        pb.SiloMessage(secagg=pb.SecAggFrame(round_id=round_id, payload=os.urandom(3 << 20))),
        pb.SiloMessage(secagg=pb.SecAggFrame(round_id=round_id, payload=b"")),
        pb.SiloMessage(secagg=pb.SecAggFrame(round_id=big, payload=b"SA1" + os.urandom(100))),
        pb.SiloMessage(abort=pb.AbortNotice(round_id=round_id, code=2**31 - 1, detail=huge)),  # type: ignore[arg-type]
        pb.SiloMessage(abort=pb.AbortNotice(round_id=big, code=-7, detail="")),  # type: ignore[arg-type]
        pb.SiloMessage(),  # no field of the oneof at all
    ]


def _raw_bytes_stream(live: Live, messages: list[bytes]) -> grpc.StatusCode:
    """Send x's certificate and these bytes as a Connect stream, unchecked by any stub."""
    files = live.fed.silos["x"]
    creds = grpc.ssl_channel_credentials(
        live.fed.ca_cert.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{live.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    try:
        connect = channel.stream_stream("/silofed.v1.Federation/Connect")
        with pytest.raises(grpc.RpcError) as info:
            for _ in connect(iter(messages), timeout=20):
                pass
        code: grpc.StatusCode = info.value.code()
        return code
    finally:
        channel.close()


def test_garbage_in_every_field_costs_only_x(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with coordinator(tmp_path, monkeypatch) as live:
        hub = live.hub
        real_on_frame = hub.on_frame

        def failing_on_frame(silo_id: str, frame: Frame) -> bool:
            if isinstance(frame, SecAggPayload) and frame.payload == FAULT:
                # Stands in for a handler bug that a message triggers.
                raise RuntimeError("injected fault " + "q" * 1_000_000)
            return real_on_frame(silo_id, frame)

        monkeypatch.setattr(hub, "on_frame", failing_on_frame)
        attack = _begin(live)
        with raw_silo(live) as x:
            round_id = x.next_offer()
            garbage = _garbage(round_id)
            before = live.received[X]
            for message in garbage:
                x.send(message)
            _wait(
                lambda: live.received[X] >= before + len(garbage) or x.done.is_set(),
                60,
                "x's garbage to be handled",
            )
            assert x.ended is None, (x.ended, x.ended_detail)  # refused, not disconnected
            # An unexpected error while handling x's message: only x's stream ends.
            faulted = x.next_offer()
            x.send(pb.SiloMessage(secagg=pb.SecAggFrame(round_id=faulted, payload=FAULT)))
            assert x.done.wait(30)
            assert x.ended == grpc.StatusCode.INVALID_ARGUMENT, (x.ended, x.ended_detail)
            assert "protocol violation: RuntimeError: injected fault" in x.ended_detail
            assert len(x.ended_detail) < 1000
        live.wait_completed(1, faulted - 1)
        detail = hub.roundlog.round_detail(faulted)
        assert detail.status.value == "completed", detail.abort_reason
        assert {(d.silo_id, d.reason) for d in detail.dropouts} == {(X, "INVALID")}
        # Bytes that are no SiloMessage: as the first message, and after a valid hello (a
        # proto3 string that is not UTF-8). The server refuses them; nothing reaches the hub.
        hello = pb.SiloMessage(
            hello=pb.Hello(silo_id=X, wire_version=str(WIRE_VERSION))
        ).SerializeToString()
        not_utf8 = b"\x2a\x05\x1a\x03\x0a\x01\xff"  # train_report{metrics{key: b"\xff"}}
        handled = live.received[X]
        for stream in ([b"\xff\xff\xff\xff garbage"], [hello, not_utf8]):
            assert _raw_bytes_stream(live, stream) != grpc.StatusCode.OK
        assert live.received[X] == handled
        _assert_unharmed(live, attack)
        violations = [r for r in live.capture.since(attack.started) if "violation" in r.message]
        assert violations and all(len(r.message) < 1500 for r in violations)

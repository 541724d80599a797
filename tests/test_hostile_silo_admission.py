"""Admission before resources: what a peer can hold of a live coordinator before it is a member
with a live stream (acceptance 2 of the hostile-silo hardening: slot exhaustion).

One coordinator process (plaintext rounds, short `[server]` bounds) and two honest silo agents
serve the module. The attacks use real mTLS on loopback: gRPC channels with certificates the
test provisioned, streams that never send hello, and plain TCP sockets that never handshake.
The coordinator's open file descriptors are read from /proc/<pid>/fd.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from coordinator.pki.authority import OPERATOR_CERT, OPERATOR_KEY, operator_dir
from coordinator.transport.status_client import Credentials, fetch_status
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.identity import silo_id_for
from silo_agent.transport.connection import Link
from tests.federation_helpers import (
    ROUND_COMPLETED,
    Federation,
    FederationRun,
    Proc,
    Processes,
    federation_run,
    mtls_channel,
    revoke,
    rounds_go_on,
    run_module,
    silo_tls,
    to_toml,
)

pytestmark = pytest.mark.e2e

FED = "admission"
HELLO_S = 3.0  # [server] hello_timeout_s
HANDSHAKE_S = 3.0  # [server] handshake_timeout_s
IDLE_S = 3.0  # [server] idle_connection_s
MAX_PENDING = 3  # [server] max_pending_streams
HONEST = ("a", "b")
NAMES = (*HONEST, "c", "mallory", "p1", "p2", "p3", "revokee")


@dataclass
class World:
    run: FederationRun
    config: Path
    coordinator: Proc
    silos: dict[str, Proc]

    @property
    def fed(self) -> Federation:
        return self.run.fed

    @property
    def port(self) -> int:
        return self.run.port

    @property
    def procs(self) -> Processes:
        return self.run.procs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with federation_run(tmp_path_factory.mktemp("admission"), FED, NAMES) as run:
        config = run.endless_config(min_silos=2)
        tables = tomllib.loads(config.read_text())
        tables["server"].update(
            hello_timeout_s=HELLO_S,
            handshake_timeout_s=HANDSHAKE_S,
            idle_connection_s=IDLE_S,
            max_pending_streams=MAX_PENDING,
        )
        config.write_text(to_toml(tables))
        coordinator = run.start_coordinator(config)
        run.listening(coordinator)
        silos = run.start_recording_silos(dict.fromkeys(HONEST, 5))
        coordinator.wait_for_log(ROUND_COMPLETED, 120)
        yield World(run, config, coordinator, silos)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class FdSampler:
    """The coordinator's open file descriptors every 50 ms, from a thread (for at most 120 s)."""

    def __init__(self, pid: int) -> None:
        self.samples: list[tuple[float, int]] = [(time.monotonic(), _fds(pid))]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def _run(self, pid: int) -> None:
        end = time.monotonic() + 120
        while not self._stop.wait(0.05) and time.monotonic() < end:
            self.samples.append((time.monotonic(), _fds(pid)))

    def when(self, ok: Callable[[int], bool], after: float, timeout_s: float) -> float:
        """The time of the first sample at or after `after` whose count is `ok`; waits for one
        up to `timeout_s` past `after`. AssertionError (with the samples) when none came."""
        deadline = after + timeout_s
        while time.monotonic() < deadline:
            found = [t for t, n in list(self.samples) if t >= after and ok(n)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no such fd count in {timeout_s} s: {self.samples[-20:]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _rounds_go_on(world: World, more: int = 2) -> None:
    rounds_go_on(world.coordinator, world.procs, more=more)


def _files(world: World, who: str) -> tuple[Path, Path]:
    """(certificate, key) of silo `who`, or of the federation's operator for "operator"."""
    if who == "operator":
        where = operator_dir(world.fed.root)
        return where / OPERATOR_CERT, where / OPERATOR_KEY
    silo = world.fed.silos[who]
    return silo.cert, silo.key


def _channel(world: World, who: str) -> grpc.Channel:
    cert, key = _files(world, who)
    return mtls_channel(world.port, world.fed.ca_cert, cert, key)


def _silent(stop: threading.Event) -> Iterator[pb.SiloMessage]:
    """A request stream that never says anything (until `stop`, bounded)."""
    stop.wait(60)
    yield from ()


@dataclass
class Silent:
    """Streams opened with `_silent` requests: the attacker's half, never saying hello."""

    channels: list[grpc.Channel]
    calls: list[tuple[float, grpc.Future]]  # (opened at, call)
    stop: threading.Event
    ended: dict[int, float]  # call index -> when it ended (its done callback's clock)

    def wait(self, timeout_s: float) -> list[tuple[str, str, float]]:
        """(code, details, seconds from opening to the end) of every call, once all ended."""
        deadline = time.monotonic() + timeout_s
        while len(self.ended) < len(self.calls):
            assert time.monotonic() < deadline, (
                f"{len(self.calls) - len(self.ended)} silent streams still open after {timeout_s} s"
            )
            time.sleep(0.05)
        return [
            (call.code().name, call.details() or "", self.ended[i] - opened)
            for i, (opened, call) in enumerate(self.calls)
        ]

    def close(self) -> None:
        self.stop.set()
        for _, call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def _open_silent(world: World, who: str, streams: int, per_channel: int = 8) -> Silent:
    """`streams` Connect streams of `who` that never send hello, `per_channel` per connection
    (the server allows 8 at once on one connection)."""
    silent = Silent([], [], threading.Event(), {})
    try:
        while len(silent.calls) < streams:
            channel = _channel(world, who)
            silent.channels.append(channel)
            stub = pb_grpc.FederationStub(channel)
            for _ in range(min(per_channel, streams - len(silent.calls))):
                index, opened = len(silent.calls), time.monotonic()
                call = stub.Connect(_silent(silent.stop), timeout=60)
                silent.calls.append((opened, call))
                call.add_done_callback(
                    lambda _, i=index: silent.ended.setdefault(i, time.monotonic())
                )
    except BaseException:
        silent.close()
        raise
    return silent


def _timed_welcome(world: World, name: str) -> float:
    """Seconds from dialing as silo `name` (the agent's own connection code) to its Welcome."""
    tls = silo_tls(world.fed.silos[name])
    start = time.monotonic()
    link = Link(world.address, tls, server_name="localhost")
    try:
        first = next(link.open(pb.Hello(silo_id=silo_id_for(FED, name))))
        elapsed = time.monotonic() - start
        assert first.WhichOneof("kind") == "welcome", first
        return elapsed
    finally:
        link.close()


def _operator_creds(world: World) -> Credentials:
    cert, key = _files(world, "operator")
    return Credentials(
        world.fed.ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes(), "localhost"
    )


def _raw_sockets(world: World, n: int) -> list[socket.socket]:
    """`n` plain TCP connections to the coordinator that never send a byte."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sockets.append(socket.create_connection(("127.0.0.1", world.port), timeout=5))
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_slot_exhaustion_leaves_room_for_silos_and_the_operator(world: World) -> None:
    """200 idle streams of one enrolled certificate and 500 idle TCP connections: an honest
    silo still connects, and `status` answers, within a second each; the server closes the
    idle connections itself; rounds keep completing."""
    pid = world.coordinator.pid
    fds = FdSampler(pid)
    baseline = fds.samples[0][1]
    threads = _threads(pid)
    opened = time.monotonic()
    sockets = _raw_sockets(world, 500)
    attack: Silent | None = None
    try:
        # The coordinator accepted them all (each holds one of its descriptors).
        fds.when(lambda n: n >= baseline + 500, opened, 10)
        attack = _open_silent(world, "mallory", 200)

        # An honest silo (its own agent code) connecting, and the operator's status, now.
        welcome_s = _timed_welcome(world, "c")
        start = time.monotonic()
        reply = fetch_status(world.address, _operator_creds(world), timeout_s=1.0)
        status_s = time.monotonic() - start
        assert reply.federation_id == FED
        cli = run_module("coordinator", "status", "--config", str(world.config), "--timeout",
                         "1", "--json")  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr  # answered within its 1 s deadline
        assert '"federation_id": "admission"' in cli.stdout, cli.stdout
        assert welcome_s < 1.0 and status_s < 1.0, (welcome_s, status_s)

        # A real honest agent restarting mid-attack gets back in and trains.
        world.procs.stop(world.silos["a"])
        # (its own log: the first run's already says it connected)
        (restarted,) = world.run.start_recording_silos({"a": 5}, run=1).values()
        world.silos["a"] = restarted
        restarted.wait_for_log("connected to federation admission as", 60)

        # One identity holds one stream: each newer stream replaced the previous one at once,
        # and the last was closed at the hello deadline. No stream outlived the deadline.
        ended = attack.wait(HELLO_S + 15)
        codes = [code for code, _, _ in ended]
        assert set(codes) <= {"ABORTED", "DEADLINE_EXCEEDED"}, sorted(set(codes))
        assert codes.count("ABORTED") >= 190, codes.count("ABORTED")
        longest = max(t for _, _, t in ended)
        assert longest < HELLO_S + 2, longest
        last = [(d, t) for code, d, t in ended if code == "DEADLINE_EXCEEDED"]
        assert last and all("no hello within 3 s" in d for d, _ in last), last
        assert all(t >= HELLO_S - 0.5 for _, t in last), last

        # The server closes the raw sockets at the handshake timeout, and the attacker's
        # connections (still open on its side, idle since its last stream) at the idle
        # timeout: the descriptors come back to the baseline without the client's help.
        unhandshaken = fds.when(lambda n: n <= baseline + 100, opened, HANDSHAKE_S + 10) - opened
        assert HANDSHAKE_S - 0.5 <= unhandshaken <= HANDSHAKE_S + 2, unhandshaken
        assert all(_closed_by_peer(s) for s in sockets)
        last_end = max(attack.ended.values())
        idle = fds.when(lambda n: n <= baseline + 3, last_end, IDLE_S + 10) - last_end
        assert idle <= IDLE_S + 2, idle
        peak = max(n for _, n in fds.samples)
        # Every stream's hello reader ended with it (200 would be left otherwise); the server's
        # pool may keep up to 64 + MAX_PENDING + 8 idle workers.
        assert _threads(pid) < threads + 100, (threads, _threads(pid))
        print(
            f"\nfds: baseline {baseline}, peak {peak}, raw sockets closed {unhandshaken:.1f} s "
            f"after opening, attacker's connections {idle:.1f} s after its last stream, now "
            f"{_fds(pid)}; honest silo welcomed in {welcome_s:.3f} s, status in {status_s:.3f} s;"
            f" {codes.count('ABORTED')} streams replaced, the last closed after {longest:.2f} s;"
            f" threads {threads} -> {_threads(pid)}"
        )
        _rounds_go_on(world)
    finally:
        fds.stop()
        if attack is not None:
            attack.close()
        for s in sockets:
            s.close()


@pytest.mark.parametrize(
    ("who", "detail"),
    [("revokee", "has been revoked"), ("operator", "is an operator certificate")],
)
def test_refused_before_hello(world: World, who: str, detail: str) -> None:
    """A revoked silo's certificate and the operator's are refused when the stream opens,
    before any hello: 50 silent streams each end at once (no hello deadline waited)."""
    if who == "revokee":
        revoke(world.fed, world.fed.silos["revokee"])
    silent = _open_silent(world, who, 50)
    try:
        ended = silent.wait(HELLO_S)  # a stream that waited for hello would still be open
    finally:
        silent.close()
    assert {code for code, _, _ in ended} == {"PERMISSION_DENIED"}, ended[:3]
    assert all(detail in d for _, d, _ in ended), ended[0]
    slowest = max(t for _, _, t in ended)
    print(f"\n{who}: 50 streams refused, slowest after {slowest:.3f} s")
    assert slowest < 1.0
    world.coordinator.wait_for_log(rf"refused connection from .*: .*{detail}", 10)
    _rounds_go_on(world, more=1)


def test_hello_deadline_and_one_stream_per_identity(world: World) -> None:
    """A stream that never says hello is closed at the deadline; a second stream of the same
    certificate replaces the first at once."""
    first = _open_silent(world, "mallory", 1)
    try:
        time.sleep(0.5)
        assert not first.calls[0][1].done()  # waiting for its hello
        second = _open_silent(world, "mallory", 1)
        try:
            [(code, detail, _)] = first.wait(2)
            assert code == "ABORTED" and "replaced" in detail, (code, detail)
            [(code, detail, took)] = second.wait(HELLO_S + 5)
        finally:
            second.close()
    finally:
        first.close()
    assert code == "DEADLINE_EXCEEDED" and "no hello within" in detail, (code, detail)
    assert HELLO_S - 0.5 <= took <= HELLO_S + 2, took
    world.coordinator.wait_for_log(
        r"closed a stream of spiffe://admission/silo/mallory .*: no hello within 3 s", 10
    )


def test_streams_waiting_for_hello_are_bounded(world: World) -> None:
    """`max_pending_streams` silent streams of distinct identities fill the pending bound: the
    next identity's stream is refused at once with RESOURCE_EXHAUSTED, and connected silos
    keep training."""
    pending = [_open_silent(world, name, 1) for name in ("p1", "p2", "p3")]
    try:
        time.sleep(0.5)
        assert not any(p.calls[0][1].done() for p in pending)
        extra = _open_silent(world, "mallory", 1)
        try:
            [(code, detail, took)] = extra.wait(HELLO_S)
        finally:
            extra.close()
        assert code == "RESOURCE_EXHAUSTED", (code, detail)
        assert "max_pending_streams" in detail and took < 1.0, (detail, took)
        for p in pending:
            assert [c for c, _, _ in p.wait(HELLO_S + 5)] == ["DEADLINE_EXCEEDED"]
    finally:
        for p in pending:
            p.close()
    _rounds_go_on(world, more=1)


def test_health_check_answers_and_watch_is_not_served(world: World) -> None:
    """A health Watch would hold its call, and keep its connection from ever being idle, for as
    long as the client likes: only Check is served."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(world, "mallory")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="silofed.v1.Federation")
        assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.Watch(request, timeout=5)))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
    finally:
        channel.close()


def test_a_new_stream_replaces_an_admitted_one(world: World) -> None:
    """A silo's admitted stream ends as soon as a newer stream of its certificate opens (before
    that one's hello): one identity, one stream."""
    link = Link(world.address, silo_tls(world.fed.silos["c"]), server_name="localhost")
    kinds: list[str] = []
    ended = threading.Event()

    def read() -> None:
        try:
            for message in link.open(pb.Hello(silo_id=silo_id_for(FED, "c"))):
                kinds.append(str(message.WhichOneof("kind")))
        except Exception as exc:  # noqa: BLE001 - reported through `kinds`
            kinds.append(f"error {exc}")
        finally:
            ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    newer: Silent | None = None
    try:
        deadline = time.monotonic() + 10
        while "welcome" not in kinds:
            assert time.monotonic() < deadline and not ended.is_set(), kinds
            time.sleep(0.02)
        opened = time.monotonic()
        newer = _open_silent(world, "c", 1)
        assert ended.wait(HELLO_S - 1), "the admitted stream outlived its replacement's opening"
        took = time.monotonic() - opened
        assert took < 1.0, took
        assert not newer.calls[0][1].done()  # the newer one is still waiting for its hello
        world.coordinator.wait_for_log(
            r"silo disconnected: spiffe://admission/silo/c \(replaced by a new stream\)", 10
        )
    finally:
        link.close()
        reader.join(10)
        if newer is not None:
            newer.close()

"""Liveness is gRPC keepalive's, on both ends: a peer that stops answering is dropped in time.

There is no application heartbeat on the wire. The coordinator's server
(coordinator.transport.server's
options) and the silo's channel (silo_agent.transport.connection) both send HTTP/2 keepalive pings,
also
while no data flows, and end the connection when a ping is not answered within the timeout.
Here the real coordinator (hub, servicer, server over mTLS on loopback) and a real silo `Link`
talk through a TCP relay that the test can freeze: it stops moving bytes but keeps both
sockets open, like a peer that hangs or a network path that black-holes. Both ends must notice
within keepalive time + timeout (plus scheduling slack), and not before the freeze. The
production option sets are used with only their two keepalive times shortened.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.transport import server
from protos import federation_pb2 as pb
from silo_agent.transport.connection import Link, LinkError, TlsMaterial
from tests.federation_helpers import (
    RECORDING_SPEC,
    coordinator_in_process,
    provision,
    write_coordinator_config,
)

FED = "keepalive"
KEEPALIVE_S = 1.0
TIMEOUT_S = 1.0
# A dead peer is noticed at most one ping interval plus the ping's timeout after it went
# silent; the rest is slack for a loaded 2-core machine.
BOUND_S = KEEPALIVE_S + TIMEOUT_S + 4.0
QUIET_S = 3 * (KEEPALIVE_S + TIMEOUT_S)  # a live relay keeps the stream up this long


class FreezableRelay:
    """A TCP relay on loopback to `target`; `freeze()` stops it moving bytes (sockets stay open)."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.frozen = threading.Event()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def freeze(self) -> None:
        self.frozen.set()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            self._sockets += [client, upstream]
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(pump)
            pump.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._stop.is_set():
            if self.frozen.is_set():  # read nothing, send nothing: pings go unanswered
                time.sleep(0.05)
                continue
            try:
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for s in self._sockets:
            s.close()
        for t in self._threads:
            t.join(5)


@contextmanager
def relay(target: int) -> Iterator[FreezableRelay]:
    r = FreezableRelay(target)
    try:
        yield r
    finally:
        r.close()


def _short(options: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """The server's production options with the keepalive times of this test."""
    times = {
        "grpc.keepalive_time_ms": round(KEEPALIVE_S * 1000),
        "grpc.keepalive_timeout_ms": round(TIMEOUT_S * 1000),
        "grpc.http2.ping_timeout_ms": round(TIMEOUT_S * 1000),
        # The server accepts the silo's pings at the silo's (shortened) interval.
        "grpc.http2.min_ping_interval_without_data_ms": round(KEEPALIVE_S * 500),
    }
    return tuple((name, times.get(name, value)) for name, value in options)


@pytest.fixture
def short_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"grpc.keepalive_time_ms", "grpc.http2.ping_timeout_ms"} <= {
        name for name, _ in server.SERVER_OPTIONS
    }, "the coordinator's server no longer sets keepalive: update docs/operations.md"
    monkeypatch.setattr(server, "SERVER_OPTIONS", _short(server.SERVER_OPTIONS))


def test_both_ends_drop_a_peer_that_stops_answering(tmp_path: Path, short_keepalive: None) -> None:
    fed = provision(tmp_path / "fed", FED, ["a", "b", "c"])
    cfg = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=tmp_path / "coord",
        task_spec=RECORDING_SPEC,
        rounds=1,
        min_silos=3,
    )
    silo = fed.silos["a"]
    silo_id = f"spiffe://{FED}/silo/a"
    tls = TlsMaterial(silo.ca_cert.read_bytes(), silo.cert.read_bytes(), silo.key.read_bytes())
    with coordinator_in_process(cfg, finished=False) as running, relay(running.port) as r:
        link = Link(
            f"127.0.0.1:{r.port}",
            tls,
            server_name="localhost",
            keepalive_s=KEEPALIVE_S,
            keepalive_timeout_s=TIMEOUT_S,
        )
        inbox: queue.Queue[pb.CoordinatorMessage | LinkError] = queue.Queue()

        def read() -> None:
            try:
                for message in link.open(pb.Hello(silo_id=silo_id)):
                    inbox.put(message)
            except LinkError as exc:
                inbox.put(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            first = inbox.get(timeout=30)
            assert isinstance(first, pb.CoordinatorMessage) and first.HasField("welcome"), first

            def connected() -> bool:
                with running.hub.lock:
                    return silo_id in running.hub.sessions

            # Alive through the relay: several ping rounds pass and neither end drops it.
            time.sleep(QUIET_S)
            assert connected(), "the coordinator dropped a live silo"
            ended_early = [m for m in list(inbox.queue) if isinstance(m, LinkError)]
            assert not ended_early, f"the silo's stream ended while alive: {ended_early}"
            while not inbox.empty():  # a roster update may have followed the welcome
                inbox.get_nowait()

            r.freeze()
            frozen_at = time.monotonic()
            while connected() and time.monotonic() - frozen_at < BOUND_S:
                time.sleep(0.05)
            coordinator_noticed = time.monotonic() - frozen_at
            assert not connected(), f"the coordinator kept a silent silo for {BOUND_S} s"
            ended = inbox.get(timeout=max(0.0, BOUND_S - (time.monotonic() - frozen_at)))
            silo_noticed = time.monotonic() - frozen_at  # the silo's side: the stream fails
            assert isinstance(ended, LinkError), ended
            assert ended.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"), ended
            assert silo_noticed < BOUND_S and coordinator_noticed < BOUND_S
        finally:
            link.close()
            reader.join(10)

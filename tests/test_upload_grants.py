"""Upload grants (wire 1.1) on the silo's side: the real `Link` over real mTLS against a scripted
coordinator. A masked vector's chunks stay at home until the grant of its round; a round that
ends first costs the header only; a coordinator that does not grant (an older one) gets the
chunks at once. The coordinator's side is tests/test_hub.py (`_granting`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from silo_agent.transport.connection import Link, OutBlob
from tests.federation_helpers import holds_within, provision, serve_scripted

WAIT_S = 10.0
QUIET_S = 1.5  # long enough for 3 MiB on loopback many times over


class _ScriptedCoordinator(pb_grpc.FederationServicer):
    """Welcomes (granting or not), records what arrives, sends what the test queues."""

    stream_capacity = 4  # what start_server sizes its worker pool by

    def __init__(self, *, grants: bool) -> None:
        self.grants = grants
        self.received: list[pb.SiloMessage] = []
        self.outbox: queue.Queue[pb.CoordinatorMessage | None] = queue.Queue()

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorMessage]:
        self.received.append(next(request_iterator))
        yield pb.CoordinatorMessage(welcome=pb.Welcome(upload_grants=self.grants))

        def read() -> None:
            try:
                for message in request_iterator:
                    self.received.append(message)
            except grpc.RpcError:  # the test ended the call
                return

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                item = self.outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("kind")) for m in self.received]


def _wait(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    return holds_within(condition, timeout_s)


class _Setup:
    def __init__(self, tmp_path: Path, *, grants: bool) -> None:
        fed = provision(tmp_path / "fed", "grants", ["a"])
        self.coordinator = _ScriptedCoordinator(grants=grants)
        self.running, tls = serve_scripted(self.coordinator, fed, "a")
        self.sent: list[str] = []
        self.link = Link(
            f"127.0.0.1:{self.running.port}",
            tls,
            server_name="localhost",
            on_sent=lambda item: self.sent.append(
                "blob" if isinstance(item, OutBlob) else str(item.WhichOneof("kind"))
            ),
        )
        self.replies: list[str] = []
        self._stream = self.link.open(pb.Hello(silo_id="spiffe://grants/silo/a"))
        threading.Thread(target=self._read, daemon=True).start()
        assert _wait(lambda: self.replies == ["welcome"]), self.replies

    def _read(self) -> None:
        try:
            for message in self._stream:
                self.replies.append(str(message.WhichOneof("kind")))
        except Exception:  # noqa: BLE001 - the link closed at the test's end
            return

    def masked_vector(self, round_id: int) -> bytes:
        """The round is offered, then the silo sends its masked vector and an abort after it."""
        self.coordinator.outbox.put(
            pb.CoordinatorMessage(round_offer=pb.RoundOffer(round_id=round_id))
        )
        assert _wait(lambda: "round_offer" in self.replies), self.replies
        data = np.random.default_rng(round_id).bytes(3 << 20)  # 3 chunks
        self.link.send(OutBlob(round_id, pb.MASKED_VECTOR, data, protocol_header=b"signed"))
        self.link.send(pb.SiloMessage(abort=pb.AbortNotice(round_id=round_id, detail="next")))
        return data

    def close(self) -> None:
        self.coordinator.outbox.put(None)
        self.link.close()
        self.running.stop()


@pytest.fixture
def granting(tmp_path: Path) -> Iterator[_Setup]:
    setup = _Setup(tmp_path, grants=True)
    yield setup
    setup.close()


def test_the_chunks_stay_home_until_the_grant_of_their_round(granting: _Setup) -> None:
    c = granting.coordinator
    data = granting.masked_vector(4)
    assert _wait(lambda: "blob_header" in c.kinds()), c.kinds()
    time.sleep(QUIET_S)
    assert c.kinds() == ["hello", "blob_header"]  # no chunk, nor what was queued after it
    assert granting.sent == ["hello"]
    grant = pb.UploadGrant(round_id=3, kind=pb.MASKED_VECTOR)  # an older round's: not ours
    c.outbox.put(pb.CoordinatorMessage(upload_grant=grant))
    time.sleep(QUIET_S)
    assert c.kinds() == ["hello", "blob_header"]
    grant = pb.UploadGrant(round_id=4, kind=pb.MASKED_VECTOR)
    c.outbox.put(pb.CoordinatorMessage(upload_grant=grant))
    expected = ["hello", "blob_header", "blob_chunk", "blob_chunk", "blob_chunk", "abort"]
    assert _wait(lambda: c.kinds() == expected), c.kinds()
    assert b"".join(m.blob_chunk.data for m in c.received[2:5]) == data
    assert _wait(lambda: granting.sent == ["hello", "blob", "abort"]), granting.sent
    # Grants are the link's own: the runner sees none.
    assert granting.replies == ["welcome", "round_offer"]


@pytest.mark.parametrize(
    "ending",
    [
        pb.CoordinatorMessage(abort=pb.AbortNotice(round_id=4, detail="round aborted")),
        pb.CoordinatorMessage(round_result=pb.RoundResult(round_id=4)),
        pb.CoordinatorMessage(round_offer=pb.RoundOffer(round_id=5)),
    ],
    ids=["abort", "result", "next-offer"],
)
def test_a_round_that_ends_before_the_grant_costs_the_header_only(
    granting: _Setup, ending: pb.CoordinatorMessage
) -> None:
    c = granting.coordinator
    granting.masked_vector(4)
    assert _wait(lambda: "blob_header" in c.kinds()), c.kinds()
    c.outbox.put(ending)
    # The link gives the vector up and goes on with what was queued after it.
    assert _wait(lambda: c.kinds() == ["hello", "blob_header", "abort"]), c.kinds()
    time.sleep(QUIET_S)
    assert "blob_chunk" not in c.kinds()
    assert granting.sent == ["hello", "abort"]  # the vector never left: not reported
    assert granting.replies == ["welcome", "round_offer", str(ending.WhichOneof("kind"))]


def test_a_round_the_silo_gives_up_on_its_own_releases_what_waits_behind_its_upload(
    granting: _Setup,
) -> None:
    """The silo's own deadline ended the round (SiloSecureRound calls `give_up`): its abort,
    queued behind the ungranted vector, goes out without the vector."""
    c = granting.coordinator
    granting.masked_vector(4)
    assert _wait(lambda: "blob_header" in c.kinds()), c.kinds()
    granting.link.give_up(3)  # an earlier round: the vector still waits
    time.sleep(QUIET_S)
    assert c.kinds() == ["hello", "blob_header"]
    granting.link.give_up(4)
    assert _wait(lambda: c.kinds() == ["hello", "blob_header", "abort"]), c.kinds()
    assert granting.sent == ["hello", "abort"]


def test_a_coordinator_that_does_not_grant_gets_the_chunks_at_once(tmp_path: Path) -> None:
    setup = _Setup(tmp_path, grants=False)
    try:
        setup.masked_vector(4)
        c = setup.coordinator
        expected = ["hello", "blob_header", "blob_chunk", "blob_chunk", "blob_chunk", "abort"]
        assert _wait(lambda: c.kinds() == expected), c.kinds()
    finally:
        setup.close()

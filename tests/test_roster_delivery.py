"""The coordinator sends its signed roster over the stream; a silo pinning an older one adopts it.

The coordinator's hub and gRPC server run in this process (no rounds are driven); silos connect
over real mTLS on loopback, either as the real silo runner (`SiloRunner`, in a thread) or as a
bare `Link` when a test needs the exact message order. Certificates are made here by
`coordinator.pki.authority`; a "re-enrollment" is a new key signed by the CA, pinned one roster
version up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.pki import authority as pki
from coordinator.runtime.hub import Hub
from protos import federation_pb2 as pb
from secagg.identity import Roster
from silo_agent.config import load_silo_config
from silo_agent.runtime.runner import SiloRunner
from silo_agent.storage.ledger import LEDGER_FILENAME
from silo_agent.storage.ledger_verify import read_ledger
from silo_agent.transport.connection import Link, TlsMaterial
from tests.federation_helpers import (
    RECORDING_SPEC,
    RECORDING_TASK,
    Federation,
    SiloFiles,
    coordinator_in_process,
    provision,
    write_coordinator_config,
    write_silo_config,
)
from tests.test_roster_update import FED, reenroll

QUIET_S = 0.3  # how long "nothing else arrives" is watched, in units
WAIT_S = 20.0


@dataclass
class Coordinator:
    fed: Federation
    hub: Hub
    port: int


@contextmanager
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    fed = provision(tmp_path / "fed", FED, ["a", "b", "c"])
    cfg = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=tmp_path / "coord",
        task_spec=RECORDING_SPEC,
        rounds=1,
        min_silos=3,
    )
    with coordinator_in_process(cfg, finished=False) as running:
        yield Coordinator(fed, running.hub, running.port)


@contextmanager
def link(
    port: int, silo: SiloFiles, pinned: Roster
) -> Iterator[queue.Queue[pb.CoordinatorMessage]]:
    """A bare stream for `silo` whose hello pins `pinned`; what arrives is put in the queue."""
    tls = TlsMaterial(silo.ca_cert.read_bytes(), silo.cert.read_bytes(), silo.key.read_bytes())
    conn = Link(f"127.0.0.1:{port}", tls, server_name="localhost")
    hello = pb.Hello(silo_id=f"spiffe://{FED}/silo/{silo.name}", roster_digest=pinned.digest())
    inbox: queue.Queue[pb.CoordinatorMessage] = queue.Queue()

    def read() -> None:
        try:
            for message in conn.open(hello):
                inbox.put(message)
        except Exception:  # noqa: BLE001 - the stream ends when the test closes it
            return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield inbox
    finally:
        conn.close()
        reader.join(10)


def first_messages(
    inbox: queue.Queue[pb.CoordinatorMessage], n: int, within_s: float
) -> list[pb.CoordinatorMessage]:
    """The first `n` messages (fewer if `within_s` runs out)."""
    found: list[pb.CoordinatorMessage] = []
    deadline = time.monotonic() + within_s
    while len(found) < n and (left := deadline - time.monotonic()) > 0:
        try:
            message = inbox.get(timeout=left)
        except queue.Empty:
            break
        found.append(message)
    return found


def kinds(messages: list[pb.CoordinatorMessage]) -> list[str]:
    return [str(m.WhichOneof("kind")) for m in messages]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def runner(tmp_path: Path, silo: SiloFiles, port: int) -> Iterator[SiloRunner]:
    """The real silo runner for `silo`, connected in a thread until the block ends."""
    toml = write_silo_config(
        tmp_path / f"{silo.name}.toml",
        silo,
        port=port,
        task_spec=RECORDING_SPEC,
        options={"silo_index": 0, "num_examples": 1, "record_dir": str(tmp_path / "sent")},
    )
    config = load_silo_config(toml)
    silo_id = f"spiffe://{FED}/silo/{silo.name}"
    r = SiloRunner(config, RECORDING_TASK, RECORDING_TASK.load_data(config.task_options), silo_id)
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.request_stop()
        thread.join(15)
        assert not thread.is_alive()


def _roster(path: Path) -> Roster:
    return Roster.from_json(path.read_text())


def test_a_silo_pinning_an_older_roster_gets_the_signed_one_right_after_welcome(
    tmp_path: Path,
) -> None:
    with coordinator(tmp_path) as c:
        silo = c.fed.silos["a"]
        pinned = _roster(silo.roster)
        reenroll(c.fed.root, tmp_path / "site-c", "c")  # the coordinator's roster: v4, signed
        with link(c.port, silo, pinned) as inbox:
            got = first_messages(inbox, 2, WAIT_S)
        assert kinds(got) == ["welcome", "roster_update"]
        update = got[1]
        assert update.roster_update.roster_json == c.fed.roster.read_bytes()
        signature = pki.roster_signature_path(c.fed.roster).read_bytes()
        assert update.roster_update.signature == signature
        # A silo pinning the coordinator's roster gets none.
        with link(c.port, c.fed.silos["b"], _roster(c.fed.roster)) as inbox:
            assert kinds(first_messages(inbox, 2, 6 * QUIET_S)) == ["welcome"]


def test_the_runner_adopts_the_roster_and_its_next_round_uses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with coordinator(tmp_path) as c:
        silo = c.fed.silos["a"]
        reenroll(c.fed.root, tmp_path / "site-c", "c")
        with runner(tmp_path, silo, c.port) as r:
            assert r._secagg_credentials()[1].roster.version == 3  # read before the update
            wait_until(lambda: r._credentials is None, "the runner to drop its pinned roster")
            assert r._secagg_credentials()[1].roster.version == 4
        assert silo.roster.read_bytes() == c.fed.roster.read_bytes()
        ledger = read_ledger(silo.dir / "state" / LEDGER_FILENAME)
        assert [(e.message, e.details["to_version"]) for e in ledger] == [("RosterAdopted", 4)]
        assert "adopted roster version 4 (was 3): added 0, changed 1, removed 0" in caplog.text
        assert "sending the signed roster" in caplog.text


def test_a_changed_roster_goes_to_every_connected_silo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with coordinator(tmp_path) as c:
        a, c_files = c.fed.silos["a"], c.fed.silos["c"]
        with runner(tmp_path, a, c.port):
            wait_until(lambda: "silo connected: spiffe://rup/silo/a" in caplog.text, "a to connect")
            # c re-enrolls while a is connected; c comes back with its new identity and the new
            # roster, and its connection makes the coordinator reload the roster file.
            roster = reenroll(c.fed.root, c_files.dir, "c")
            pki.write_public(c_files.roster, c.fed.roster.read_bytes())
            with link(c.port, c_files, roster) as inbox:
                assert kinds(first_messages(inbox, 1, WAIT_S)) == ["welcome"]
                wait_until(lambda: _roster(a.roster).version == 4, "a to adopt roster v4")
        assert "sent the signed roster version 4 to 1 connected silos" in caplog.text


def test_an_unsigned_roster_is_not_sent_and_the_coordinator_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with coordinator(tmp_path) as c:
        silo = c.fed.silos["a"]
        pinned = _roster(silo.roster)
        reenroll(c.fed.root, tmp_path / "site-c", "c")
        pki.roster_signature_path(c.fed.roster).unlink()
        with link(c.port, silo, pinned) as inbox:
            assert kinds(first_messages(inbox, 2, 6 * QUIET_S)) == ["welcome"]
        assert "roster version 4 cannot be sent to silos" in caplog.text
        assert "sign-roster" in caplog.text

"""Acceptance 3: real mTLS on loopback; each bad peer is refused with a status code and a log
line naming the cause, while a legitimate silo keeps completing rounds.

One coordinator (a process, `--keep-serving` not needed: it has far more rounds than the module
uses) and one legitimate silo agent serve the whole module. TLS-level refusals (foreign CA,
expired certificate, plain TCP) happen inside grpc: the client sees UNAVAILABLE, the coordinator
log carries grpc's handshake error, and the silo agent's own pre-flight check names the cause
before it dials. Application-level refusals (not on the roster, revoked, claiming another silo's
id) are PERMISSION_DENIED with a sentence the operator can act on, logged by the coordinator.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.identity import silo_id_for
from silo_agent.transport.connection import Link, LinkError, TlsMaterial
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    Proc,
    Processes,
    SiloFiles,
    add_to_roster,
    first_reply,
    issue_silo_cert,
    make_ca,
    provision,
    revoke,
    rounds_go_on,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e

FED = "mtls"
UTC = dt.UTC


@dataclass
class World:
    tmp: Path
    fed: Federation
    port: int
    coordinator: Proc
    good: Proc
    procs: Processes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("mtls")
    fed = provision(tmp / "fed", FED, ["good", "spy", "revokee"])
    state = tmp / "coord"
    cfg = write_coordinator_config(
        tmp / "c.toml",
        fed,
        state_dir=state,
        task_spec=RECORDING_SPEC,
        rounds=100_000,
        min_silos=1,
        train={"sleep_s": 0.2},
    )
    procs = Processes(tmp / "logs")
    try:
        coordinator = procs.coordinator(cfg)
        port = wait_for_port(state, coordinator)
        good = procs.silo("good", _silo_toml(tmp, fed.silos["good"], port))
        good.wait_for_log(r"round \d+ completed", 60)
        yield World(tmp, fed, port, coordinator, good, procs)
    finally:
        procs.stop_all()


def _silo_toml(tmp: Path, silo: SiloFiles, port: int) -> Path:
    return write_silo_config(
        tmp / f"{silo.name}-{silo.dir.name}.toml",
        silo,
        port=port,
        task_spec=RECORDING_SPEC,
        options={"silo_index": 0, "num_examples": 5, "record_dir": str(tmp / "sent" / silo.name)},
    )


def _legit_keeps_going(world: World) -> None:
    """The legitimate silo completes at least one more round after the refusal."""
    rounds_go_on(world.coordinator, world.procs, more=1, timeout_s=30, counted_by=world.good)


def _dial(
    world: World, files: SiloFiles, claimed_id: str | None = None
) -> pb.CoordinatorMessage | BaseException:
    """Open a stream with `files`' key and certificate: its welcome, or the error it ends with
    (a stream claiming another silo's id is read past its welcome)."""
    tls = TlsMaterial(
        ca_pem=world.fed.ca_cert.read_bytes(),
        cert_pem=files.cert.read_bytes(),
        key_pem=files.key.read_bytes(),
    )
    link = Link(f"127.0.0.1:{world.port}", tls, server_name="localhost")
    hello = pb.Hello(silo_id=claimed_id or silo_id_for(FED, files.name))
    return first_reply(
        link, hello, until=lambda m: m.WhichOneof("kind") == "welcome" and claimed_id is None
    )


def _attempt(world: World, files: SiloFiles, claimed_id: str | None = None) -> LinkError:
    """The error a stream with `files`' key and certificate ends with."""
    error = _dial(world, files, claimed_id)
    assert isinstance(error, LinkError), f"expected a refusal, got {error!r}"
    return error


def _bad_cert(
    world: World, label: str, *, other_ca: bool = False, expired: bool = False, name: str = "good"
) -> SiloFiles:
    now = dt.datetime.now(UTC)
    ca_cert, ca_key = world.fed.ca_cert, world.fed.ca_key
    if other_ca:
        ca_cert, ca_key = make_ca(world.tmp / f"ca-{label}", FED, now)
    begin, end = (
        (now - dt.timedelta(days=3), now - dt.timedelta(days=1))
        if expired
        else (now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    )
    files = issue_silo_cert(
        ca_cert,
        ca_key,
        world.tmp / label,
        federation_id=FED,
        name=name,
        not_before=begin,
        not_after=end,
    )
    # the silo keeps the federation's CA and roster pinned, as an enrolled silo would
    (files.dir / "ca.pem").write_bytes(world.fed.ca_cert.read_bytes())
    files.roster.write_text(world.fed.roster.read_text())
    return files


def _agent_refuses(world: World, files: SiloFiles, cause: str) -> None:
    """The silo agent itself names the cause and exits 3 (refused) without dialing."""
    proc = world.procs.silo(files.dir.name, _silo_toml(world.tmp, files, world.port))
    assert proc.wait(60) == 3, proc.log()
    assert re.search(cause, proc.log()), proc.log()


def test_certificate_from_another_ca(world: World) -> None:
    files = _bad_cert(world, "foreign", other_ca=True)
    error = _attempt(world, files)
    assert error.code == "UNAVAILABLE"
    # OpenSSL names it by how the foreign CA differs: same subject name -> bad signature,
    # another name -> no such issuer. Either way the line names the certificate chain.
    world.coordinator.wait_for_log(
        r"Handshake failed.*(certificate signature failure|unable to get local issuer)", 10
    )
    _agent_refuses(world, files, r"refusing to dial.*not signed by the federation CA")
    _legit_keeps_going(world)


def test_valid_certificate_not_on_roster(world: World) -> None:
    files = _bad_cert(world, "outsider", name="outsider")
    error = _attempt(world, files)
    assert error.code == "PERMISSION_DENIED"
    assert "not on the roster" in error.detail
    world.coordinator.wait_for_log(
        r"refused connection from .*: certificate of spiffe://mtls/silo/outsider belongs to a "
        r"silo that is not on the roster",
        10,
    )
    _legit_keeps_going(world)


def test_expired_certificate(world: World) -> None:
    files = _bad_cert(world, "expired", expired=True)
    error = _attempt(world, files)
    assert error.code == "UNAVAILABLE"
    world.coordinator.wait_for_log(r"Handshake failed.*certificate has expired", 10)
    _agent_refuses(world, files, r"refusing to dial.*has expired")
    _legit_keeps_going(world)


def test_revoked_certificate_takes_effect_without_restart(world: World) -> None:
    files = world.fed.silos["revokee"]
    first = _attempt_welcomed(world, files)
    assert first == "welcomed"
    revoke(world.fed, files)
    error = _attempt(world, files)
    assert error.code == "PERMISSION_DENIED"
    assert "revoked" in error.detail
    world.coordinator.wait_for_log(
        r"refused connection from .*: certificate of spiffe://mtls/silo/revokee has been revoked",
        10,
    )
    # the real agent reports the coordinator's refusal and stops trying
    proc = world.procs.silo("revokee", _silo_toml(world.tmp, files, world.port))
    assert proc.wait(60) == 3, proc.log()
    assert "coordinator refused this silo (PERMISSION_DENIED)" in proc.log()
    assert "revoked" in proc.log()
    _legit_keeps_going(world)


def _attempt_welcomed(world: World, files: SiloFiles) -> str:
    outcome = _dial(world, files)
    if isinstance(outcome, LinkError):
        return "refused"
    assert isinstance(outcome, pb.CoordinatorMessage), f"neither welcomed nor refused: {outcome!r}"
    return "welcomed"


def test_plain_connection(world: World) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{world.port}")
    try:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Connect(iter([pb.SiloMessage(hello=pb.Hello())]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    world.coordinator.wait_for_log(r"Handshake failed.*WRONG_VERSION_NUMBER", 10)
    _legit_keeps_going(world)


def test_silo_claiming_another_silos_id(world: World) -> None:
    spy = world.fed.silos["spy"]
    error = _attempt(world, spy, claimed_id=silo_id_for(FED, "good"))
    assert error.code == "PERMISSION_DENIED"
    assert "a silo may only speak for itself" in error.detail
    world.coordinator.wait_for_log(
        r"refused connection from .*: hello claims silo id spiffe://mtls/silo/good but the "
        r"certificate is spiffe://mtls/silo/spy",
        10,
    )
    _legit_keeps_going(world)


def test_roster_addition_takes_effect_without_restart(world: World) -> None:
    files = _bad_cert(world, "newcomer", name="newcomer")
    assert _attempt(world, files).code == "PERMISSION_DENIED"
    add_to_roster(world.fed, files)
    assert _attempt_welcomed(world, files) == "welcomed"


def test_health_service_answers_over_mtls(world: World) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    files = world.fed.silos["spy"]
    creds = grpc.ssl_channel_credentials(
        world.fed.ca_cert.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{world.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="silofed.v1.Federation"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()

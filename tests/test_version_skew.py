"""Version skew: the wire version a silo announces in its hello, and what the coordinator admits.

The rule (silofed.wire) is checked first as a pure function, then against a running coordinator
over real mTLS on loopback. One build speaks one version, so the running federation is made of
builds that differ only in their version constants, set before the real entry point runs (what
an older or newer release would be on the wire). With this build at 1.m: the coordinator is a
later build speaking 1.(m+2) and admitting minors from 1.(m+1); silos a and b speak 1.(m+1), an
older compatible minor, and must take part in rounds; silo c is this build's own agent (1.m,
below the coordinator's oldest minor) and must be refused and exit. Raw clients with an enrolled
silo's certificate announce another major, no version at all, or a newer minor.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from secagg.identity import silo_id_for
from silo_agent.transport.connection import Link, LinkError
from silofed.wire import OLDEST_WIRE_MINOR, WIRE_VERSION, WireVersion, wire_refusal
from tests.federation_helpers import (
    ROUND_COMPLETED,
    FederationRun,
    Proc,
    federation_run,
    first_reply,
    rounds_go_on,
    silo_channel,
    silo_tls,
)

# ---- the rule ---------------------------------------------------------------------------------

V1_2 = WireVersion(1, 2)


def test_this_build_admits_its_own_version() -> None:
    assert WIRE_VERSION.minor >= OLDEST_WIRE_MINOR
    assert wire_refusal(str(WIRE_VERSION), "silofed-silo/x") is None
    assert WireVersion.parse(str(WIRE_VERSION)) == WIRE_VERSION


@pytest.mark.parametrize("text", ["", "1", "1.", ".1", "1.2.3", "v1.2", "01.2", "1.-2", " 1.2"])
def test_a_version_is_two_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        WireVersion.parse(text)


@pytest.mark.parametrize("announced", ["1.1", "1.2", "1.3", "1.99"])
def test_the_same_major_from_the_oldest_minor_on_is_admitted(announced: str) -> None:
    assert wire_refusal(announced, "a", ours=V1_2, oldest_minor=1) is None


@pytest.mark.parametrize(
    ("announced", "expected"),
    [
        ("2.0", r"2\.0 .*this coordinator 1\.2: different major .*upgrade the coordinator"),
        ("0.9", r"0\.9 .*this coordinator 1\.2: different major .*upgrade the silo agent"),
        ("1.0", r"1\.0 .*this coordinator 1\.2, which admits silos of wire version 1\.1 or newer"),
        ("", r"announces no wire version .*predates .*speaks wire version 1\.2 .*1\.1 to 1\.x"),
        ("1.x", r"'1\.x' .*not MAJOR\.MINOR; this coordinator speaks wire version 1\.2"),
    ],
)
def test_other_versions_are_refused_naming_both(announced: str, expected: str) -> None:
    silo = "spiffe://f/silo/x"
    why = wire_refusal(announced, "silofed-silo/0.1", silo=silo, ours=V1_2, oldest_minor=1)
    assert why is not None and re.search(expected, why), why
    assert "silofed-silo/0.1" in why and silo in why


# ---- against a running coordinator ------------------------------------------------------------

E2E = pytest.mark.e2e
FED = "skew"
MAJOR = WIRE_VERSION.major
LATER = WireVersion(MAJOR, WIRE_VERSION.minor + 2)  # the coordinator's build
OLDEST = WIRE_VERSION.minor + 1  # the oldest minor it admits
OLDER = WireVersion(MAJOR, OLDEST)  # silos a and b: older than the coordinator, still admitted
NAMES = ("a", "b", "c", "d")
COMPATIBLE = ("a", "b")  # announce 1.1

# Runs `python -m <module>` as a build whose wire constants are these (argv passed through).
AS_BUILD = """
import runpy, sys
from silofed import wire
wire.WIRE_VERSION = wire.WireVersion({major}, {minor})
wire.OLDEST_WIRE_MINOR = {oldest}
sys.argv = [{module!r}, *sys.argv[1:]]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def _re(version: WireVersion) -> str:
    return re.escape(str(version))


def _as_build(module: str, version: WireVersion, oldest: int) -> list[str]:
    code = AS_BUILD.format(major=version.major, minor=version.minor, oldest=oldest, module=module)
    return ["-c", code]


@dataclass
class World:
    run: FederationRun
    coordinator: Proc
    silos: dict[str, Proc]


def _silo_argv(run: FederationRun, name: str, version: WireVersion) -> list[str]:
    """`silo_agent run` for RECORDING_TASK silo `name`, as a build speaking `version`."""
    config = run.recording_silo_config(name, 5)
    return [*_as_build("silo_agent", version, OLDEST), "run", "--config", str(config)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with federation_run(tmp_path_factory.mktemp("skew"), FED, NAMES) as run:
        config = run.endless_config(min_silos=2)
        argv = [*_as_build("coordinator", LATER, OLDEST), "serve", "--config", str(config)]
        coordinator = run.procs.start("coordinator", argv)
        run.listening(coordinator)
        silos = {
            name: run.procs.start(f"silo-{name}", _silo_argv(run, name, OLDER))
            for name in COMPATIBLE
        }
        coordinator.wait_for_log(ROUND_COMPLETED, 180)
        yield World(run, coordinator, silos)


def _rounds_go_on(world: World, more: int = 2) -> None:
    rounds_go_on(world.coordinator, world.run.procs, more=more)


def _dial(world: World, name: str, wire_version: str) -> pb.CoordinatorMessage | BaseException:
    """Say hello as silo `name` announcing `wire_version`: the first message, or the refusal."""
    files = world.run.fed.silos[name]
    link = Link(f"127.0.0.1:{world.run.port}", silo_tls(files), server_name="localhost")
    hello = pb.Hello(
        silo_id=silo_id_for(FED, name), agent_version="skew-test", wire_version=wire_version
    )
    return first_reply(link, hello)


@E2E
def test_silos_of_an_older_compatible_minor_take_part(world: World) -> None:
    _rounds_go_on(world, more=1)
    for name in COMPATIBLE:
        silo = world.silos[name]
        silo.wait_for_log(r"round \d+ completed with 2 silos \(included us\)", 60)
        assert silo.popen.poll() is None, silo.log()[-3000:]
        world.coordinator.wait_for_log(
            rf"silo/{name} speaks wire version {_re(OLDER)} \(agent '[^']+'\), this coordinator "
            rf"{_re(LATER)}: compatible, admitted",
            10,
        )


@E2E
def test_a_newer_minor_is_welcomed(world: World) -> None:
    first = _dial(world, "d", f"{MAJOR}.{LATER.minor + 7}")
    assert isinstance(first, pb.CoordinatorMessage), first
    assert first.WhichOneof("kind") == "welcome", first
    assert first.welcome.silo_id == silo_id_for(FED, "d")


@E2E
def test_another_major_is_refused_with_both_versions(world: World) -> None:
    started = time.monotonic()
    other = f"{MAJOR + 1}.0"
    refusals = [_dial(world, "d", other) for _ in range(4)]
    elapsed = time.monotonic() - started
    for refusal in refusals:
        assert isinstance(refusal, LinkError), refusal
        assert refusal.code == "FAILED_PRECONDITION" and refusal.fatal, refusal
        assert re.search(
            rf"silo/d speaks wire version {re.escape(other)} \(agent 'skew-test'\) and this "
            rf"coordinator {_re(LATER)}: different major versions cannot interoperate; upgrade "
            "the coordinator",
            refusal.detail,
        ), refusal.detail
    # Logged by the coordinator, rate-limited per peer like its other refusals.
    log = world.coordinator.log()
    lines = re.findall(rf"refused connection from .*wire version {re.escape(other)} .*", log)
    assert lines, world.coordinator.log()[-3000:]
    if elapsed < 9:  # all four inside one 10 s interval: one line stands for them
        assert len(lines) == 1, lines
    _rounds_go_on(world)


@E2E
def test_a_hello_without_a_wire_version_is_refused(world: World) -> None:
    """A raw stub (Link would fill the version in): a hello as agents before this change sent."""
    hello = pb.Hello(silo_id=silo_id_for(FED, "d"), agent_version="silofed-silo/0.0")
    with silo_channel(world.run.fed.silos["d"], world.run.port) as channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Connect(iter([pb.SiloMessage(hello=hello)]), timeout=15))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = info.value.details() or ""
    expected = f"the hello of {silo_id_for(FED, 'd')} announces no wire version (agent "
    assert f"{expected}'silofed-silo/0.0')" in detail, detail
    assert f"this coordinator speaks wire version {LATER}" in detail, detail
    _rounds_go_on(world)


@E2E
def test_an_agent_below_the_oldest_minor_is_refused_and_exits(world: World) -> None:
    """This build's own agent against a coordinator that admits only later minors: it logs the
    coordinator's refusal with both versions and exits 3 (retrying cannot help)."""
    silo = world.run.procs.silo("c", world.run.recording_silo_config("c", 5))
    assert silo.wait(60) == 3, silo.log()[-3000:]
    silo.wait_for_log(
        rf"coordinator refused this silo \(FAILED_PRECONDITION\): spiffe://{FED}/silo/c speaks "
        "wire version "
        rf"{_re(WIRE_VERSION)} \(agent '[^']+'\) and this coordinator {_re(LATER)}, which "
        rf"admits silos of wire version {_re(OLDER)} or newer: upgrade the silo agent",
        5,
    )
    world.coordinator.wait_for_log(
        rf"refused connection from .*: spiffe://{FED}/silo/c speaks wire version "
        rf"{_re(WIRE_VERSION)} ",
        5,
    )
    _rounds_go_on(world)

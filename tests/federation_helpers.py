"""Start a real federation for tests: certificates, TOML configs, processes, logs, clean stop.

Rule: everything a test starts is tracked here and stopped in `finally` by PID (SIGTERM, then
SIGKILL after a grace period); every wait is bounded in time. Processes run the real console
entry points (`python -m coordinator serve`, `python -m silo_agent run`) with PYTHONPATH set to
the repository root, and write their logs to files the test can read and print on failure.

Certificates come from `coordinator.pki.authority.provision_dev`; `make_ca` and `issue_silo_cert`
make
the deliberately bad ones (expired, foreign CA, not on the roster) with `cryptography` directly.

Coordinator and silo processes import this module for `RECORDING_TASK`, so what only tests use
(the coordinator's modules for `check_fedavg`, `coordinator_in_process` and its CLI) is imported
inside the functions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secagg.identity import Roster, silo_id_for, spki_sha256
from tests import launcher
from tests.secagg.pki import self_signed

if TYPE_CHECKING:
    import grpc
    import pytest

    from coordinator.config import SecAggSettings
    from coordinator.pki.authority import CA
    from coordinator.runtime.hub import Hub
    from coordinator.storage.roundlog import RoundDetail
    from coordinator.transport.server import RunningServer
    from protos import federation_pb2 as pb
    from silo_agent.pki.renewal import RenewResult
    from silo_agent.transport.connection import Link, TlsMaterial

REPO = Path(__file__).resolve().parents[1]
UTC = dt.UTC


# ---- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiloFiles:
    name: str
    dir: Path
    key: Path
    cert: Path
    ca_cert: Path
    roster: Path


@dataclass(frozen=True)
class Federation:
    """Paths of a provisioned federation (the layout of the PKI contract)."""

    root: Path
    federation_id: str
    ca_cert: Path
    ca_key: Path
    coordinator_cert: Path
    coordinator_key: Path
    roster: Path
    revoked: Path
    silos: dict[str, SiloFiles] = field(default_factory=dict)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def make_ca(directory: Path, federation_id: str, now: dt.datetime) -> tuple[Path, Path]:
    """A self-signed P-256 CA in `directory` (ca.pem, ca.key)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation_id} test CA")])
    key, cert = self_signed(name, now - dt.timedelta(days=1), now + dt.timedelta(days=30), ca=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", key)
    return directory / "ca.pem", directory / "ca.key"


def issue_silo_cert(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    *,
    federation_id: str,
    name: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> SiloFiles:
    """A silo key + certificate signed by the given CA (validity as asked, even in the past)."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(silo_id_for(federation_id, name))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(_load_key(ca_key), hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_key(out_dir / "silo.key", key)
    (out_dir / "silo.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out_dir / "ca.pem").write_bytes(ca_cert.read_bytes())
    return SiloFiles(
        name,
        out_dir,
        out_dir / "silo.key",
        out_dir / "silo.pem",
        out_dir / "ca.pem",
        out_dir / "roster.json",
    )


def provision(root: Path, federation_id: str, names: Sequence[str]) -> Federation:
    """A dev federation under `root`, made by `coordinator.pki.authority.provision_dev`."""
    from coordinator.pki.authority import provision_dev

    dev = provision_dev(root, federation_id, list(names), now=dt.datetime.now(UTC))
    return Federation(
        root=root,
        federation_id=federation_id,
        ca_cert=dev.ca_cert,
        ca_key=dev.ca_key,
        coordinator_cert=dev.coordinator_cert,
        coordinator_key=dev.coordinator_key,
        roster=dev.roster,
        revoked=dev.revoked,
        silos={
            n: SiloFiles(n, p.dir, p.key, p.cert, p.ca_cert, p.roster) for n, p in dev.silos.items()
        },
    )


def holds_within(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `condition()` holds within `timeout_s` (polled every 50 ms; looked at once more
    at the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def serve_scripted(
    servicer: object, fed: Federation, silo: str
) -> tuple[RunningServer, TlsMaterial]:
    """Serve `servicer` (a scripted coordinator: a FederationServicer with `stream_capacity`)
    over real mTLS on loopback with the federation's coordinator certificate; also returns the
    TLS material `silo`'s Link dials it with."""
    from coordinator.transport.server import start_server
    from silo_agent.transport.connection import TlsMaterial

    running = start_server(
        servicer,  # type: ignore[arg-type]
        listen="127.0.0.1:0",
        ca_cert=fed.ca_cert,
        cert=fed.coordinator_cert,
        key=fed.coordinator_key,
    )
    files = fed.silos[silo]
    tls = TlsMaterial(fed.ca_cert.read_bytes(), files.cert.read_bytes(), files.key.read_bytes())
    return running, tls


def add_to_roster(fed: Federation, silo: SiloFiles) -> None:
    """Pin `silo` in the coordinator's roster and the silo's copy."""
    roster = Roster.from_json(fed.roster.read_text())
    cert = x509.load_pem_x509_certificate(silo.cert.read_bytes())
    roster = roster.with_silo(silo_id_for(fed.federation_id, silo.name), spki_sha256(cert))
    fed.roster.write_text(roster.to_json())
    silo.roster.write_text(roster.to_json())


def revoke(fed: Federation, silo: SiloFiles) -> None:
    """Append `silo`'s certificate serial to revoked.json (the PKI contract's format)."""
    cert = x509.load_pem_x509_certificate(silo.cert.read_bytes())
    data: dict[str, Any] = {"revoked": []}
    if fed.revoked.exists():
        data = json.loads(fed.revoked.read_text())
    data["revoked"].append(
        {
            "serial": f"{cert.serial_number:x}",
            "silo_id": silo_id_for(fed.federation_id, silo.name),
            "revoked_at": dt.datetime.now(UTC).isoformat(),
            "reason": "test",
        }
    )
    fed.revoked.write_text(json.dumps(data))


def reissue_expiring(
    fed: Federation,
    name: str,
    *,
    days: float = 2.0,
    issuer: CA | None = None,
    chain: bool = False,
) -> x509.Certificate:
    """Re-certify silo `name`'s enrolled key (its CSR from provisioning) by the federation CA, or
    `issuer`: issued 28 days ago, expiring in `days` (a renewal is due). The silo's certificate
    file gets it, followed by `issuer`'s certificate when `chain`. Returns the new leaf."""
    from coordinator.pki import authority as pki

    ca = issuer or pki.load_ca(fed.root, fed.federation_id)
    silo = fed.silos[name]
    now = dt.datetime.now(UTC)
    leaf = pki.sign_csr(
        ca,
        (silo.dir / "silo.csr").read_bytes(),
        federation_id=fed.federation_id,
        now=now,
        not_before=now - dt.timedelta(days=28),
        not_after=now + dt.timedelta(days=days),
    )
    silo.cert.write_bytes(pki.chain_pem(ca, leaf) if chain else leaf)
    return x509.load_pem_x509_certificate(leaf)


# ---- configs ----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A flat TOML writer for our configs (tables of scalars)."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_coordinator_config(
    path: Path,
    fed: Federation,
    *,
    state_dir: Path,
    task_spec: str,
    rounds: int,
    min_silos: int,
    offer_s: float = 30.0,
    train_s: float = 60.0,
    train: Mapping[str, Any] | None = None,
    start_timeout_s: float = 60.0,
    start_silos: int | None = None,
    listen: str = "127.0.0.1:0",
    aggregation: str = "plaintext-insecure",
    secagg: Mapping[str, Any] | None = None,
    deadlines: Mapping[str, float] | None = None,
    rounds_extra: Mapping[str, Any] | None = None,
) -> Path:
    """A coordinator config; `secagg` is the [secagg] table, `deadlines` extra [deadlines] keys,
    `rounds_extra` extra [rounds] keys."""
    tables: dict[str, Mapping[str, Any]] = {
        "federation": {"id": fed.federation_id, "state_dir": state_dir},
        "server": {"listen": listen},
        "tls": {
            "ca_cert": fed.ca_cert,
            "cert": fed.coordinator_cert,
            "key": fed.coordinator_key,
            "roster": fed.roster,
            "revoked": fed.revoked,
        },
        "task": {"spec": task_spec},
        "rounds": {
            "count": rounds,
            "min_silos": min_silos,
            "aggregation": aggregation,
            "start_timeout_s": start_timeout_s,
            "start_silos": start_silos or min_silos,
            **(rounds_extra or {}),
        },
        "deadlines": {
            "offer_s": offer_s,
            "train_s": train_s,
            **(deadlines or {}),
        },
        "train": dict(train or {}),
    }
    if secagg is not None:
        tables["secagg"] = dict(secagg)
    path.write_text(to_toml(tables))
    return path


def write_silo_config(
    path: Path,
    silo: SiloFiles,
    *,
    port: int,
    task_spec: str,
    options: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
    allow_plaintext_insecure: bool = True,
    pause_after_phase: str | None = None,
    pause_in_round: int | None = None,
    keep_final_model: bool = False,
    allow_example_weighting: bool = False,
) -> Path:
    """A silo config; the tests' plaintext-baseline federations need the insecure opt-in, and
    secure rounds with `weighting = "examples"` the silos' opt-in."""
    silo_table: dict[str, Any] = {"name": silo.name, "state_dir": state_dir or silo.dir / "state"}
    if keep_final_model:
        silo_table["keep_final_model"] = True
    tables: dict[str, Mapping[str, Any]] = {
        "silo": silo_table,
        "coordinator": {"address": f"127.0.0.1:{port}", "server_name": "localhost"},
        "tls": {"ca_cert": silo.ca_cert, "cert": silo.cert, "key": silo.key, "roster": silo.roster},
        "task": {"spec": task_spec},
        "task.options": dict(options or {}),
        # Short: a silo often starts before its coordinator listens (FederationRun).
        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
        "secagg": {
            "allow_plaintext_insecure": allow_plaintext_insecure,
            "allow_example_weighting": allow_example_weighting,
        },
    }
    if pause_after_phase is not None:
        debug: dict[str, Any] = {"pause_after_phase": pause_after_phase}
        if pause_in_round is not None:
            debug["pause_in_round"] = pause_in_round
        tables["debug"] = debug
    path.write_text(to_toml(tables))
    return path


def write_recording_silo_config(
    path: Path,
    fed: Federation,
    name: str,
    *,
    port: int,
    num_examples: int,
    record_root: Path,
    **config: Any,
) -> Path:
    """A config for silo `name` running RECORDING_TASK: `silo_index` is the silo's place in the
    federation, its updates go to `<record_root>/<name>`; `config` are further
    `write_silo_config` arguments."""
    options = {
        "silo_index": list(fed.silos).index(name),
        "num_examples": num_examples,
        "record_dir": str(record_root / name),
    }
    return write_silo_config(
        path, fed.silos[name], port=port, task_spec=RECORDING_SPEC, options=options, **config
    )


def with_table(path: Path, table: str) -> Path:
    """The config at `path` with `table` (TOML text) appended; returns `path`."""
    path.write_text(path.read_text() + "\n" + table)
    return path


def auto_renew_table(issuing_cert: Path, issuing_key: Path) -> str:
    """A coordinator's `[pki]`: renewals signed at once by this issuing CA, for 30 days."""
    return (
        f'[pki]\nauto_renew = true\nissuing_cert = "{issuing_cert}"\n'
        f'issuing_key = "{issuing_key}"\nrenew_valid_days = 30\n'
    )


# A silo's `[pki]`: it asks for a renewal when its certificate expires within ten days.
RENEW_BEFORE_10_DAYS = "[pki]\nrenew_before_days = 10\n"

# Secure aggregation of four silos weighted by their example counts: t = 3 with one assumed
# colluder (a round completes without one of them), clip_l2 far above RecordingTask's updates.
# The silos opt in to that weighting with WEIGHTED_SILO (write_silo_config arguments).
WEIGHTED_SECAGG: dict[str, Any] = {
    "clip_l2": 100.0,
    "threshold": 3,
    "n_colluders": 1,
    "weight_max": 40,
    "weighting": "examples",
}
WEIGHTED_SILO: dict[str, Any] = {"allow_plaintext_insecure": False, "allow_example_weighting": True}


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes] | launcher.LaunchedProcess
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Wait until the log matches `pattern`. Raises AssertionError with the log on timeout."""
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.log())
            if m:
                return m
            if self.popen.poll() is not None:
                m = rx.search(self.log())
                if m:
                    return m
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before logging {pattern!r}:\n"
                    + self.log()[-4000:]
                )
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name} did not log {pattern!r} in {timeout_s}s:\n" + self.log()[-4000:]
        )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["PYTHONUNBUFFERED"] = "1"
    # `serve` turns grpc's verbosity to INFO itself (handshake failures name their cause there);
    # an inherited setting would override that.
    env.pop("GRPC_VERBOSITY", None)
    env.update(extra or {})
    return env


class Processes:
    """Starts processes and guarantees they are stopped (by PID) when the block exits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        popen: subprocess.Popen[bytes] | launcher.LaunchedProcess
        if launcher.enabled() and args[:1] == ["-m"]:
            status_dir = Path(tempfile.gettempdir()) / f"silofed-launcher-{os.getpid()}"
            popen = launcher.launch(list(args), child_env(env), REPO, log_path, status_dir)
        else:
            with log_path.open("ab") as fh:
                popen = subprocess.Popen(
                    [sys.executable, *args],
                    cwd=REPO,
                    env=child_env(env),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def coordinator(self, config: Path, *extra: str) -> Proc:
        return self.start(
            "coordinator", ["-m", "coordinator", "serve", "--config", str(config), *extra]
        )

    def silo(self, name: str, config: Path, *extra: str) -> Proc:
        return self.start(
            f"silo-{name}", ["-m", "silo_agent", "run", "--config", str(config), *extra]
        )

    def stop(self, proc: Proc, grace_s: float = 10.0) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        return proc.popen.wait(timeout=0)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process still running, then a wait for each (SIGKILL after the
        grace period): they shut down in parallel, not one after the other."""
        running = [p for p in reversed(self.procs) if p.popen.poll() is None]
        for proc in running:
            proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-3000:]}" for p in self.procs)


@contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


ROUND_COMPLETED = r"round \d+ completed"


def completed_rounds(proc: Proc) -> int:
    """How many completed rounds `proc` (a coordinator or a silo) has logged so far."""
    return len(re.findall(ROUND_COMPLETED, proc.log()))


def rounds_go_on(
    coordinator: Proc,
    procs: Processes,
    *,
    more: int = 2,
    timeout_s: float = 60.0,
    counted_by: Proc | None = None,
) -> None:
    """Waits until `more` further rounds have completed, counted in the log of `counted_by`
    (the coordinator's by default): the federation still works. AssertionError (with the logs)
    when the coordinator exits or the rounds do not come within `timeout_s`."""
    watched = counted_by or coordinator
    before = completed_rounds(watched)
    deadline = time.monotonic() + timeout_s
    while completed_rounds(watched) < before + more:
        assert coordinator.popen.poll() is None, coordinator.log()[-3000:]
        assert time.monotonic() < deadline, "rounds stopped completing:\n" + procs.logs()
        time.sleep(0.2)


def completed_round_details(state_dir: Path, count: int) -> list[RoundDetail]:
    """Every round in the coordinator's round log (`state_dir`/rounds.sqlite, read only),
    oldest first, once checked to be `count` rounds that all completed."""
    from coordinator.storage.roundlog import RoundLog

    log = RoundLog.open_readonly(state_dir / "rounds.sqlite")
    try:
        rounds = [log.round_detail(r.round_id) for r in log.rounds()]
    finally:
        log.close()
    assert [r.status.value for r in rounds] == ["completed"] * count, [
        (r.round_id, r.status.value, r.abort_reason) for r in rounds
    ]
    return rounds


def run_module(
    module: str, *args: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` as an operator runs it, output captured (not checked)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def run_rounds_command(
    argv: Sequence[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """`silofed-coordinator rounds ...` in this process, errors mapped to exit codes by the
    CLI's table: its exit code, stdout and stderr."""
    from coordinator.cli import PROGRAM

    code = PROGRAM.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@dataclass
class InProcessCoordinator:
    """A coordinator's hub and gRPC server in the test's own process; the test drives rounds."""

    hub: Hub
    port: int
    drivers: list[threading.Thread] = field(default_factory=list)

    def drive(self, rounds: Callable[[Hub], object]) -> threading.Event:
        """Run `rounds(hub)` in a daemon thread (joined when the block ends); the event is set
        once it has returned."""
        done = threading.Event()

        def run() -> None:
            rounds(self.hub)
            done.set()

        driver = threading.Thread(target=run, daemon=True)
        self.drivers.append(driver)
        driver.start()
        return done


@contextmanager
def coordinator_in_process(
    config_path: Path,
    *,
    on_receive: Callable[[str, pb.SiloMessage], None] | None = None,
    finished: bool = True,
) -> Iterator[InProcessCoordinator]:
    """The coordinator of `config_path` serving in this process, as `serve` builds it, with
    `on_receive` seeing every message a silo's stream delivers. On leaving: stop, close every
    stream (telling the silos the federation `finished`, or not), stop the server, join the
    drivers, close the round log."""
    from coordinator.config import load_coordinator_config
    from coordinator.runtime.hub import Hub
    from coordinator.transport.server import start_server
    from coordinator.transport.servicer import FederationServicer
    from silofed.task import load_model_factory

    config = load_coordinator_config(config_path)
    hub = Hub(config, model_factory=load_model_factory(config.task_spec))
    servicer = FederationServicer(hub, on_receive=on_receive)
    running = start_server(
        servicer,
        listen=config.listen,
        ca_cert=config.tls.ca_cert,
        cert=config.tls.cert,
        key=config.tls.key,
    )
    coordinator = InProcessCoordinator(hub, running.port)
    try:
        yield coordinator
    finally:
        hub.stopping.set()
        hub.close_all(finished=finished)
        running.stop()
        for driver in coordinator.drivers:
            driver.join(10)
        hub.roundlog.close()


def wait_for_port(state_dir: Path, coordinator: Proc, timeout_s: float = 60.0) -> int:
    """The port the coordinator bound (from state_dir/coordinator.port)."""
    path = state_dir / "coordinator.port"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        if coordinator.popen.poll() is not None:
            raise AssertionError(
                "coordinator exited before listening:\n" + coordinator.log()[-4000:]
            )
        time.sleep(0.05)
    raise AssertionError("coordinator did not write its port:\n" + coordinator.log()[-4000:])


# ---- speaking to a coordinator as a silo, over mTLS on loopback --------------------------------


def silo_tls(silo: SiloFiles) -> TlsMaterial:
    """Silo `silo`'s files as they are now, as the agent's Link presents them."""
    from silo_agent.transport.connection import TlsMaterial

    return TlsMaterial(silo.ca_cert.read_bytes(), silo.cert.read_bytes(), silo.key.read_bytes())


def mtls_channel(port: int, ca_cert: Path, cert: Path, key: Path) -> grpc.Channel:
    """A gRPC channel to 127.0.0.1:`port` presenting `cert` (a leaf, or leaf and chain) with
    `key`, trusting `ca_cert` for the coordinator's certificate (issued to localhost)."""
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def silo_channel(silo: SiloFiles, port: int) -> grpc.Channel:
    """`mtls_channel` with silo `silo`'s files as they are now."""
    return mtls_channel(port, silo.ca_cert, silo.cert, silo.key)


def first_reply(
    link: Link,
    hello: pb.Hello,
    *,
    until: Callable[[pb.CoordinatorMessage], bool] = lambda _: True,
    timeout_s: float = 15.0,
) -> pb.CoordinatorMessage | BaseException:
    """Open `link` with `hello` (from a thread, closed after at most `timeout_s`): the first
    message `until` accepts, or what the stream ended with (a refused one: LinkError).
    AssertionError when neither came."""
    outcome: list[pb.CoordinatorMessage | BaseException] = []

    def run() -> None:
        try:
            for message in link.open(hello):
                if until(message):
                    outcome.append(message)
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    link.close()
    assert outcome, f"the hello was neither answered nor refused within {timeout_s} s"
    return outcome[0]


def welcomed_as(silo: SiloFiles, port: int) -> str:
    """The silo id the Welcome names when silo `silo`'s files as they are now (and its pinned
    roster) open a stream to 127.0.0.1:`port`; LinkError when refused."""
    from protos import federation_pb2 as pb
    from silo_agent.transport.connection import Link

    link = Link(f"127.0.0.1:{port}", silo_tls(silo), server_name="localhost")
    try:
        roster = Roster.from_json(silo.roster.read_text())
        for message in link.open(pb.Hello(silo_id="", roster_digest=roster.digest())):
            if message.WhichOneof("kind") == "welcome":
                return str(message.welcome.silo_id)
        raise AssertionError("the stream ended without a welcome")
    finally:
        link.close()


def renew_as_agent(silo: SiloFiles, silo_toml: Path, port: int, now: float) -> RenewResult | None:
    """The agent's own renewal step (`renew_if_due` on the config `silo_toml`), once, over a
    channel with silo `silo`'s files as they are now."""
    from protos import federation_pb2_grpc as pb_grpc
    from silo_agent.config import load_silo_config
    from silo_agent.pki.renewal import renew_if_due

    with silo_channel(silo, port) as channel:
        stub = pb_grpc.FederationStub(channel)
        return renew_if_due(load_silo_config(silo_toml), stub.Renew, now=now)


# ---- one test's federation (the `federation` fixture) ----------------------------------------


# Ports handed out below the kernel's ephemeral range (32768 and up on Linux): the coordinator
# binds one seconds after it was found free, and in between any outgoing connection on this
# machine may be given an ephemeral port as its own.
PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def worker_ports(worker: str | None = None, workers: str | None = None) -> range:
    """This test process's share of PORTS: under pytest-xdist each worker (PYTEST_XDIST_WORKER
    "gw<i>" of PYTEST_XDIST_WORKER_COUNT) draws from its own slice, so two workers never hand
    out the same port between the check and the coordinator's bind; all of PORTS otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER") if worker is None else worker
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT") if workers is None else workers
    if not worker or not workers:
        return PORTS
    index, count = int(worker.removeprefix("gw")), int(workers)
    span = len(PORTS) // count
    return range(PORTS.start + index * span, PORTS.start + (index + 1) * span)


def free_port() -> int:
    """A loopback port free now, for a coordinator started together with its silos (they dial it
    before it listens and retry) or restarted where its silos dial again.

    From this process's slice of PORTS (worker_ports), never one it handed out before: a port
    is free when checked but only bound by the coordinator seconds later."""
    ports = worker_ports()
    for _ in range(100):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FederationRun:
    """One test's federation: files under `root`, the coordinator's state in `root/coord`, every
    process in `procs` (stopped by whoever owns `procs`, the `federation` fixture in conftest).

    The coordinator listens on `port`, chosen before anything starts, so the silos start at the
    same time as the coordinator instead of after it has bound (process start, mostly importing
    torch, is most of an e2e test's time); the silos retry until it listens."""

    root: Path
    fed: Federation
    procs: Processes
    port: int = field(default_factory=free_port)

    @classmethod
    def provision(
        cls, root: Path, procs: Processes, federation_id: str, names: Sequence[str]
    ) -> FederationRun:
        return cls(root, provision(root / "fed", federation_id, names), procs)

    @property
    def state(self) -> Path:
        return self.root / "coord"

    def coordinator_config(
        self, file: str = "c.toml", *, task_spec: str | None = None, **config: Any
    ) -> Path:
        """`write_coordinator_config` for this federation, listening on `port` unless `config`
        says where."""
        config.setdefault("listen", f"127.0.0.1:{self.port}")
        return write_coordinator_config(
            self.root / file,
            self.fed,
            state_dir=self.state,
            task_spec=task_spec or RECORDING_SPEC,
            **config,
        )

    def start_coordinator(self, config: Path, *extra: str, name: str = "coordinator") -> Proc:
        """`serve` on `config` (a stale port file of an earlier run removed first)."""
        (self.state / "coordinator.port").unlink(missing_ok=True)
        return self.procs.start(
            name, ["-m", "coordinator", "serve", "--config", str(config), *extra]
        )

    def listening(self, coordinator: Proc) -> int:
        """Waits until `coordinator` has bound and returns its port (this run's `port`)."""
        port = wait_for_port(self.state, coordinator)
        assert port == self.port, (port, self.port)
        return port

    def endless_config(self, *, min_silos: int, sleep_s: float = 0.2) -> Path:
        """`coordinator_config` for plaintext rounds that never run out (100,000), each
        training `sleep_s` long: a steady federation for a module's tests to probe."""
        return self.coordinator_config(
            rounds=100_000, min_silos=min_silos, train={"sleep_s": sleep_s}
        )

    def weighted_secure_config(self, *, rounds: int, min_silos: int, **config: Any) -> Path:
        """`coordinator_config` for secure rounds of WEIGHTED_SECAGG, 30 s to offer and to
        train; `config` are further `write_coordinator_config` arguments."""
        return self.coordinator_config(
            rounds=rounds,
            min_silos=min_silos,
            aggregation="secagg",
            secagg=WEIGHTED_SECAGG,
            offer_s=30.0,
            train_s=30.0,
            **config,
        )

    def start_silo(self, name: str, *extra: str, **config: Any) -> Proc:
        """Silo `name` on a config of its own (`write_silo_config` arguments in `config`;
        RECORDING_SPEC unless `task_spec` is given), `extra` on its command line."""
        config.setdefault("task_spec", RECORDING_SPEC)
        toml = write_silo_config(
            self.root / f"silo-{name}.toml", self.fed.silos[name], port=self.port, **config
        )
        return self.procs.silo(name, toml, *extra)

    def start_recording_silos(
        self,
        examples: Mapping[str, int],
        *extra: str,
        run: int | None = None,
        record_root: Path | None = None,
        **config: Any,
    ) -> dict[str, Proc]:
        """One RECORDING_TASK silo per name in `examples` (its example count), recording under
        `<record_root>/<name>` (`root/sent` by default); `run` tells the processes of a later
        run apart (`<name>-<run>`), `config` are further `write_silo_config` arguments, `extra`
        the command line's."""
        started = {}
        for name, count in examples.items():
            label = name if run is None else f"{name}-{run}"
            toml = self.recording_silo_config(
                name, count, label=label, record_root=record_root, **config
            )
            started[name] = self.procs.silo(label, toml, *extra)
        return started

    def recording_silo_config(
        self,
        name: str,
        num_examples: int,
        *,
        label: str | None = None,
        record_root: Path | None = None,
        **config: Any,
    ) -> Path:
        """`root/silo-<label>.toml` (label: the name by default), the config of a RECORDING_TASK
        silo `name` dialing `port` and recording under `<record_root>/<name>` (`root/sent` by
        default); `config` are further `write_silo_config` arguments."""
        return write_recording_silo_config(
            self.root / f"silo-{label or name}.toml",
            self.fed,
            name,
            port=self.port,
            num_examples=num_examples,
            record_root=record_root or self.root / "sent",
            **config,
        )

    def logs(self) -> str:
        return self.procs.logs()


# What the `federation` fixture (tests/conftest.py) gives a test: `federation(id, names)`.
NewFederation = Callable[[str, Sequence[str]], FederationRun]


@contextmanager
def federation_run(root: Path, federation_id: str, names: Sequence[str]) -> Iterator[FederationRun]:
    """A federation provisioned under `root` whose processes are stopped when the block ends:
    the `federation` fixture for a module-scoped fixture."""
    with processes(root / "logs") as procs:
        yield FederationRun.provision(root, procs, federation_id, names)


# ---- a task that records what it sent (for exactness over the real transport) -----------------


class RecordingTask:
    """A tiny linear model whose training adds a seeded perturbation and saves the update sent.

    Options: `silo_index`, `num_examples`, `record_dir`. Each round's delta is written to
    `<record_dir>/round-<r>.pt` so a test can recompute the average independently.
    """

    name = "recording"

    def build_model(self) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(5)
        model = torch.nn.Linear(6, 3)
        with torch.no_grad():
            model.weight.copy_(torch.randn(3, 6, generator=gen))
            model.bias.copy_(torch.randn(3, generator=gen))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silofed import TrainResult

        round_id = int(params.get("round", 0))
        gen = torch.Generator().manual_seed(1000 * int(data["silo_index"]) + round_id)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        delta = {k: model.state_dict()[k] - before[k] for k in before}
        record = Path(data["record_dir"])
        record.mkdir(parents=True, exist_ok=True)
        torch.save(delta, record / f"round-{round_id}.pt")
        if float(params.get("sleep_s", 0)):
            time.sleep(float(params["sleep_s"]))
        return TrainResult(int(data["num_examples"]), {"loss": 1.0 / (round_id + 1)})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {"score": float(data["silo_index"])}


RECORDING_TASK = RecordingTask()
RECORDING_SPEC = "tests.federation_helpers:RECORDING_TASK"


# ---- a secure round's result against FedAvg of what the silos recorded ----------------------


def check_fedavg(
    state_dir: Path,
    detail: RoundDetail,
    *,
    examples: Mapping[str, int],
    record_root: Path,
    settings: SecAggSettings,
    invited: Sequence[str] | None = None,
) -> None:
    """A completed secure round's new model against old + the example-weighted mean of the
    updates its survivors (`finished`) recorded with RECORDING_TASK under `<record_root>/<name>`,
    within `quantisation_bound` of the round's configuration as the coordinator built it from
    `settings` for `invited` (default: the round's invited set). `examples` holds each silo's
    example count by name; `state_dir` is the coordinator's (round log, checkpoints)."""
    import numpy as np
    import pytest

    from coordinator.rounds.secure_config import build_round_config, layout_of, quantisation_bound
    from coordinator.storage.checkpoints import CheckpointStore

    store = CheckpointStore(state_dir / "checkpoints")
    old_path = _checkpoint_path(state_dir / "rounds.sqlite", detail.model_in_sha256)
    old = store.load(old_path, detail.model_in_sha256)
    assert detail.checkpoint is not None, detail.round_id
    new = store.load(detail.checkpoint.path, detail.checkpoint.sha256)
    survivors = [s.rsplit("/", 1)[-1] for s in detail.participants["finished"]]
    round_id = detail.round_id
    deltas = {n: torch.load(record_root / n / f"round-{round_id}.pt") for n in survivors}
    total = float(sum(examples[n] for n in survivors))
    max_abs = max(float(t.abs().max()) for d in deltas.values() for t in d.values())
    # The bound depends on the settings and the number invited only: the roster, the model's
    # digest and the deadlines are placeholders.
    config = build_round_config(
        settings,
        federation_id="check",
        roster_version=1,
        roster_digest=b"\0" * 32,
        round_id=round_id,
        invited=detail.participants["invited"] if invited is None else invited,
        model_version=round_id - 1,
        model_sha256=b"\0" * 32,
        layout=layout_of(RECORDING_TASK.build_model().state_dict()),
        deadlines_s=(60, 60, 60, 60, 60),
    )
    bound = quantisation_bound(config, [examples[n] for n in survivors], max_abs)
    for key, tensor in old.items():
        mean = sum(examples[n] * deltas[n][key].double().numpy() for n in survivors) / total
        expected = tensor.double().numpy() + mean
        err = float(np.max(np.abs(new[key].double().numpy() - expected)))
        ulp = float(np.max(np.abs(expected))) * 2.0**-23  # the model is stored in float32
        assert err <= bound + ulp, (round_id, key, err, bound)
    assert detail.weight_sum == pytest.approx(total, rel=0.01), round_id


def _checkpoint_path(log_path: Path, sha256: str) -> Path:
    """Where the round log says the checkpoint with this SHA-256 is (the earliest such round)."""
    import sqlite3

    conn = sqlite3.connect(log_path)
    try:
        row = conn.execute(
            "SELECT path FROM checkpoints WHERE sha256=? ORDER BY round_id", (sha256,)
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, sha256
    return Path(row[0])

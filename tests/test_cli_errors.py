"""Errors, not tracebacks: each ordinary mistake ends both CLIs with one line naming the cause and
the fix, and the documented exit code (issue 9). Real processes, real files, loopback only."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from silofed import TrainResult
from tests.federation_helpers import (
    RECORDING_SPEC,
    Federation,
    NewFederation,
    free_port,
    processes,
    provision,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c")


class FailingDataTask:
    """A task whose `load_data` raises, as a task with a wrong data path would."""

    name = "failing-data"

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 1)

    def load_data(self, options: Mapping[str, Any]) -> Any:
        raise FileNotFoundError(f"no such data file: {options.get('path')}")

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> TrainResult:
        raise AssertionError("never reached")

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {}


FAILING_DATA_TASK = FailingDataTask()


def _fed(tmp_path: Path) -> Federation:
    return provision(tmp_path / "fed", "errs", NAMES)


def _silo_toml(tmp_path: Path, fed: Federation, name: str, **kw: Any) -> Path:
    options = kw.pop("options", {"silo_index": 0, "num_examples": 5, "record_dir": "rec"})
    return write_silo_config(
        tmp_path / f"{name}.toml",
        fed.silos[name],
        port=kw.pop("port", 1),
        task_spec=kw.pop("task_spec", RECORDING_SPEC),
        options=options,
        **kw,
    )


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def test_a_key_that_is_not_the_certificates_is_refused_at_once(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    toml = _silo_toml(tmp_path, fed, "a")
    # silo a's certificate with silo b's key: every TLS handshake would fail
    text = toml.read_text().replace(str(fed.silos["a"].key), str(fed.silos["b"].key))
    toml.write_text(text)
    with processes(tmp_path / "logs") as procs:
        silo = procs.silo("a", toml)
        assert silo.wait(60) == 3, silo.log()
    log = silo.log()
    assert "is not the private key of" in log and str(fed.silos["a"].cert) in log
    _no_traceback(log)


def test_a_failing_load_data_is_one_line_and_exit_2(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    toml = _silo_toml(
        tmp_path,
        fed,
        "a",
        task_spec="tests.test_cli_errors:FAILING_DATA_TASK",
        options={"path": "/nonexistent/data.csv"},
    )
    with processes(tmp_path / "logs") as procs:
        silo = procs.silo("a", toml)
        assert silo.wait(60) == 2, silo.log()
    log = silo.log()
    assert "load_data failed: FileNotFoundError: no such data file: /nonexistent/data.csv" in log
    assert "[task.options]" in log
    _no_traceback(log)


def test_a_second_agent_on_one_state_dir_is_refused_with_the_first_ones_pid(
    tmp_path: Path,
) -> None:
    fed = _fed(tmp_path)
    toml = _silo_toml(tmp_path, fed, "a", port=free_port())  # nobody listens: it retries
    with processes(tmp_path / "logs") as procs:
        first = procs.silo("a", toml)
        first.wait_for_log(r"starting; coordinator", 60)
        second = procs.start("silo-a-again", ["-m", "silo_agent", "run", "--config", str(toml)])
        assert second.wait(60) == 4, second.log()
        assert first.popen.poll() is None  # the first one is undisturbed
        log = second.log()
        assert f"another silo agent (pid {first.pid})" in log
        assert str(fed.silos["a"].dir / "state") in log
        _no_traceback(log)
        assert procs.stop(first) in (0, 130)
        # the lock dies with its holder: the same state dir can be used again at once
        third = procs.silo("a-3", toml)
        third.wait_for_log(r"starting; coordinator", 60)


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_coordinator_config(
            tmp_path / "c.toml",
            fed,
            state_dir=tmp_path / "coord",
            task_spec=RECORDING_SPEC,
            rounds=1,
            min_silos=3,
            listen=f"127.0.0.1:{port}",
            aggregation="secagg",
            secagg={"clip_l2": 10.0},
        )
        with processes(tmp_path / "logs") as procs:
            coordinator = procs.coordinator(cfg)
            assert coordinator.wait(60) == 2, coordinator.log()
    log = coordinator.log()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "[server] listen" in log
    _no_traceback(log)


def test_serve_forever_takes_part_in_the_next_federation_run(federation: NewFederation) -> None:
    """With --serve-forever a silo stays up when a run finishes and joins the next one."""
    run = federation("errs", NAMES)
    state, procs = run.state, run.procs
    plain = {"aggregation": "plaintext-insecure"}
    cfg = run.coordinator_config(rounds=1, min_silos=3, **plain)
    coordinator = run.start_coordinator(cfg)
    silos = [
        *run.start_recording_silos({"a": 5}, "--serve-forever").values(),
        *run.start_recording_silos({"b": 5, "c": 5}).values(),
    ]
    assert coordinator.wait(120) == 0, procs.logs()
    for silo in silos[1:]:
        assert silo.wait(60) == 0, silo.log()
    silos[0].wait_for_log(r"--serve-forever: waiting for the next run", 30)
    assert silos[0].popen.poll() is None
    # the next run: the same federation, one more round, on the same port (the run's)
    (state / "coordinator.port").unlink()
    cfg2 = run.coordinator_config("c2.toml", rounds=2, min_silos=1, **plain)
    coordinator2 = run.start_coordinator(cfg2, name="coordinator-2")
    assert coordinator2.wait(120) == 0, procs.logs()
    silos[0].wait_for_log(r"round 2 completed with 1 silos \(included us\)", 30)
    assert silos[0].popen.poll() is None

"""Acceptance 5: rolling back to round N through `silofed-coordinator rollback`.

A real federation runs 3 rounds and stops; `rollback --to 1` is recorded; the coordinator and
silos are started again for one more round. That round's input model hash must equal round 1's
output hash, the log must say `rollback_of = 1` (also in `rounds show`), and the intent must be
used once only. Bad requests (a round not in the log) exit non-zero saying what to do.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from coordinator.storage.roundlog import RoundLog
from tests.federation_helpers import (
    RECORDING_SPEC,
    FederationRun,
    NewFederation,
    Proc,
    processes,
    provision,
    run_module,
    wait_for_port,
    write_coordinator_config,
)

pytestmark = pytest.mark.e2e
NAMES = ("a", "b")
GRPC_CORE = re.compile(r"^[IWEF]\d{4} ")


def coordinator_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("coordinator", *args, timeout_s=60)


def run_federation(run: FederationRun, cfg: Path, number: int, *extra: str) -> list[Proc]:
    """The coordinator and both silos started together (run `number`, for their logs' names),
    until all three have exited."""
    coordinator = run.start_coordinator(cfg, *extra, name=f"coordinator-{number}")
    silos = run.start_recording_silos({"a": 4, "b": 5}, *extra[-2:], run=number)
    assert coordinator.wait(120) == 0, run.logs()
    for silo in silos.values():
        assert silo.wait(30) == 0, run.logs()
    return [coordinator, *silos.values()]


def json_lines(proc: Proc) -> list[dict[str, object]]:
    """Every log line as JSON, grpc core's own lines included (they arrive as JSON too)."""
    lines = [x for x in proc.log().splitlines() if x.strip()]
    assert lines, proc.log()
    assert not any(GRPC_CORE.match(x) for x in lines), proc.log()
    return [json.loads(x) for x in lines]


def test_rollback_to_round_1(federation: NewFederation) -> None:
    run = federation("rollbackfed", NAMES)
    state = run.state
    cfg = run.coordinator_config("coord.toml", rounds=3, min_silos=2)
    run_federation(run, cfg, 1)

    bad = coordinator_cli("rollback", "--config", str(cfg), "--to", "9")
    assert bad.returncode == 1 and "round 9 is not in the log" in bad.stderr
    assert not (state / "rollback.json").exists()

    done = coordinator_cli("rollback", "--config", str(cfg), "--to", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["next_round"] == 4

    second = run_federation(run, cfg, 2, "--rounds", "4", "--log-format", "json")
    assert not (state / "rollback.json").exists(), "the intent must be used once only"

    with RoundLog.open_readonly(state / "rounds.sqlite") as log:
        r1, r3, r4 = (log.round_detail(n) for n in (1, 3, 4))
    assert r4.rollback_of == 1 and r1.rollback_of is None
    assert r4.model_in_sha256 == r1.model_out_sha256
    assert r4.model_in_sha256 != r3.model_out_sha256
    # --log-format json: one JSON object per line, on both sides.
    coordinator_lines = json_lines(second[0])
    assert any("round 4" in str(x["message"]) for x in coordinator_lines)
    assert all({"ts", "level", "logger", "message"} <= set(x) for x in coordinator_lines)
    assert any("round 4" in str(x["message"]) for x in json_lines(second[1]))
    shown = coordinator_cli("rounds", "show", "4", "--state-dir", str(state))
    assert shown.returncode == 0 and "round 1" in shown.stdout and "rolls back" in shown.stdout


def test_rollback_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = coordinator_cli("rollback", "--state-dir", str(tmp_path / "nope"), "--to", "1")
    assert missing.returncode == 1 and "[federation] state_dir" in missing.stderr
    (tmp_path / "empty").mkdir()
    no_log = coordinator_cli("rollback", "--state-dir", str(tmp_path / "empty"), "--to", "1")
    assert no_log.returncode == 1 and "rounds.sqlite" in no_log.stderr


DAMAGED = {
    "not JSON": b'{"to": 1,',
    "not UTF-8": b"\xff\xfe\x00garbage",
    "a list": b"[1]",
    "'to' missing": b'{"reason": "x"}',
    "'to' a string": b'{"to": "1"}',
    "'to' a bool": b'{"to": true}',
    "'requested_at' a string": b'{"to": 1, "requested_at": "yesterday"}',
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_intent_is_named_with_the_fix(tmp_path: Path, content: bytes) -> None:
    from coordinator.storage.rollback import IntentDamaged, discard, pending

    (tmp_path / "rollback.json").write_bytes(content)
    with pytest.raises(IntentDamaged) as damaged:
        pending(tmp_path)
    text = str(damaged.value)
    assert str(tmp_path / "rollback.json") in text and "damaged" in text
    assert f"rollback --state-dir {tmp_path} --cancel" in text and "--to N" in text
    intent, why = discard(tmp_path)
    assert intent is None and isinstance(why, IntentDamaged)
    assert not (tmp_path / "rollback.json").exists()


def test_serve_and_rollback_refuse_a_damaged_intent(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "damagedfed", NAMES)
    state = tmp_path / "coord"
    state.mkdir()
    cfg = write_coordinator_config(
        tmp_path / "coord.toml", fed, state_dir=state, task_spec=RECORDING_SPEC, rounds=1,
        min_silos=2, start_timeout_s=1,
    )  # fmt: skip
    intent = state / "rollback.json"
    intent.write_bytes(b'{"to": "one"}')

    with processes(tmp_path / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        assert coordinator.wait(60) == 2, coordinator.log()
    text = coordinator.log()
    assert "Traceback" not in text, text
    assert f"rollback intent {intent} is damaged" in text and "--cancel" in text, text
    assert not (state / "coordinator.port").exists()  # it never started serving

    # `rollback --to` does not overwrite a file it cannot read: exit 2, file untouched.
    replace = coordinator_cli("rollback", "--config", str(cfg), "--to", "0")
    assert replace.returncode == 2, replace.stderr
    assert "Traceback" not in replace.stderr and "is damaged" in replace.stderr
    assert intent.read_bytes() == b'{"to": "one"}'

    # `--cancel` removes it, as the message says; then serve starts (and gives up on silos).
    cancel = coordinator_cli("rollback", "--config", str(cfg), "--cancel", "--json")
    assert cancel.returncode == 0, cancel.stderr
    assert json.loads(cancel.stdout) == {"cancelled": None, "removed_damaged": str(intent)}
    assert not intent.exists()
    with processes(tmp_path / "logs2") as procs:
        coordinator = procs.coordinator(cfg)
        wait_for_port(state, coordinator)
        assert coordinator.wait(60) == 1, coordinator.log()  # no silos within 1 s
    assert "is damaged" not in coordinator.log()

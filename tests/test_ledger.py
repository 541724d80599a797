"""`silofed-silo ledger` / `ledger verify` against the logs of a real two-round federation.

One module-scoped federation run (real coordinator and silo processes over mTLS) produces the
silos' ledgers and the coordinator's round log; `rounds export` is run through its entry point;
every ledger command is run as `python -m silo_agent ...`. Hand edits to the export (and to a
ledger) must make `verify` fail naming the round and the field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from silo_agent.config import load_silo_config
from silo_agent.ledger import LedgerError, read_ledger
from tests.federation_helpers import (
    RECORDING_SPEC,
    REPO,
    child_env,
    processes,
    provision,
    wait_for_port,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Run:
    root: Path
    state: Path
    silo_configs: dict[str, Path]
    export: Path


def cli(*args: str, module: str = "silo_agent") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("ledger")
    names = ("a", "b")
    fed = provision(root / "fed", "ledgerfed", names)
    state = root / "coord"
    cfg = write_coordinator_config(
        root / "coord.toml", fed, state_dir=state, task_spec=RECORDING_SPEC, rounds=2, min_silos=2
    )
    configs: dict[str, Path] = {}
    with processes(root / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        port = wait_for_port(state, coordinator)
        silos = []
        for i, name in enumerate(names):
            configs[name] = write_silo_config(
                root / f"{name}.toml",
                fed.silos[name],
                port=port,
                task_spec=RECORDING_SPEC,
                options={"silo_index": i, "num_examples": 10 + i, "record_dir": str(root / name)},
            )
            silos.append(procs.silo(name, configs[name]))
        assert coordinator.wait(120) == 0, procs.logs()
        for silo in silos:
            assert silo.wait(30) == 0, procs.logs()
    export = root / "export.json"
    done = cli(
        "rounds", "export", "--state-dir", str(state), "--format", "json", "--output", str(export),
        module="coordinator",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Run(root, state, configs, export)


def test_ledger_shows_each_upload(run: Run) -> None:
    done = cli("ledger", "--config", str(run.silo_configs["a"]), "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    export = json.loads(run.export.read_text())
    assert [e["round_id"] for e in entries] == [r["round"] for r in export["rounds"]] == [1, 2]
    for entry, round_doc in zip(entries, export["rounds"], strict=True):
        # The model the silo says it received is the one the coordinator says it sent.
        assert entry["model_in_sha256"] == round_doc["model_in_sha256"]
        assert entry["update_bytes"] > 0 and len(entry["update_sha256"]) == 64
        assert "TrainReport" in entry["messages"]
    table = cli("ledger", "show", "--config", str(run.silo_configs["a"]))
    assert table.returncode == 0, table.stderr
    assert entries[0]["update_sha256"][:16] in table.stdout


def test_verify_passes_on_the_real_logs(run: Run) -> None:
    for name, config in run.silo_configs.items():
        done = cli("ledger", "verify", "--config", str(config), "--export", str(run.export))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "OK: 2 upload(s)" in done.stdout and f"/silo/{name}" in done.stdout


def test_verify_names_round_and_field_of_a_hand_edit(run: Run, tmp_path: Path) -> None:
    doc = json.loads(run.export.read_text())
    doc["rounds"][1]["model_in_sha256"] = "0" * 64
    for silo in doc["rounds"][0]["silos"]:
        silo["bytes_in"] = 10
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    done = cli("ledger", "verify", "--config", str(run.silo_configs["b"]), "--export", str(edited))
    assert done.returncode == 1
    assert "round 2: model_in_sha256 differs" in done.stdout
    assert "round 1: silos.bytes_in differs" in done.stdout
    as_json = cli(
        "ledger", "verify", "--json", "--config", str(run.silo_configs["b"]),
        "--export", str(edited),
    )  # fmt: skip
    assert as_json.returncode == 1
    fields = {(m["round"], m["field"]) for m in json.loads(as_json.stdout)["mismatches"]}
    assert fields == {(2, "model_in_sha256"), (1, "silos.bytes_in")}


def test_verify_names_an_upload_missing_from_the_ledger(run: Run, tmp_path: Path) -> None:
    source = load_silo_config(run.silo_configs["a"]).state_dir / "ledger.jsonl"
    lines = source.read_text().splitlines()
    trimmed = tmp_path / "state"
    trimmed.mkdir()
    (trimmed / "ledger.jsonl").write_text(lines[0] + "\n")
    export = json.loads(run.export.read_text())
    a_id = next(s for s in export["rounds"][0]["participants"]["finished"] if s.endswith("/a"))
    done = cli(
        "ledger", "verify", "--state-dir", str(trimmed), "--silo-id", a_id,
        "--export", str(run.export),
    )  # fmt: skip
    assert done.returncode == 1
    assert "round 2: participants.finished differs" in done.stdout


def test_errors_say_what_to_do(run: Run, tmp_path: Path) -> None:
    missing = cli("ledger", "--state-dir", str(tmp_path))
    assert missing.returncode == 1 and "no ledger here" in missing.stderr
    no_export = cli(
        "ledger", "verify", "--config", str(run.silo_configs["a"]),
        "--export", str(tmp_path / "nope.json"),
    )  # fmt: skip
    assert no_export.returncode == 1 and "rounds export" in no_export.stderr
    nothing = cli("ledger")
    assert nothing.returncode == 1 and "--config" in nothing.stderr


def test_a_torn_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"round_id": 1}\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: field 'aggregation'"):
        read_ledger(path)
    path.write_text('{"round_id": 1, "at"\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: not valid JSON"):
        read_ledger(path)

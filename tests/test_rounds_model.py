"""`rounds model`: the operator's export of a round's model, checked against the round log."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.storage.checkpoints import CheckpointStore
from coordinator.storage.roundlog import LOG_FILENAME, RoundLog
from tests.federation_helpers import REPO, run_module, run_rounds_command

SILOS = ["spiffe://m/silo/a", "spiffe://m/silo/b"]


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Rounds 1 and 3 completed (with checkpoints, as the coordinator writes them), 2 aborted."""
    store = CheckpointStore(tmp_path / "checkpoints")
    with RoundLog(tmp_path / LOG_FILENAME) as log:
        initial = store.save(0, state(0))
        log.record_checkpoint(0, initial.path, initial.sha256)
        previous = initial.sha256
        for r in (1, 2, 3):
            log.start_round(
                r,
                started_at=float(r),
                aggregation="secagg",
                config_digest="cfg",
                model_in_sha256=previous,
                invited=SILOS,
            )
            if r == 2:
                log.finish_round(r, status="aborted", ended_at=r + 0.5, abort_reason="too few")
                continue
            ckpt = store.save(r, state(r))
            log.finish_round(
                r,
                status="completed",
                ended_at=r + 0.5,
                model_out_sha256=ckpt.sha256,
                checkpoint_path=ckpt.path,
                checkpoint_sha256=ckpt.sha256,
                weight_sum=2.0,
            )
            previous = ckpt.sha256
    return tmp_path


def recorded_sha(state_dir: Path, round_id: int) -> str:
    with RoundLog.open_readonly(state_dir / LOG_FILENAME) as log:
        record = log.checkpoint(round_id)
    assert record is not None
    return record.sha256


def test_writes_the_rounds_model_and_prints_its_digest(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "out" / "model.safetensors"
    out_file.parent.mkdir()
    code, out, err = run_rounds_command(
        ["rounds", "model", "--state-dir", str(state_dir), "--round", "1", "-o", str(out_file)],
        capsys,
    )
    assert code == 0, err
    digest = hashlib.sha256(out_file.read_bytes()).hexdigest()
    assert digest == recorded_sha(state_dir, 1)
    assert out.split() == [digest, str(out_file)]  # the `sha256sum -c` line
    loaded = load_file(out_file)
    assert torch.equal(loaded["w"], state(1)["w"]) and torch.equal(loaded["b"], state(1)["b"])

    # Default: the last completed round (3; round 2 aborted). --json for machines.
    code, out, _ = run_rounds_command(
        ["rounds", "model", "--state-dir", str(state_dir), "-o", str(out_file), "--json"], capsys
    )
    doc = json.loads(out)
    assert code == 0 and doc["round"] == 3 and doc["sha256"] == recorded_sha(state_dir, 3)
    assert hashlib.sha256(out_file.read_bytes()).hexdigest() == doc["sha256"]
    assert doc["bytes"] == out_file.stat().st_size

    code, out, _ = run_rounds_command(
        ["rounds", "model", "--log", str(state_dir / LOG_FILENAME), "--round", "0",
         "-o", str(out_file), "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["sha256"] == recorded_sha(state_dir, 0)
    assert torch.equal(load_file(out_file)["w"], state(0)["w"])


@pytest.mark.parametrize(
    ("round_arg", "message"),
    [
        ("9", "round 9 is not in the round log (rounds are numbered 1..3)"),
        ("2", "round 2 is aborted (too few): it produced no model"),
        ("-1", "--round must be >= 0"),
    ],
)
def test_a_round_without_a_model_is_refused(
    state_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    round_arg: str,
    message: str,
) -> None:
    out_file = tmp_path / "model.safetensors"
    code, out, err = run_rounds_command(
        ["rounds", "model", "--state-dir", str(state_dir), "--round", round_arg,
         "-o", str(out_file)],
        capsys,
    )  # fmt: skip
    assert code == 1 and out == ""
    assert message in err and err.startswith("error: ")
    assert not out_file.exists()


def test_a_tampered_or_missing_checkpoint_is_never_exported(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = state_dir / "checkpoints" / "round-000003.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    ckpt.write_bytes(bytes(data))
    out_file = tmp_path / "model.safetensors"
    out_file.write_bytes(b"the operator's earlier file")
    argv = ["rounds", "model", "--state-dir", str(state_dir), "--round", "3", "-o", str(out_file)]
    code, _, err = run_rounds_command(argv, capsys)
    assert code == 1
    assert "the round log records" in err and "restore it from a backup" in err
    assert recorded_sha(state_dir, 3) in err and "nothing was written" in err
    assert out_file.read_bytes() == b"the operator's earlier file"  # untouched

    ckpt.unlink()
    code, _, err = run_rounds_command(argv, capsys)
    assert code == 1 and "cannot read the checkpoint of round 3" in err

    # The other rounds are still exportable.
    code, _, err = run_rounds_command([*argv[:-4], "--round", "1", "-o", str(out_file)], capsys)
    assert code == 0, err


def test_a_copied_state_dir_is_checked_for_itself(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log records absolute checkpoint paths; a copy of the state directory (a backup, an
    auditor's copy) is read from its own checkpoints/, not from where the original lies."""
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)
    ckpt = copy / "checkpoints" / "round-000001.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    out_file = tmp_path / "m.safetensors"
    argv = ["rounds", "model", "--round", "1", "-o", str(out_file), "--json", "--state-dir"]
    code, _, err = run_rounds_command([*argv, str(copy)], capsys)
    assert code == 1 and str(ckpt) in err and not out_file.exists()
    code, out, _ = run_rounds_command([*argv, str(state_dir)], capsys)
    assert code == 0 and json.loads(out)["checkpoint"] == str(
        state_dir / "checkpoints" / "round-000001.safetensors"
    )


def test_an_unwritable_output_says_so(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target, message in (
        (tmp_path / "no-such-dir" / "m.safetensors", "choose a writable path"),
        (tmp_path, "is a directory"),
    ):
        code, _, err = run_rounds_command(
            ["rounds", "model", "--state-dir", str(state_dir), "-o", str(target)], capsys
        )
        assert code == 1 and message in err, err


def test_console_entry_point(state_dir: Path, tmp_path: Path) -> None:
    """`python -m coordinator rounds model`: the digest on stdout, errors without a traceback."""
    out_file = tmp_path / "m.safetensors"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_module("coordinator", "rounds", "model", *args)

    done = cli("--state-dir", str(state_dir), "--output", str(out_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == recorded_sha(state_dir, 3)
    assert "wrote the model of round 3" in done.stderr
    failed = cli("--state-dir", str(state_dir), "--round", "2", "--output", str(out_file))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "produced no model" in failed.stderr


def test_help_lists_what_the_docs_describe(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["rounds", "model", "--help"])
    helped = capsys.readouterr().out
    assert exited.value.code == 0
    section = (
        (REPO / "docs" / "auditing.md").read_text().split("## `silofed-coordinator rounds model`")
    )
    assert len(section) == 2, "docs/auditing.md has no section for `rounds model`"
    documented = section[1].split("\n## ")[0]
    for option in ("--state-dir", "--log", "--round", "--output", "--json"):
        assert option in helped and option in documented, option
    assert "silofed-coordinator rounds model" in (REPO / "README.md").read_text()

"""The operator's commands start without torch: `python -m coordinator ...` and
`python -m silo_agent ...` import their CLI and configuration, never the model stack.

torch costs about 2 s per process start; a CLI verb (status, rounds, pki, rollback) needs none of
it. Only the commands that run rounds (serve, run) load it, when they start. Checked in a child
process, because this test process has long since imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports the modules, asks the CLI for its help (which builds every subcommand's parser), and
# prints which of the probed modules are then loaded.
CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import {modules}
    from {cli} import main
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        try:
            main(["--help"])
        except SystemExit:
            pass
    loaded = sorted(name for name in {probe!r} if name in sys.modules)
    print(json.dumps({{"loaded": loaded, "help": shown.getvalue()}}))
    """
)


def _loaded(modules: str, cli: str, probe: tuple[str, ...]) -> tuple[set[str], str]:
    code = CHILD.format(modules=modules, cli=cli, probe=probe)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.splitlines()[-1])
    return set(result["loaded"]), str(result["help"])


@pytest.mark.parametrize(
    ("modules", "cli", "verbs"),
    [
        ("coordinator.cli, coordinator.config", "coordinator.cli", ("serve", "rounds", "status")),
        ("silo_agent.cli, silo_agent.config", "silo_agent.cli", ("run",)),
    ],
    ids=["coordinator", "silo_agent"],
)
def test_cli_and_config_do_not_load_torch(modules: str, cli: str, verbs: tuple[str, ...]) -> None:
    top = cli.split(".")[0]
    loaded, shown = _loaded(modules, cli, (top, f"{top}.config", "torch", "safetensors.torch"))
    assert {top, f"{top}.config"} <= loaded  # the child imported what it was asked to
    assert all(verb in shown for verb in verbs), shown  # and built the whole parser
    assert "torch" not in loaded, f"`import {modules}` loads torch"
    assert "safetensors.torch" not in loaded

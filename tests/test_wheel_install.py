"""The wheel an operator installs: what it holds, what it asks for, and that it runs on its own.

1. (unit) pyproject's runtime dependencies are bounded on both sides, each floor is the version
   the suite runs with (requirements.lock; torch: the Makefile's pin) and every locked version
   is inside its bounds: `pip install -c requirements.lock silofed-*.whl` gets the tested set.
2. (e2e) The wheel is built from a copy of the files it is made of (pyproject.toml, README.md
   and the five packages; never the repository's own build/ folder), and holds only the
   project's top-level packages (no examples, bench or tests). It is installed with its
   dependencies, under the lock's constraints, into a fresh virtual environment in which
   torch==2.13.0 is already installed; from that environment, with the repository nowhere on the
   path, both console scripts answer `--help`, `provision-dev` makes the certificates, and a
   coordinator and 3 silo processes run one secure-aggregation round over mTLS on 127.0.0.1
   whose decoded model is the mean of the 3 silos' known updates.

Torch in the fresh environment: the repository venv's torch 2.13.0 (installed from the pin) is
made visible through a .pth file naming a folder of symlinks to that installation's own files
(torch, torchgen, functorch and its dist-info, read from its RECORD), so pip sees torch 2.13.0
installed and adds only what torch itself requires. A real `pip install torch==2.13.0` from the
machine's disk costs 24 s more here and tests nothing of ours. Everything else comes from the
package registries through pip, as an operator's install would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from, and its only top-level names (besides its .dist-info).
PACKAGES = ("coordinator", "protos", "secagg", "silo_agent", "silofed")
BUILD_INPUTS = ("pyproject.toml", "README.md", *PACKAGES)
TORCH_PIN = "torch==2.13.0"

# A task that only the fresh environment's silofed and torch can serve: 4 float32 parameters,
# silo i adds 0.01 * (i + 1) to each, so one uniform secure round makes them 0.02.
TASK_MODULE = """
import torch
from silofed import TrainResult


class WheelTask:
    name = "wheel-install"

    def build_model(self):
        model = torch.nn.Module()
        model.register_parameter("w", torch.nn.Parameter(torch.zeros(4)))
        return model

    def load_data(self, options):
        return int(options["silo_index"])

    def train(self, model, data, params):
        with torch.no_grad():
            model.get_parameter("w").add_(0.01 * (data + 1))
        return TrainResult(10, {"loss": 0.0})

    def evaluate(self, model, data):
        return {"score": float(model.get_parameter("w").mean())}


TASK = WheelTask()
"""
EXPECTED_W = 0.02  # mean of 0.01, 0.02, 0.03
# The silos' updates are quantised onto the ring with [secagg] clip_l2 = 1: an error far below
# 1e-3, which still tells 0.02 from any single silo's 0.01 or 0.03 and from the initial 0.
W_TOLERANCE = 1e-3


# ---- 1. the dependency bounds ---------------------------------------------------------------


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH_PIN := torch==(\S+)$", makefile, re.MULTILINE)
    assert torch, "the Makefile no longer sets TORCH_PIN := torch==X; update this test"
    pins["torch"] = Version(torch.group(1))
    return pins


def test_runtime_dependencies_are_bounded_at_the_tested_versions() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    problems = []
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        lower = [s for s in req.specifier if s.operator == ">="]
        upper = [s for s in req.specifier if s.operator == "<"]
        tested = lock.get(name)
        if tested is None:
            problems.append(f"{text}: not in requirements.lock (run `make lock`)")
            continue
        if len(lower) != 1 or len(upper) != 1:
            problems.append(f"{text}: needs one '>=' (tested version) and one '<' (next major)")
            continue
        if Version(lower[0].version) != tested:
            problems.append(f"{text}: floor {lower[0].version} is not the tested {tested}")
        if tested not in req.specifier:
            problems.append(f"{text}: excludes the tested {tested}")
    assert not problems, "\n".join(problems)


# ---- 2. build, install, run -------------------------------------------------------------------


def _run(args: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout_s: float) -> str:
    done = subprocess.run(
        list(args), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}:\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def _build_wheel(src: Path, out: Path) -> Path:
    src.mkdir()
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, src / name)
    # No build isolation: the repository venv's setuptools builds it, nothing is downloaded.
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(src)],
        cwd=src,
        env=os.environ,
        timeout_s=120,
    )
    (wheel,) = out.glob("silofed-*.whl")
    return wheel


def _link_torch(venv_site: Path, links: Path) -> None:
    """Make the repository venv's torch 2.13.0 installed in the fresh venv (module docstring)."""
    dist = metadata.distribution("torch")
    assert dist.version.split("+")[0] == TORCH_PIN.split("==")[1], (
        f"the repository venv has torch {dist.version}, not the pinned {TORCH_PIN}; run make venv"
    )
    tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
    site = Path(str(dist.locate_file("")))
    links.mkdir()
    for top in sorted(tops):
        (links / top).symlink_to(site / top)
    (venv_site / "silofed-test-torch.pth").write_text(f"{links}\n")


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("GRPC_VERBOSITY", None)  # serve sets it itself
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextmanager
def _started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the block starts; each still running at its end is stopped by pid."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _toml(tables: Mapping[str, Mapping[str, object]]) -> str:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _logs(paths: Sequence[Path]) -> str:
    return "\n".join(f"===== {p.name} =====\n{p.read_text()[-3000:]}" for p in paths if p.exists())


@pytest.mark.e2e
def test_the_wheel_installs_alone_and_runs_a_secure_round(tmp_path: Path) -> None:
    started = time.monotonic()
    wheel = _build_wheel(tmp_path / "src", tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    assert tops == {*PACKAGES, "silofed-0.1.0.dist-info"}, sorted(tops)

    venv = tmp_path / "venv"
    _run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        cwd=tmp_path,
        env=os.environ,
        timeout_s=60,
    )
    py, bindir = venv / "bin" / "python", venv / "bin"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    _link_torch(site / "site-packages", tmp_path / "preinstalled-torch")
    built = time.monotonic()
    # The repository venv's pip, acting on the fresh venv (it has none of its own).
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
        + ["-c", str(REPO / "requirements.lock"), str(wheel)],
        cwd=tmp_path,
        env=os.environ,
        timeout_s=300,
    )
    installed = time.monotonic()

    run_dir = tmp_path / "run"
    (run_dir / "tasks").mkdir(parents=True)
    (run_dir / "tasks" / "wheeltask.py").write_text(TASK_MODULE)
    env = _clean_env({"PYTHONPATH": str(run_dir / "tasks")})

    # Every package comes from the fresh venv; the examples are not installed.
    where = _run(
        [
            str(py),
            "-c",
            "import sys, json, importlib; print(json.dumps("
            "{m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))",
            *PACKAGES,
        ],
        cwd=run_dir,
        env=env,
        timeout_s=60,
    )
    for module, path in json.loads(where).items():
        assert Path(path).is_relative_to(site), f"{module} imported from {path}, not the venv"
    no_examples = subprocess.run(
        [str(py), "-c", "import examples"], cwd=run_dir, env=env, capture_output=True, text=True
    )
    assert "No module named 'examples'" in no_examples.stderr, no_examples

    coordinator_help = _run(
        [str(bindir / "silofed-coordinator"), "--help"], cwd=run_dir, env=env, timeout_s=60
    )
    silo_help = _run([str(bindir / "silofed-silo"), "--help"], cwd=run_dir, env=env, timeout_s=60)
    for command in ("serve", "provision-dev", "status", "rounds"):
        assert command in coordinator_help, coordinator_help
    for command in ("enroll", "run", "check", "ledger"):
        assert command in silo_help, silo_help

    fed = run_dir / "fed"
    _run(
        [str(bindir / "silofed-coordinator"), "provision-dev", "--dir", str(fed)]
        + ["--federation", "wheel", "--silos", "3"],
        cwd=run_dir,
        env=env,
        timeout_s=60,
    )
    silos = sorted(p.name for p in (fed / "silos").iterdir())
    assert len(silos) == 3, silos
    state = run_dir / "coordinator-state"
    coordinator_toml = run_dir / "coordinator.toml"
    coordinator_toml.write_text(
        _toml(
            {
                "federation": {"id": "wheel", "state_dir": str(state)},
                "server": {"listen": "127.0.0.1:0"},
                "tls": {
                    "ca_cert": str(fed / "ca" / "ca.pem"),
                    "cert": str(fed / "coordinator" / "coordinator.pem"),
                    "key": str(fed / "coordinator" / "coordinator.key"),
                    "roster": str(fed / "roster.json"),
                    "revoked": str(fed / "revoked.json"),
                },
                "task": {"spec": "wheeltask:TASK"},
                "rounds": {"count": 1, "min_silos": 3, "start_timeout_s": 60},
                "deadlines": {"offer_s": 30, "train_s": 30},
                "secagg": {"clip_l2": 1.0},
            }
        )
    )
    logs = [run_dir / "coordinator.log", *(run_dir / f"{name}.log" for name in silos)]
    with _started() as procs:
        with logs[0].open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        str(bindir / "silofed-coordinator"),
                        "serve",
                        "--config",
                        str(coordinator_toml),
                    ],
                    cwd=run_dir,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        port_file = state / "coordinator.port"
        deadline = time.monotonic() + 60
        while not port_file.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), _logs(logs)
        port = int(port_file.read_text())
        for index, name in enumerate(silos):
            silo_dir = fed / "silos" / name
            config = run_dir / f"{name}.toml"
            config.write_text(
                _toml(
                    {
                        "silo": {"name": name, "state_dir": str(run_dir / f"{name}-state")},
                        "coordinator": {"address": f"127.0.0.1:{port}", "server_name": "localhost"},
                        "tls": {
                            "ca_cert": str(silo_dir / "ca.pem"),
                            "cert": str(silo_dir / "silo.pem"),
                            "key": str(silo_dir / "silo.key"),
                            "roster": str(silo_dir / "roster.json"),
                        },
                        "task": {"spec": "wheeltask:TASK"},
                        "task.options": {"silo_index": index},
                        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
                    }
                )
            )
            with logs[1 + index].open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [str(bindir / "silofed-silo"), "run", "--config", str(config)],
                        cwd=run_dir,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        try:
            code = procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the coordinator did not finish its round in 90 s:\n" + _logs(logs))
        assert code == 0, _logs(logs)
        for proc in procs[1:]:
            assert proc.wait(timeout=30) == 0, _logs(logs)
    federated = time.monotonic()

    listed = json.loads(
        _run(
            [
                str(bindir / "silofed-coordinator"),
                "rounds",
                "list",
                "--state-dir",
                str(state),
                "--json",
            ],
            cwd=run_dir,
            env=env,
            timeout_s=60,
        )
    )
    (row,) = listed["rounds"]
    assert (row["status"], row["finished"]) == ("completed", 3), row
    model_file = run_dir / "final.safetensors"
    _run(
        [
            str(bindir / "silofed-coordinator"),
            "rounds",
            "model",
            "--output",
            str(model_file),
            "--state-dir",
            str(state),
        ],
        cwd=run_dir,
        env=env,
        timeout_s=60,
    )
    values = _run(
        [
            str(py),
            "-c",
            "import sys, json; from safetensors.numpy import load_file; "
            "print(json.dumps(load_file(sys.argv[1])['w'].tolist()))",
            str(model_file),
        ],
        cwd=run_dir,
        env=env,
        timeout_s=60,
    )
    w = json.loads(values)
    assert len(w) == 4 and all(abs(v - EXPECTED_W) < W_TOLERANCE for v in w), w
    shutil.rmtree(venv)  # about 500 MB; kept only when the test fails, to look into
    print(
        f"wheel build + venv {built - started:.1f} s, install {installed - built:.1f} s, "
        f"CLIs + federation {federated - installed:.1f} s, total {time.monotonic() - started:.1f} s"
    )

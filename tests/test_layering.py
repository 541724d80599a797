"""The dependency rules between the packages, enforced by walking every import in them.

secagg <- silofed <- coordinator | silo_agent:  coordinator -> silofed, secagg, protos;
silo_agent -> silofed, secagg, protos;  silofed -> secagg (never coordinator, silo_agent, grpc or
protos: it is the neutral package both sides import);  secagg -> (cryptography, numpy, stdlib,
dp_accounting) only;  examples (tasks) -> silofed.  coordinator and silo_agent never import each
other, and only the servicer, the server builder and the silo's connection module touch grpc.
The walk sees what a file names; a child process checks what a role actually loads, tasks
included.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "secagg": {"grpc", "protos", "coordinator", "silo_agent", "silofed", "torch", "grpc_health"},
    "silofed": {"grpc", "grpc_health", "protos", "coordinator", "silo_agent"},
    "coordinator": {"silo_agent"},
    "silo_agent": {"coordinator"},
    # A task is loaded by both roles: it may see only the task API (silofed).
    "examples": {"coordinator", "silo_agent", "grpc", "grpc_health", "protos"},
}
# The demo drives a federation as its operator would (provisioning, reading the round log); it is
# a script, never loaded by a role, so the tasks' rule does not bind it.
EXEMPT = {"examples/digits/demo.py"}
# The tasks shipped in examples/: the roles' processes below load each of them.
EXAMPLE_TASKS = (
    "examples.hospital.task:TASK",
    "examples.digits.task:TASK",
    "examples.noop.task:TASK",
    "examples.linear.task:TASK",
)
# secagg must also stay free of I/O: no sockets, files, clocks or global randomness.
SECAGG_NO_IO = {
    "socket",
    "time",
    "random",
    "secrets",
    "os",
    "pathlib",
    "io",
    "subprocess",
    "threading",
    "asyncio",
    "shutil",
    "tempfile",
    "urllib",
    "http",
}
# datetime is allowed as a type (time comes in as an argument) but its clock calls are not.
CLOCK_CALLS = {"now", "utcnow", "today"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def package_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


def test_packages_respect_dependency_direction() -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package, forbidden in FORBIDDEN.items()
        for path in package_files(package)
        if str(path.relative_to(ROOT)) not in EXEMPT
        for name in imports_of(path)
        if top(name) in forbidden
    ]
    assert not broken, "layering broken:\n" + "\n".join(broken)


# Imports what a role's process imports (its console script, its runtime, every example task,
# the model loaded the way the role loads it) and prints the top-level packages then loaded.
ROLE_CHILD = textwrap.dedent(
    """
    import json, sys
    import {modules}
    from silofed.task import load_model_factory, load_task
    for spec in {specs!r}:
        {load}(spec){build}
    print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
    """
)


def loaded_by(modules: str, load: str, build: str) -> set[str]:
    code = ROLE_CHILD.format(modules=modules, specs=EXAMPLE_TASKS, load=load, build=build)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SILOFED_NOOP_PARAMS": "100"}
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    loaded: list[str] = json.loads(child.stdout.splitlines()[-1])
    return set(loaded)


def test_the_coordinator_process_does_not_load_silo_agent() -> None:
    loaded = loaded_by("coordinator.cli, coordinator.runtime.hub", "load_model_factory", "()")
    assert {"coordinator", "silofed", "examples", "torch"} <= loaded  # the child did its work
    assert "silo_agent" not in loaded


def test_the_silo_process_does_not_load_coordinator() -> None:
    loaded = loaded_by("silo_agent.cli, silo_agent.runtime.runner", "load_task", ".build_model()")
    assert {"silo_agent", "silofed", "examples", "torch"} <= loaded
    assert "coordinator" not in loaded


def test_every_ruled_package_is_walked() -> None:
    # A package the walker finds no file in would pass every rule vacuously.
    assert all(package_files(package) for package in FORBIDDEN)


def test_secagg_does_no_io() -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in package_files("secagg")
        for name in imports_of(path)
        if top(name) in SECAGG_NO_IO
    ]
    assert not broken, "secagg must stay pure:\n" + "\n".join(broken)


def test_secagg_reads_no_clock() -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{node.lineno} calls .{node.func.attr}()"
        for path in package_files("secagg")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in CLOCK_CALLS
    ]
    assert not broken, "secagg takes time as an argument:\n" + "\n".join(broken)


def test_only_transport_modules_touch_grpc() -> None:
    allowed = {
        "coordinator/transport/servicer.py",
        "coordinator/transport/server.py",
        "coordinator/transport/status_client.py",
        "silo_agent/transport/connection.py",
    }
    broken = [
        str(path.relative_to(ROOT))
        for package in ("coordinator", "silo_agent")
        for path in package_files(package)
        if any(top(n) in {"grpc", "grpc_health"} for n in imports_of(path))
        and str(path.relative_to(ROOT)) not in allowed
    ]
    assert not broken, f"grpc used outside the transport modules: {broken}"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    # The walker itself must see imports, or every test above would pass vacuously.
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom silo_agent.runtime.runner import SiloRunner\n")
    assert {"grpc", "silo_agent.runtime.runner"} <= imports_of(sample)

"""The dependency rules between the packages, enforced by walking every import in them.

coordinator -> silofed, secagg, protos;  silo_agent -> silofed, secagg, protos;  examples ->
silofed;  silofed -> secagg (never coordinator, silo_agent, grpc or protos: it is the neutral
package both sides import);  secagg -> (cryptography, numpy, stdlib, dp_accounting) only.
coordinator and silo_agent never import each other, and only the servicer, the server builder and
the silo's connection module touch grpc.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "secagg": {"grpc", "protos", "coordinator", "silo_agent", "silofed", "torch", "grpc_health"},
    "silofed": {"grpc", "grpc_health", "protos", "coordinator", "silo_agent"},
    "coordinator": {"silo_agent"},
    "silo_agent": {"coordinator"},
}
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
        for name in imports_of(path)
        if top(name) in forbidden
    ]
    assert not broken, "layering broken:\n" + "\n".join(broken)


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
        "coordinator/servicer.py",
        "coordinator/server.py",
        "coordinator/status_client.py",
        "silo_agent/connection.py",
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
    sample.write_text("import grpc\nfrom silo_agent.task import Task\n")
    assert {"grpc", "silo_agent.task"} <= imports_of(sample)


def test_the_two_logging_setups_stay_identical() -> None:
    """coordinator/logs.py and silo_agent/logs.py do I/O (stderr redirection), so by the layering
    rule each side owns its copy; this keeps the copies from drifting apart (all but the
    docstring's first line, which names the side)."""
    root = Path(__file__).resolve().parent.parent
    coordinator = (root / "coordinator" / "logs.py").read_text().splitlines()[1:]
    silo = (root / "silo_agent" / "logs.py").read_text().splitlines()[1:]
    assert coordinator == silo

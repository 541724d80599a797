"""Fixtures shared by the end-to-end tests, and the `serial` mark for pytest-xdist runs.

Rule: a fixture that starts processes stops them itself, by PID (`Processes.stop_all`), also
when the test fails; the test puts the processes' logs (`FederationRun.logs`) in its assertion
messages. A test that measures what other tests' load changes (a process's peak memory while
data arrives faster than it is read, "answered within 1 s") is marked `serial` (in the test, or
by node id in SERIAL below): under pytest-xdist it runs while no other test of the run does.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from tests.federation_helpers import FederationRun, NewFederation, processes


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[NewFederation]:
    """`federation(federation_id, names)`: a federation provisioned under `tmp_path`, each of
    whose processes is stopped when the test ends (see FederationRun)."""
    with processes(tmp_path / "logs") as procs:
        yield lambda federation_id, names: FederationRun.provision(
            tmp_path, procs, federation_id, names
        )


# ---- serial tests under pytest-xdist ---------------------------------------------------------

# Tests whose figures depend on the machine's load (node id without parameters: why).
SERIAL = {
    "tests/test_hostile_offers.py::test_a_declared_10_gib_model_is_refused_before_buffering": (
        "a silo's RSS while 96 MiB of chunks arrive: grew 81 MiB under -n 3, 27 MiB alone"
    ),
    "tests/test_hostile_silo_flow.py::test_a_member_that_never_reads_is_dropped_and_memory_"
    "stays_flat": "the coordinator's RSS over 15 rounds while one member never reads",
    "tests/test_hostile_silo_admission.py::test_hello_deadline_and_one_stream_per_identity": (
        "a refusal within 2 s of the hello deadline"
    ),
    "tests/test_hostile_silo_admission.py::test_streams_waiting_for_hello_are_bounded": (
        "a refusal within 1 s"
    ),
    "tests/test_hostile_silo_admission.py::test_a_new_stream_replaces_an_admitted_one": (
        "the old stream ends within 1 s"
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serial: under pytest-xdist, runs while no other test of the run does"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[", 1)[0] in SERIAL:
            item.add_marker(pytest.mark.serial)
        # `make test` distributes single tests (`--dist loadgroup`), not whole files, so one long
        # file does not hold a worker while the others idle; a test that shares a module-scoped
        # fixture (one federation run that several tests read) stays with that fixture's others.
        if _uses_a_shared_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def _uses_a_shared_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        defs and defs[-1].scope in ("module", "package", "class")
        for defs in info.name2fixturedefs.values()
    )


class RunLock:
    """A readers-writer lock shared by the workers of one xdist run (flock on two files): every
    test holds it shared, a `serial` test exclusively. A writer takes the gate first and keeps
    it until it is done, so workers starting new tests queue behind it instead of starving it."""

    def __init__(self, path: Path) -> None:
        self.gate: IO[bytes] = open(f"{path}.gate", "ab")  # noqa: SIM115 (held for the run)
        self.lock: IO[bytes] = open(path, "ab")  # noqa: SIM115

    @contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)


_run_lock: RunLock | None = None


def _xdist_run_lock() -> RunLock | None:
    """This worker's handle on the run's lock; None outside pytest-xdist workers."""
    global _run_lock
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run or not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    if _run_lock is None:
        _run_lock = RunLock(Path(tempfile.gettempdir()) / f"silofed-tests-{run}.lock")
    return _run_lock


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Setup, call and teardown (module fixtures' included) under the run's lock."""
    lock = _xdist_run_lock()
    if lock is None:
        return (yield)
    with lock.hold(exclusive=item.get_closest_marker("serial") is not None):
        return (yield)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """End the process launcher (tests/launcher.py) this pytest process started, if any."""
    from tests import launcher

    launcher.stop_launcher()

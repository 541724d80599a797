"""Fixtures shared by the end-to-end tests.

Rule: a fixture that starts processes stops them itself, by PID (`Processes.stop_all`), also
when the test fails; the test puts the processes' logs (`FederationRun.logs`) in its assertion
messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

"""`[metrics]` and `[debug]` are tables of the coordinator's configuration: checked when it loads,
read from the loaded configuration by the metrics endpoint and the debug pause (not from the
file again)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from coordinator.config import PAUSE_POINTS, ConfigError, load_coordinator_config
from coordinator.observability.metrics import start_metrics_from_config
from coordinator.runtime.debug_pause import DebugPause
from protos import federation_pb2 as pb
from tests.test_config import COORD, _files


def _load(tmp_path: Path, extra: str) -> Path:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(COORD + extra)
    return path


def test_the_tables_are_optional(tmp_path: Path) -> None:
    config = load_coordinator_config(_load(tmp_path, ""))
    assert config.metrics is None
    assert config.debug.pause_after_phase is None
    assert start_metrics_from_config(config, lambda: pb.StatusReply()) is None
    assert DebugPause.from_config(config, threading.Event()).point is None


def test_the_loaded_tables_drive_the_endpoint_and_the_pause(tmp_path: Path) -> None:
    path = _load(
        tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n[debug]\npause_after_phase = "unmask"\n'
    )
    config = load_coordinator_config(path)
    assert config.metrics is not None and config.metrics.listen == "127.0.0.1:0"
    assert config.debug.pause_after_phase == "unmask"
    path.write_text(COORD)  # what runs is what was loaded, not what the file says now
    assert DebugPause.from_config(config, threading.Event()).point == "unmask"
    config.state_dir.mkdir()
    server = start_metrics_from_config(config, lambda: pb.StatusReply(federation_id="fed"))
    assert server is not None
    try:
        assert (config.state_dir / "metrics.port").read_text() == f"{server.port}\n"
        assert server.port > 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('[debug]\npause_after_phase = "train"', "[debug] pause_after_phase must be one of"),
        ("[debug]\npause_after_phase = 3", "[debug] pause_after_phase"),
        ('[debug]\npause_after = "offer"', "[debug] pause_after"),
        ('[metrics]\nlisten = "9464"', "[metrics] listen"),
        ('[metrics]\nlisten = "127.0.0.1:9464"\nport = 1', "[metrics] port"),
        ("[metrics]", "[metrics] listen"),
    ],
)
def test_a_bad_table_is_refused_naming_file_table_and_key(
    tmp_path: Path, extra: str, problem: str
) -> None:
    path = _load(tmp_path, extra + "\n")
    with pytest.raises(ConfigError) as refused:
        load_coordinator_config(path)
    assert f"{path}: {problem}" in str(refused.value), refused.value


def test_every_pause_point_is_accepted(tmp_path: Path) -> None:
    for point in PAUSE_POINTS:
        path = _load(tmp_path, f'[debug]\npause_after_phase = "{point}"\n')
        assert load_coordinator_config(path).debug.pause_after_phase == point

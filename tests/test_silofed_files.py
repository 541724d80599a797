"""silofed.files.write_atomically: the mode asked for whatever the umask, whole files only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from silofed.files import write_atomically


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_replaces_the_file_with_the_mode_asked_for_whatever_the_umask(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "roster.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o666)
    previous = os.umask(0o077)  # would make a plainly created file 0600
    try:
        write_atomically(path, b"new", mode=mode)
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["roster.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "final-model.safetensors"
    path.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, b"new", mode=0o600)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["final-model.safetensors"]


def test_a_missing_folder_is_an_error_not_a_folder_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "no" / "such" / "file", b"x", mode=0o600)
    assert not (tmp_path / "no").exists()

"""Files both roles replace whole: checkpoints, exported models, rosters, the silo's state.

Rule: a file is replaced atomically and durably, never written in place. The bytes go to a
temporary file beside it (same folder, so the rename cannot cross file systems), which gets its
mode explicitly (whatever the umask), is fsync'd and renamed over the old file; then the folder
is fsync'd, since the rename is durable only once the directory entry is. A reader, or a machine
that crashes, sees the old file or the new one, whole, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Replace `path` with `data`, with permissions `mode` (e.g. 0o600 for what only this user
    may read). The folder must exist. Raises OSError; a failed write removes its temporary
    file and leaves whatever was at `path` before."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path)


def fill_atomically(path: Path, fill: Callable[[Path], object], *, mode: int) -> None:
    """`write_atomically` for a writer that writes a file by name itself (`fill(temporary)`,
    e.g. a library streaming a model to disk without holding its bytes): the same temporary
    file, mode, fsync and rename. Raises OSError, or whatever `fill` raises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        fill(Path(tmp))  # the file exists: it keeps its mode
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path)


def _sync_folder(path: Path) -> None:
    """The rename is durable once the folder's entry is."""
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""One silo agent per state directory: an exclusive lock held for the life of the process.

Rule: `hold(state_dir)` takes a non-blocking `flock` on `<state_dir>/agent.lock` and keeps the
file open until the process exits (the kernel drops the lock then, also after SIGKILL, so a
crashed agent never leaves a stale lock behind). Two agents on one state directory would share
one submission log and one ledger and evict each other's streams at the coordinator; the second
is refused at once, with the first one's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_FILENAME = "agent.lock"


class StateDirBusy(Exception):
    """Another agent holds the state directory; str() names it and the pid."""


def hold(state_dir: Path) -> IO[str]:
    """Lock `state_dir` for this process. Keep the returned file open for as long as the agent
    runs. Raises StateDirBusy when another live process holds the lock."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILENAME
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise StateDirBusy(
            f"another silo agent (pid {holder}) is already running with state_dir {state_dir}; "
            "stop it first — two agents on one state directory would undo each other's "
            "secure-aggregation records"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh

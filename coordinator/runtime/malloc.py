"""glibc allocator settings for a long-running coordinator (no-ops on other C libraries).

Why: every silo stream has its own gRPC thread, and glibc gives busy threads their own malloc
arenas, each of which keeps the 1 MiB chunk buffers it freed. With 10 silos that held ~150 MiB
more than with 3 between rounds (bench/round.py); two arenas and a trim after each round keep
the coordinator's memory independent of the number of silos, at no measured speed cost.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger("silofed.coordinator")

M_ARENA_MAX = -8  # from glibc's malloc.h
ARENAS = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library already loaded in this process (no search, no subprocess), if glibc."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas() -> None:
    """Cap malloc arenas (as MALLOC_ARENA_MAX would); call before the server's threads start."""
    libc = _libc()
    if libc is not None and not libc.mallopt(M_ARENA_MAX, ARENAS):
        log.debug("mallopt(M_ARENA_MAX) refused; memory may grow with the number of silos")


def trim() -> None:
    """Return freed heap memory to the system (after a round: its buffers are gone)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

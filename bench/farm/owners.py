"""Which silo each thread of a farm works for, and the CPU seconds of each silo's threads.

Rule: a thread started by a thread that works for a silo works for that silo too (`install`
wraps `threading.Thread.start` for the whole process; the farm starts each silo's first thread
with `start_for`). A live thread's seconds are read from its CPU-time clock
(`pthread_getcpuclockid`); a thread's final seconds are booked from `time.thread_time()` in the
thread itself as it ends, so a short-lived thread (training and masking, one per round) is
counted whole. Both happen under one lock, and a thread books itself while holding it, so a live
thread's clock is only read while the thread still exists, and a silo's total never goes down.
Threads that are not Python threads (gRPC core's own) belong to no silo.
"""

from __future__ import annotations

import threading
import time


class ThreadOwners:
    """See the module docstring. `silo_of(thread)` is the silo it works for, or None."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[threading.Thread, str] = {}  # live threads only
        self._ended_s: dict[str, float] = {}  # CPU seconds of each silo's ended threads

    def silo_of(self, thread: threading.Thread) -> str | None:
        with self._lock:
            return self._owner.get(thread)

    def install(self) -> None:
        """From now on every thread started by a silo's thread is that silo's (process-wide)."""
        original_start = threading.Thread.start
        owners = self

        def start(thread: threading.Thread) -> None:
            silo = owners.silo_of(threading.current_thread())
            if silo is not None:
                owners._adopt(thread, silo)
            original_start(thread)

        threading.Thread.start = start  # type: ignore[method-assign,assignment]

    def start_for(self, silo: str, thread: threading.Thread) -> None:
        """Start `thread` (not started yet) as `silo`'s."""
        self._adopt(thread, silo)
        thread.start()

    def _adopt(self, thread: threading.Thread, silo: str) -> None:
        """Before `thread` starts: it works for `silo`; its seconds are booked as it ends."""
        run = thread.run

        def booked_run() -> None:
            try:
                run()
            finally:
                with self._lock:
                    self._owner.pop(thread, None)
                    self._ended_s[silo] += time.thread_time()

        with self._lock:
            self._owner[thread] = silo
            self._ended_s.setdefault(silo, 0.0)
        thread.run = booked_run  # type: ignore[method-assign]

    def cpu_s(self) -> dict[str, float]:
        """Each silo's CPU seconds so far: its ended threads' and its live threads' own."""
        with self._lock:  # a listed thread cannot end (book itself) until this is released
            totals = dict(self._ended_s)
            for thread, silo in self._owner.items():
                if thread.ident is not None and thread.is_alive():  # started, not gone
                    clock = time.pthread_getcpuclockid(thread.ident)
                    totals[silo] += time.clock_gettime(clock)
        return totals

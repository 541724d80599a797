"""Log lines about peers' errors, at most `burst` (one) per (cause, peer) per interval.

Rule: a peer decides how often the coordinator has something to say about it; the log must not grow
with that. The first `burst` occurrences (default 1) of a (cause, peer) within `interval_s` are
logged at once; further repeats within the interval are only counted; the first one after the
interval is logged with the count of those it stood for: `... (and 19,999 more like it in the last
10 s)`. A count that no later line carries is written by `flush()` as a line of its own once its
interval is over (the hub calls it as messages arrive), so nothing is silently lost. Every string
argument is clipped to `ARG_MAX` characters of one printable line: a peer's text can neither make a
line huge nor forge another line.

The table is bounded too: past `max_keys` live entries, new peers share one entry per cause.
The clock is a parameter (tests inject one).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.runtime.peer_input import clip_text

ARG_MAX = 512
INTERVAL_S = 10.0
MAX_KEYS = 1024
OTHER_PEERS = "(other peers)"


@dataclass(slots=True)
class _Window:
    started: float  # when the window's first line for this key was written
    level: int
    suppressed: int = 0
    written: int = 1  # lines written in this window


class PeerLog:
    """A logger's peer-error lines, rate-limited per (cause, peer). Thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
        burst: int = 1,
    ) -> None:
        if interval_s <= 0 or max_keys < 1 or burst < 1:
            raise ValueError(
                "need interval_s > 0, max_keys >= 1 and burst >= 1, got "
                f"{interval_s}, {max_keys}, {burst}"
            )
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._next_sweep = 0.0

    def warning(self, cause: str, peer: str, msg: str, *args: object) -> bool:
        return self._log(logging.WARNING, cause, peer, msg, args)

    def info(self, cause: str, peer: str, msg: str, *args: object) -> bool:
        return self._log(logging.INFO, cause, peer, msg, args)

    def log(self, level: int, cause: str, peer: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless (cause, peer) has had its `burst` lines in the current
        `interval_s` window. Returns whether a line was written."""
        return self._log(level, cause, peer, msg, args)

    def _log(self, level: int, cause: str, peer: str, msg: str, args: tuple[object, ...]) -> bool:
        now = self.clock()
        with self._lock:
            key = (cause, peer)
            if key not in self._windows and len(self._windows) >= self.max_keys:
                key = (cause, OTHER_PEERS)
            window = self._windows.get(key)
            if window is not None and now - window.started < self.interval_s:
                if window.written < self.burst:
                    window.written += 1
                    window = None  # written as it is: nothing suppressed to report yet
                else:
                    window.suppressed += 1
                    window.level = max(window.level, level)
                    return False
            else:
                self._windows[key] = _Window(now, level)
        if window is not None and window.suppressed:
            msg += " (and %s more like it in the last %.0f s)"
            args = (*args, f"{window.suppressed:,}", now - window.started)
        # stacklevel: the line names the caller of warning()/info()/log(), not this module.
        self.logger.log(level, msg, *(_clip(a) for a in args), stacklevel=3)
        self.flush()
        return True

    def flush(self) -> int:
        """Write the counts whose interval is over and no line carried; forget quiet keys.
        Cheap to call often (it scans at most once a second). Returns the lines written."""
        now = self.clock()
        with self._lock:
            if now < self._next_sweep:
                return 0
            self._next_sweep = now + min(1.0, self.interval_s)
            over = [
                (key, w) for key, w in self._windows.items() if now - w.started >= self.interval_s
            ]
            for key, _ in over:
                del self._windows[key]
        written = 0
        for (cause, peer), w in over:
            if w.suppressed:
                self.logger.log(
                    w.level,
                    "%s: %s more like it (%s) in the last %.0f s",
                    _clip(peer),
                    f"{w.suppressed:,}",
                    _clip(cause),
                    now - w.started,
                )
                written += 1
        return written


def _clip(arg: object) -> object:
    return clip_text(arg, ARG_MAX) if isinstance(arg, str | bytes) else arg


def exception_line(exc: BaseException) -> str:
    """An unexpected error as one bounded line: type, clipped message, and where it was raised
    (a traceback would quote the whole message, which a peer may have made megabytes long)."""
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"
    return f"{type(exc).__name__}: {clip_text(str(exc), ARG_MAX)}{where}"

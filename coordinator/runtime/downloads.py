"""Download slots: at most `[server] max_concurrent_downloads` streams send a model at once.

Rule: a stream takes a slot before it sends a model blob's header and gives it back once the send
of the blob's last chunk completed (gRPC's sync server asks for the next message only then), or
when the stream ends. A stream whose silo reads slowly sits in gRPC's send holding one chunk in
Python and one in gRPC core; the slots bound that memory at about 2 MiB per slot, whatever the
number of silos. A stream waiting for a slot holds nothing (its queue item is the model's mapping,
which every queue shares). Waiters are served first come, first served.

A holder loses its slot when no chunk's send completed for `progress_s` ([deadlines]
upload_progress_s), or when it held the slot longer than `progress_s` plus the blob's size at
`DOWNLOAD_MIN_RATE` (a silo that reads a chunk now and then): then its `download_stalled` ends its
stream. So a silo that stops reading holds a slot for a bounded time, and a waiter's turn comes
within a bounded time too. Every waiter looks for such holders while it
waits, and the driver's tick does (uploads.watch_streams). Time is the hub's clock (monotonic), so
tests use a fake one. Thread-safe; nothing here knows gRPC.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Protocol

from coordinator.runtime.clock import Clock

# How often a waiter looks at the holders (a release wakes it at once).
EVICTION_POLL_S = 1.0
# The slowest download a slot waits for (besides the progress bound). Lower than uploads' 1 MiB/s:
# the slots share the coordinator's uplink, so 8 slots at this rate need 16 Mbit/s, where a
# trickle (a chunk every `progress_s`) is well below it.
DOWNLOAD_MIN_RATE = 256 << 10  # bytes per second


class Holder(Protocol):
    """A stream as the slots see it (coordinator/runtime/stream.py:SiloStream)."""

    silo_id: str

    def download_stalled(self, why: str) -> None:
        """It lost its slot for making no progress: end its stream (any thread)."""
        ...


@dataclass(slots=True)
class _Hold:
    since: float  # monotonic seconds when the slot was taken
    moved_at: float  # ... when a chunk's send last completed
    total_bytes: int  # the blob's size


class DownloadSlots:
    """The slots and the queue of streams waiting for one (see the module's rule)."""

    def __init__(
        self,
        count: int,
        *,
        clock: Clock,
        progress_s: float,
        min_rate: float = DOWNLOAD_MIN_RATE,
    ) -> None:
        if count < 1 or progress_s <= 0 or min_rate <= 0:
            raise ValueError(
                f"need count >= 1, progress_s > 0 and min_rate > 0, got {count}, {progress_s}, "
                f"{min_rate}"
            )
        self.count = count
        self._clock = clock
        self._progress_s = progress_s
        self._min_rate = min_rate
        self._cond = threading.Condition(threading.Lock())
        self._holds: dict[Holder, _Hold] = {}
        self._waiting: collections.deque[Holder] = collections.deque()
        self.evicted = 0  # holders whose slot was taken back (`evict_stalled`)

    @property
    def holders(self) -> list[str]:
        with self._cond:
            return sorted(h.silo_id for h in self._holds)

    @property
    def waiting(self) -> list[str]:
        """Silos waiting for a slot, first in line first."""
        with self._cond:
            return [h.silo_id for h in self._waiting]

    def acquire(self, holder: Holder, total_bytes: int, wait_s: float) -> bool:
        """Take a slot for `holder` to send a blob of `total_bytes`, waiting at most `wait_s`
        (its place in line is kept when its turn has not come). True once it holds one; a
        holder that gives up waiting must `release`."""
        deadline = self._clock.monotonic() + wait_s
        while True:
            self.evict_stalled()
            with self._cond:
                if holder in self._holds:
                    return True
                if holder not in self._waiting:
                    self._waiting.append(holder)
                if len(self._holds) < self.count and self._waiting[0] is holder:
                    self._waiting.popleft()
                    now = self._clock.monotonic()
                    self._holds[holder] = _Hold(now, now, total_bytes)
                    self._cond.notify_all()  # the next in line, if a slot is left
                    return True
                left = deadline - self._clock.monotonic()
                if left <= 0:
                    return False
                self._clock.wait(self._cond, min(left, EVICTION_POLL_S))

    def moved(self, holder: Holder) -> None:
        """A chunk's send to `holder` completed: it makes progress."""
        with self._cond:
            hold = self._holds.get(holder)
            if hold is not None:
                hold.moved_at = self._clock.monotonic()

    def holds(self, holder: Holder) -> bool:
        with self._cond:
            return holder in self._holds

    def release(self, holder: Holder) -> None:
        """`holder` is done (or its stream ended): its slot, or its place in line, is free.
        Idempotent."""
        with self._cond:
            self._holds.pop(holder, None)
            if holder in self._waiting:
                self._waiting.remove(holder)
            self._cond.notify_all()

    def evict_stalled(self) -> int:
        """Take the slot back from every holder past its bounds and have its stream ended
        (`download_stalled`, called without this object's lock). Returns how many."""
        now = self._clock.monotonic()
        stalled: list[tuple[Holder, str]] = []
        with self._cond:
            for holder, hold in self._holds.items():
                idle, held = now - hold.moved_at, now - hold.since
                allowed = self._progress_s + hold.total_bytes / self._min_rate
                if idle >= self._progress_s:
                    why = (
                        f"download stalled: no chunk taken for {idle:.1f} s ([deadlines] "
                        f"upload_progress_s = {self._progress_s:g}); its download slot is freed"
                    )
                elif held >= allowed:
                    why = (
                        f"download too slow: {held:.1f} s for {hold.total_bytes} bytes (at most "
                        f"[deadlines] upload_progress_s = {self._progress_s:g} s plus "
                        f"{self._min_rate / 2**10:g} KiB/s); its download slot is freed"
                    )
                else:
                    continue
                stalled.append((holder, why))
            for holder, _ in stalled:
                del self._holds[holder]
            if stalled:
                self.evicted += len(stalled)
                self._cond.notify_all()
        for holder, why in stalled:
            holder.download_stalled(why)
        return len(stalled)

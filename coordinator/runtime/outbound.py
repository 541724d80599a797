"""A silo's outbound queue, bounded in bytes: a silo that stops reading cannot grow the coordinator.

Rule: every queued item counts what it will put on the wire until the stream takes it: a message
its encoded size, a blob (the model, whose bytes all silos' queues share) its full size until the
stream has taken its chunks (`taken`). The bound is one blob, the largest this queue was ever
given, plus `slack_bytes`: a silo that reads holds at most the current model and a few frames; one
that stops reading passes the bound as soon as a second model is queued behind the first. Past the
bound the queue overflows for good: it drops what it holds (the memory is freed now, not when the
stream ends), accepts nothing more but its end marker (`put_last`), and reports `overflow`; the
owner then drops the silo. Thread-safe; nothing here knows rounds, gRPC or silos.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

# Room beside one model: round offers, secagg frames, roster updates and results are all far
# smaller; the limit only has to tell "reads its stream" from "does not".
SLACK_BYTES = 4 << 20

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Overflow:
    """Why a queue stopped accepting items: it would have held `pending_bytes` > `limit_bytes`."""

    pending_bytes: int
    limit_bytes: int
    largest_blob_bytes: int

    def __str__(self) -> str:
        return (
            f"its outbound queue would hold {_mib(self.pending_bytes)}, over the bound of "
            f"{_mib(self.limit_bytes)} (one model of {_mib(self.largest_blob_bytes)} plus "
            f"{_mib(self.limit_bytes - self.largest_blob_bytes)}): the silo is not reading its "
            "stream"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    item: T
    cost: int  # bytes counted until the stream takes the item
    lazy: int  # of which bytes the stream takes later, chunk by chunk (`taken`)


class OutboundQueue(Generic[T]):
    """FIFO of items for one stream, bounded in pending bytes (see the module's rule)."""

    def __init__(self, slack_bytes: int = SLACK_BYTES) -> None:
        if slack_bytes < 0:
            raise ValueError(f"slack_bytes must be >= 0, got {slack_bytes}")
        self._slack = slack_bytes
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[_Entry[T]] = collections.deque()
        self._pending = 0
        self._largest_blob = 0
        self._overflow: Overflow | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes queued or being sent that the stream has not taken yet."""
        with self._cond:
            return self._pending

    @property
    def overflow(self) -> Overflow | None:
        with self._cond:
            return self._overflow

    def put(self, item: T, cost: int, *, blob_bytes: int = 0) -> bool:
        """Queue `item` counting `cost` bytes, of which `blob_bytes` are a blob's (taken later,
        chunk by chunk). False when the queue overflowed, now or before: nothing was queued."""
        if cost < 0 or not 0 <= blob_bytes <= cost:
            raise ValueError(f"need 0 <= blob_bytes ({blob_bytes}) <= cost ({cost})")
        with self._cond:
            if self._overflow is not None:
                return False
            largest = max(self._largest_blob, blob_bytes)
            limit = largest + self._slack
            if self._pending + cost > limit:
                self._overflow = Overflow(self._pending + cost, limit, largest)
                self._items.clear()  # the blobs' bytes are freed once the stream lets go too
                self._pending = 0
                self._cond.notify_all()
                return False
            self._largest_blob = largest
            self._pending += cost
            self._items.append(_Entry(item, cost, blob_bytes))
            self._cond.notify_all()
            return True

    def put_last(self, item: T) -> None:
        """Queue the end marker: accepted even after an overflow, and never counted."""
        with self._cond:
            self._items.append(_Entry(item, 0, 0))
            self._cond.notify_all()

    def get(self, timeout_s: float) -> T:
        """The next item; raises queue.Empty after `timeout_s` without one. A blob's bytes stay
        counted until reported `taken`."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout=timeout_s):
                raise queue.Empty
            entry = self._items.popleft()
            self._pending -= entry.cost - entry.lazy
            return entry.item

    def taken(self, n: int) -> None:
        """The stream took `n` more bytes of the blob it is sending."""
        with self._cond:
            if self._overflow is None:  # after an overflow nothing is counted any more
                self._pending = max(0, self._pending - n)

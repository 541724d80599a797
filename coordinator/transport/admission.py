"""Who holds a stream of the coordinator: one per identity, and a bounded number in all.

Rule: bookkeeping under locks, no gRPC and no I/O. A stream is *pending* from the moment its
certificate passed the hub's check until the hub admits its hello, then *admitted* until it
ends. Opening a stream for an identity that already holds one replaces the old stream (a
restarted silo must not wait for its dead stream to time out): the old one is marked replaced,
woken, and its session (when it was admitted) handed to the caller to end. At most
`max_pending` streams are pending and at most `capacity` are open in all; beyond, `open` raises
`Busy` and nothing is held. A replaced stream is never admitted afterwards: `admit` checks and
admits under the identity's own lock, the one `open` holds while it marks the old stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """No room for another stream; str() says which bound and what to change."""


@dataclass(eq=False)
class Stream(Generic[T]):
    """One open stream of `identity`; `wake` is set when it is replaced."""

    identity: str
    wake: threading.Event = field(default_factory=threading.Event)
    replaced: bool = False
    session: T | None = None  # set once the hub admitted the stream's hello


class StreamTable(Generic[T]):
    """The open streams by identity. Thread-safe."""

    def __init__(self, *, max_pending: int, capacity: int) -> None:
        if not 1 <= max_pending <= capacity:
            raise ValueError(f"need 1 <= max_pending <= capacity, got {max_pending}, {capacity}")
        self.max_pending = max_pending
        self.capacity = capacity
        self._lock = threading.Lock()
        self._streams: dict[str, Stream[T]] = {}
        self._pending = 0
        # One lock per identity that ever passed the certificate check (bounded by the roster).
        self._identity_locks: dict[str, threading.Lock] = {}

    def _identity_lock(self, identity: str) -> threading.Lock:
        with self._lock:
            return self._identity_locks.setdefault(identity, threading.Lock())

    def open(self, identity: str) -> tuple[Stream[T], T | None]:
        """Register a new stream of `identity`, replacing the one it holds. Returns the new
        stream and the replaced stream's session, if it had one (the caller ends it).
        Raises Busy when a bound is reached; the old stream then stays."""
        with self._identity_lock(identity), self._lock:
            old = self._streams.get(identity)
            old_pending = old is not None and old.session is None
            if self._pending - old_pending >= self.max_pending:
                raise Busy(
                    f"{self.max_pending} streams are already waiting for their hello; try again "
                    "shortly (raise [server] max_pending_streams for many silos reconnecting)"
                )
            if len(self._streams) - (old is not None) >= self.capacity:
                raise Busy(
                    f"the coordinator serves at most {self.capacity} streams and all are open; "
                    "restart it to serve a larger roster"
                )
            stream: Stream[T] = Stream(identity)
            self._streams[identity] = stream
            self._pending += 1 - old_pending
            if old is None:
                return stream, None
            old.replaced = True
            old.wake.set()
            return stream, old.session

    def admit(self, stream: Stream[T], admit: Callable[[], T]) -> T | None:
        """`admit()` (the hub's admission) unless `stream` was replaced meanwhile: then None,
        and `admit` is not called. Exceptions from `admit` propagate; the stream stays pending
        until `close`."""
        with self._identity_lock(stream.identity):
            if stream.replaced:
                return None
            session = admit()
            with self._lock:
                stream.session = session
                if self._streams.get(stream.identity) is stream:
                    self._pending -= 1
            return session

    def close(self, stream: Stream[T]) -> None:
        """Forget `stream` (idempotent); a replaced stream was forgotten when replaced."""
        with self._lock:
            if self._streams.get(stream.identity) is stream:
                del self._streams[stream.identity]
                self._pending -= stream.session is None

    def counts(self) -> tuple[int, int]:
        """(pending, open) streams."""
        with self._lock:
            return self._pending, len(self._streams)

"""Certificate expiry warnings: when a certificate is close enough to expiry to say so.

Rule: pure decisions over times (unix seconds) plus one small rate limiter; no I/O. The same
sentence serves the coordinator's log, `silofed-coordinator status` and `silofed-silo check`, so
an operator reads one wording wherever the warning shows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

DAY_S = 86400.0
DEFAULT_WARNING_DAYS = 30.0


def expiry_warning(subject: str, not_after: float, now: float, warning_days: float) -> str | None:
    """The warning for `subject`'s certificate ending at `not_after`, or None when it has more
    than `warning_days` left."""
    left = not_after - now
    if left > warning_days * DAY_S:
        return None
    if left <= 0:
        return f"the certificate of {subject} has expired ({-left / DAY_S:.1f} days ago)"
    return (
        f"the certificate of {subject} expires in {left / DAY_S:.1f} days: it renews over its "
        "connection when [pki] renewal is on (check `silofed-coordinator pki list` for requests "
        "waiting for approval), else issue a new one before it expires"
    )


@dataclass
class DailyOnce:
    """Lets one line per key through per `period_s` (the coordinator warns once a day per silo)."""

    period_s: float = DAY_S
    _last: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, key: str, now: float) -> bool:
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                return False
            self._last[key] = now
            return True

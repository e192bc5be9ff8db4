"""Per-source request rate limit: a token bucket per source address (``[limits]`` rate/burst).

Over the limit a request is answered 503 with Retry-After and counted; other
sources are not affected.  The buckets are this worker's own: a source whose
requests are spread over N workers gets up to N x rate (documented as such;
the deployment-wide protection against guessing is ``msilo.auth.throttle``).
Buckets of quiet sources are dropped so a flood from many addresses cannot grow
the table without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` requests per second per source, with bursts up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 100_000,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate is expected to be > 0")
        self.rate = float(rate)
        self.burst = float(burst) if burst else 2.0 * self.rate
        self._clock = clock
        self._max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, last time)

    def allow(self, source: str) -> bool:
        """Take one token for ``source``; False when its bucket is empty."""
        now = self._clock()
        tokens, last = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0 - 1e-9:  # float slack: 0.1 s at 10/s is a whole token
            self._buckets[source] = (tokens, now)
            return False
        if source not in self._buckets and len(self._buckets) >= self._max_sources:
            self._forget_full(now)
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def retry_after(self) -> int:
        """Seconds a refused source should wait before trying again (at least 1)."""
        return max(1, int(1.0 / self.rate + 0.999))

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled completely carries no information: drop those first.
        full = [
            source
            for source, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for source in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[source]

    def __len__(self) -> int:
        return len(self._buckets)

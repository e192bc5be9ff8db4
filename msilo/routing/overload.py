"""Local overload control by queue delay: shed new requests while old ones still wait.

A server past its capacity that keeps queueing answers every request late; once answers
take longer than the clients' retransmission interval (Timer E starts at T1 = 500 ms) the
retransmissions add load of their own and goodput collapses (RFC 6357 §3.2).  Queue
length says little about that (a batch of 500 may clear in 5 ms or in 5 s); the delay of
the oldest request still waiting for its answer says exactly that.  While it exceeds
``max_delay``, new requests are answered 503 + Retry-After at once, which costs a parse
and a send; the requests already admitted go on, the queue drains, the delay falls and
admission resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

#: Requests per second assumed taken off the queue before any was measured (a backlog at
#: start is judged at this rate: 1,000 queued = 1 s of waiting).
MIN_DRAIN_RATE = 1000.0
_BACKLOG_PERIOD = 0.002  # seconds between two looks at the socket queues
_RATE_PERIOD = 0.1  # seconds over which the drain rate is measured


class OverloadGuard:
    """Admits requests unless the oldest unanswered one has waited over ``max_delay`` s,
    or the requests still queued in the sockets would.

    A request counts as waiting from admission until ``done`` -- its final answer, or the
    moment it starts waiting on something other than this server (a relay to a device).
    ``backlog`` (optional) tells how many requests wait unread in the sockets' receive
    queues; at the rate requests are taken off them (admitted or shed) that is how long the
    next one will have waited when it is read.
    """

    def __init__(
        self,
        max_delay: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        if max_delay <= 0:
            raise ValueError("max_delay is expected to be greater than zero")
        self.max_delay = max_delay
        self._clock = clock
        self._waiting: dict[Hashable, float] = {}  # insertion order = admission order
        self._backlog = backlog
        self._looked_at = -1.0
        self._queue_too_long = False
        self._taken = 0  # requests judged since _rate_since
        self._rate_since = clock()
        self._rate = 0.0  # requests taken off the queues per second, smoothed

    def overloaded(self) -> bool:
        """True while new requests should be refused (see the class docstring)."""
        now = self._clock()
        for since in self._waiting.values():
            if now - since > self.max_delay:
                return True
            break
        if self._backlog is None:
            return False
        if now - self._looked_at >= _BACKLOG_PERIOD:
            self._looked_at = now
            elapsed = now - self._rate_since
            if elapsed >= _RATE_PERIOD:
                measured = self._taken / elapsed
                self._rate = measured if self._rate == 0 else 0.7 * self._rate + 0.3 * measured
                self._taken, self._rate_since = 0, now
            queued = self._backlog()
            self._queue_too_long = queued / max(self._rate, MIN_DRAIN_RATE) > self.max_delay
        return self._queue_too_long

    def admit(self, key: Hashable) -> bool:
        """True (and ``key`` waits from now) unless the server is overloaded."""
        self._taken += 1
        if self.overloaded():
            return False
        self._waiting[key] = self._clock()
        return True

    def refused(self) -> None:
        """A request was refused before ``admit`` (by the transaction layer's early check:
        no task, no route); it still counts as taken off the queue."""
        self._taken += 1

    def done(self, key: Hashable) -> None:
        """``key`` no longer waits on this server (answered, relayed, or gone)."""
        self._waiting.pop(key, None)

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet done."""
        return len(self._waiting)

    def oldest_delay(self) -> float:
        """How long the oldest waiting request has waited (0 when none does)."""
        now = self._clock()
        for since in self._waiting.values():
            return now - since
        return 0.0

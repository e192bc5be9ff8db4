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


class OverloadGuard:
    """Admits requests unless the oldest unanswered one has waited over ``max_delay`` s.

    A request counts as waiting from admission until ``done`` -- its final answer, or the
    moment it starts waiting on something other than this server (a relay to a device).
    """

    def __init__(self, max_delay: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_delay <= 0:
            raise ValueError("max_delay is expected to be greater than zero")
        self.max_delay = max_delay
        self._clock = clock
        self._waiting: dict[Hashable, float] = {}  # insertion order = admission order

    def admit(self, key: Hashable) -> bool:
        """True (and ``key`` waits from now) unless the server is overloaded."""
        now = self._clock()
        for since in self._waiting.values():
            if now - since > self.max_delay:
                return False
            break
        self._waiting[key] = now
        return True

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

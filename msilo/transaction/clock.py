"""Time for the transaction layer: the clock interface, a manual clock, RFC 3261 timer values.

The transaction layer never sleeps and never reads the wall clock itself; it
asks a :class:`Clock` (an asyncio loop is one) for ``time()`` and
``call_later()``.  Tests pass a :class:`ManualClock` and move time by hand, so
Timer E/F/J/K behaviour is tested exactly and instantly.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class TimerHandle(Protocol):
    """What ``call_later`` returns (``asyncio.TimerHandle`` fits)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The scheduling interface the transaction layer needs (an asyncio loop fits)."""

    def time(self) -> float: ...

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> TimerHandle: ...


@dataclass(frozen=True, slots=True)
class TimerValues:
    """RFC 3261 §17.1.1.1 / Table 4 timer bases, in seconds."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests
    t4: float = 5.0  # maximum duration a message remains in the network

    @property
    def timer_f(self) -> float:
        """Non-INVITE transaction timeout (64·T1)."""
        return 64 * self.t1

    @property
    def timer_j(self) -> float:
        """Server wait for request retransmissions over unreliable transports (64·T1)."""
        return 64 * self.t1


class _ManualHandle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to; callbacks run inside :meth:`advance`."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _ManualHandle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self._now

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> _ManualHandle:
        handle = _ManualHandle(self._now + max(delay, 0.0), callback, args)
        heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
        return handle

    def advance(self, seconds: float) -> None:
        """Move time forward, running every callback that falls due, in time order.

        Each callback sees ``time()`` equal to its own due time, so timers it
        schedules are relative to when it fired.
        """
        deadline = self._now + seconds
        heap = self._heap
        while heap and heap[0][0] <= deadline + 1e-9:
            when, _, handle = heapq.heappop(heap)
            if handle.cancelled:
                continue
            self._now = max(self._now, when)
            handle.callback(*handle.args)
        self._now = deadline

    def pending(self) -> int:
        """Timers scheduled and not cancelled."""
        return sum(1 for _, _, h in self._heap if not h.cancelled)


class DeadlineQueue(Generic[T]):
    """Items that each expire a fixed ``delay`` after being pushed.

    All delays are equal, so deadlines arrive in push order: a deque and one
    armed timer replace one heap entry per transaction (O(1) push and expiry).
    Items are never removed early; ``on_expire`` checks whether they still matter.
    """

    __slots__ = ("_armed", "_clock", "_delay", "_items", "_on_expire")

    def __init__(self, clock: Clock, delay: float, on_expire: Callable[[T], None]) -> None:
        self._clock = clock
        self._delay = delay
        self._on_expire = on_expire
        self._items: deque[tuple[float, T]] = deque()
        self._armed: TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T) -> None:
        """Schedule ``item`` to expire ``delay`` seconds from now."""
        self._items.append((self._clock.time() + self._delay, item))
        if self._armed is None:
            self._armed = self._clock.call_later(self._delay, self._fire)

    def _fire(self) -> None:
        self._armed = None
        items = self._items
        now = self._clock.time() + 1e-9
        while items and items[0][0] <= now:
            self._on_expire(items.popleft()[1])
        if items and self._armed is None:
            self._armed = self._clock.call_later(items[0][0] - self._clock.time(), self._fire)

    def close(self) -> None:
        """Forget every item and the armed timer."""
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        self._items.clear()


class ExpiringKeys(Generic[K]):
    """Keys that each expire a fixed ``delay`` after being added, unless discarded first.

    For deadlines that are usually met (a request answered long before it would be
    abandoned): a discarded key costs nothing until its deadline, unlike an item left
    in a :class:`DeadlineQueue` (at thousands of requests a second, tens of thousands
    of dead entries).  Insertion order is deadline order, as in the queue.
    """

    __slots__ = ("_armed", "_clock", "_delay", "_items", "_on_expire")

    def __init__(self, clock: Clock, delay: float, on_expire: Callable[[K], None]) -> None:
        self._clock = clock
        self._delay = delay
        self._on_expire = on_expire
        self._items: OrderedDict[K, float] = OrderedDict()
        self._armed: TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: K) -> None:
        """Expire ``key`` ``delay`` seconds from now (re-adding restarts its delay)."""
        items = self._items
        items.pop(key, None)
        items[key] = self._clock.time() + self._delay
        if self._armed is None:
            self._armed = self._clock.call_later(self._delay, self._fire)

    def discard(self, key: K) -> None:
        """Forget ``key`` (its deadline was met)."""
        self._items.pop(key, None)

    def _fire(self) -> None:
        self._armed = None
        items = self._items
        now = self._clock.time() + 1e-9
        while items:
            key, deadline = next(iter(items.items()))
            if deadline > now:
                break
            del items[key]
            self._on_expire(key)
        if items and self._armed is None:
            first = next(iter(items.values()))
            self._armed = self._clock.call_later(first - self._clock.time(), self._fire)

    def close(self) -> None:
        """Forget every key and the armed timer."""
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        self._items.clear()

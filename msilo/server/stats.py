"""Statistics: the five msilo counters with their documented meanings (D8) plus server counters.

Counters live in a block of 64-bit integers with one row per process, so a
supervisor can sum what its children count without any message passing.  A
block is either private (one process) or in named shared memory that children
attach to by name; each process only ever writes its own row.
"""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing import shared_memory

# The admin guide's counters, with their documented meanings (not the reference's swap, §10 Q2).
MSILO_COUNTERS: dict[str, str] = {
    "stored_messages": "messages stored by msilo",
    "dumped_messages": (
        "stored messages delivered (2xx); with deliver_to = all one per device that got one"
    ),
    "failed_messages": "stored-message deliveries that failed (final >= 300 or timeout)",
    "dumped_reminders": "reminder messages delivered (2xx)",
    "failed_reminders": "reminder deliveries that failed",
}

SERVER_COUNTERS: dict[str, str] = {
    "requests": "SIP requests received (retransmissions excluded)",
    "requests_register": "REGISTER requests received",
    "requests_message": "MESSAGE requests received",
    "requests_options": "OPTIONS requests received",
    "requests_other": "requests with other methods",
    "replies_1xx": "provisional responses sent",
    "replies_2xx": "2xx responses sent",
    "replies_3xx": "3xx responses sent",
    "replies_4xx": "4xx responses sent",
    "replies_5xx": "5xx responses sent",
    "replies_6xx": "6xx responses sent",
    "retransmissions_absorbed": "request retransmissions answered from the transaction layer",
    "parse_errors": "messages that could not be parsed",
    "duplicates": "replayed MESSAGEs recognised by the dedupe key",
    "quota_rejections": "MESSAGEs refused because the mailbox was full (486)",
    "store_failures": "MESSAGEs answered 503 because the database failed",
    "rate_limited": "requests refused (503) by the per-source rate limit",
    "overload_shed": "requests refused (503) at once because the worker was overloaded",
    "auth_failures": "authentications judged and failed (wrong password or unknown user)",
    "auth_throttled": "authentications answered with a fresh challenge without being judged",
    "auth_dropped": "requests dropped unanswered from a source banned for failed authentications",
    "batch_flushes": "batch-writer commits",
    "batch_rows": "rows written by batch-writer commits",
    "relayed_messages": "MESSAGEs relayed to an online user (2xx from a branch)",
    "relayed_late": (
        "relay branches that answered 2xx after relay_timeout (their device is settled)"
    ),
    "devices_due": (
        "(stored message, device) pairs offered for the first time: one per device a stored"
        " message became due to and was first sent to (deliver_to = all)"
    ),
    "transient_not_stored": "MESSAGEs of a transient type (msilo.transient_types) not stored",
    "notifications_sent": "offline notifications sent to senders",
    "leases_recovered": "delivery leases recovered after their deadline",
    "expired_messages": "stored messages deleted because they expired",
    "expiry_notices_sent": "notices sent to senders whose message expired undelivered",
    "responses_handed_off": (
        "responses to our requests that reached another worker, handed to the sender"
    ),
}

COUNTERS: dict[str, str] = {**MSILO_COUNTERS, **SERVER_COUNTERS}
NAMES: tuple[str, ...] = tuple(COUNTERS)
_INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}
_WIDTH = len(NAMES)


class StatsBlock:
    """A table of counters, one row per process; ``rows`` processes share it."""

    def __init__(self, rows: int = 1, *, shared: bool = False, name: str | None = None) -> None:
        self.rows = rows
        size = rows * _WIDTH * 8
        self._shm: shared_memory.SharedMemory | None = None
        buf: memoryview
        if name is not None:
            self._shm = shared_memory.SharedMemory(name=name)
            buf = _buffer(self._shm)
        elif shared:
            self._shm = shared_memory.SharedMemory(create=True, size=size)
            buf = _buffer(self._shm)
            buf[:size] = bytes(size)
        else:
            buf = memoryview(bytearray(size))
        self._cells = buf[:size].cast("q")
        self._owner = shared and name is None

    @property
    def name(self) -> str | None:
        """Name of the shared-memory segment children attach to (None when private)."""
        return self._shm.name if self._shm is not None else None

    def counters(self, row: int = 0) -> Counters:
        """The writer for one process's row."""
        if not 0 <= row < self.rows:
            raise IndexError(f"stats row {row} out of range 0..{self.rows - 1}")
        return Counters(self._cells, row * _WIDTH)

    def row(self, row: int) -> dict[str, int]:
        """One process's counters."""
        base = row * _WIDTH
        return {name: self._cells[base + i] for i, name in enumerate(NAMES)}

    def total(self) -> dict[str, int]:
        """Every counter summed over all rows."""
        sums = [0] * _WIDTH
        cells = self._cells
        for row in range(self.rows):
            base = row * _WIDTH
            for i in range(_WIDTH):
                sums[i] += cells[base + i]
        return dict(zip(NAMES, sums, strict=True))

    def reset_row(self, row: int) -> None:
        """Zero one row (a replaced child starts afresh; its old counts are kept by the caller)."""
        base = row * _WIDTH
        for i in range(_WIDTH):
            self._cells[base + i] = 0

    def close(self) -> None:
        """Detach (and, for the creator, free) the shared memory."""
        self._cells.release()
        if self._shm is not None:
            self._shm.close()
            if self._owner:
                self._shm.unlink()
            self._shm = None


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None  # only None after close()
    return buf


class Counters:
    """Increments one process's row of a :class:`StatsBlock`."""

    __slots__ = ("_base", "_cells")

    def __init__(self, cells: memoryview, base: int) -> None:
        self._cells = cells
        self._base = base

    def incr(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (a KeyError names an unknown counter)."""
        self._cells[self._base + _INDEX[name]] += amount

    def get(self, name: str) -> int:
        """Current value of counter ``name`` in this row."""
        return int(self._cells[self._base + _INDEX[name]])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i, name in enumerate(NAMES):
            yield name, int(self._cells[self._base + i])


def prometheus_text(totals: dict[str, int], gauges: dict[str, float] | None = None) -> bytes:
    """Totals (and optional gauges) in the Prometheus text exposition format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
            for name, value in totals.items():
                yield CounterMetricFamily(f"msilo_{name}", COUNTERS.get(name, name), value=value)
            for name, gauge in (gauges or {}).items():
                yield GaugeMetricFamily(f"msilo_{name}", name.replace("_", " "), value=gauge)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)

"""Statistics: the five msilo counters with their documented meanings (D8) plus server counters.

Counters live in a block of 64-bit integers with one row per process, so a
supervisor can sum what its children count without any message passing.  A
block is either private (one process) or in named shared memory that children
attach to by name; each process only ever writes its own row.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
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
    "pushes_sent": "push notifications a provider accepted (RFC 8599 wake-ups)",
    "pushes_failed": ("push notifications not accepted after every attempt (dead tokens included)"),
    "push_tokens_removed": "devices whose push token a provider called dead (forgotten)",
    "responses_handed_off": (
        "responses to our requests that reached another worker, handed to the sender"
    ),
    "refreshes_deferred": (
        "REGISTER refreshes answered from a read and written later (registrar.write_behind)"
    ),
    "requests_handed_off": (
        "requests for a device's TCP/TLS/WebSocket connection held by another worker,"
        " written on it by that worker"
    ),
}

COUNTERS: dict[str, str] = {**MSILO_COUNTERS, **SERVER_COUNTERS}
NAMES: tuple[str, ...] = tuple(COUNTERS)
_INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}

# Histograms: (help, upper bounds).  Names differ from every counter's (batch_rows_total is
# a counter, batch_size_rows the histogram) so no two metric families share a name.
# Cumulative like counters (folded into the totals when a child exits); each has one cell
# per bucket plus +Inf, then the sum (in millionths) and the count.  Bounds are chosen for
# what an operator asks: "is the 202 fast", "how long did messages wait", "do batches grow
# under load", "how long does a dump take".
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "message_reply_seconds": (
        "MESSAGE received to its 202 Accepted sent (stored and committed), seconds",
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
    "delivery_latency_seconds": (
        "a stored message's arrival to its delivery (2xx from the user's device), seconds",
        (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0, 259200.0, 604800.0),
    ),
    "batch_size_rows": (
        "rows per batch-writer commit (group commit: grows with concurrent MESSAGEs)",
        (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0),
    ),
    "push_delivery_seconds": (
        "a push sent to a device to a stored message delivered to it (push, REGISTER, "
        "dump), seconds",
        (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
    ),
    "dump_duration_seconds": (
        "one m_dump that delivered or tried at least one message, first claim to last answer",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    ),
}
_HIST_BASE: dict[str, int] = {}
_cursor = len(NAMES)
for _name, (_doc, _bounds) in HISTOGRAMS.items():
    _HIST_BASE[_name] = _cursor
    _cursor += len(_bounds) + 3  # buckets, +Inf, sum, count
_HIST_END = _cursor

# Gauges: the current value, written by the process that owns the row (never folded).
GAUGES: dict[str, str] = {
    "queue_depth": "MESSAGEs waiting in this worker's batch-writer queue",
    "queue_capacity": "the batch-writer queue's size (a full queue answers 503)",
    "silo_rows": "rows in the silo table (the leader counts them)",
    "oldest_inc_time": "arrival time of the oldest stored message (the leader reads it)",
    "summary_at": "when the leader last read silo_rows/oldest_inc_time (0: never)",
}
_GAUGE_INDEX: dict[str, int] = {name: _HIST_END + i for i, name in enumerate(GAUGES)}
_WIDTH = _HIST_END + len(GAUGES)
SUM_SCALE = 1_000_000  # histogram sums are kept in millionths in the int64 cells


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
        width = len(NAMES)
        sums = [0] * width
        cells = self._cells
        for row in range(self.rows):
            base = row * _WIDTH
            for i in range(width):
                sums[i] += cells[base + i]
        return dict(zip(NAMES, sums, strict=True))

    def histogram_cells(self, row: int) -> list[int]:
        """One process's histogram cells (cumulative; fold them like counters)."""
        base = row * _WIDTH
        return [self._cells[base + i] for i in range(len(NAMES), _HIST_END)]

    def histogram_total(self) -> list[int]:
        """Every histogram cell summed over all rows."""
        sums = [0] * (_HIST_END - len(NAMES))
        cells = self._cells
        for row in range(self.rows):
            base = row * _WIDTH + len(NAMES)
            for i in range(len(sums)):
                sums[i] += cells[base + i]
        return sums

    def gauges(self, row: int) -> dict[str, int]:
        """One process's gauges."""
        base = row * _WIDTH
        return {name: self._cells[base + i] for name, i in _GAUGE_INDEX.items()}

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

    def observe(self, name: str, value: float) -> None:
        """Add one observation to histogram ``name`` (a KeyError names an unknown one)."""
        bounds = HISTOGRAMS[name][1]
        base = self._base + _HIST_BASE[name]
        cells = self._cells
        cells[base + bisect.bisect_left(bounds, value)] += 1
        cells[base + len(bounds) + 1] += round(value * SUM_SCALE)
        cells[base + len(bounds) + 2] += 1

    def set_gauge(self, name: str, value: int) -> None:
        """Set gauge ``name`` of this row."""
        self._cells[self._base + _GAUGE_INDEX[name]] = value

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i, name in enumerate(NAMES):
            yield name, int(self._cells[self._base + i])


def histogram_families(
    cells: list[int],
) -> Iterator[tuple[str, str, list[tuple[str, float]], float]]:
    """(name, help, cumulative buckets, sum) of each histogram from summed cells."""
    offset = 0
    for name, (doc, bounds) in HISTOGRAMS.items():
        counts = cells[offset : offset + len(bounds) + 1]
        total_sum = cells[offset + len(bounds) + 1] / SUM_SCALE
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else f"{bound:g}"
            buckets.append((label, float(running)))
        yield name, doc, buckets, total_sum
        offset += len(bounds) + 3


@dataclass(frozen=True)
class LabelledGauge:
    """A gauge with one value per label set, e.g. queue depth per worker."""

    doc: str
    labels: tuple[str, ...]
    values: list[tuple[tuple[str, ...], float]]


def prometheus_text(
    totals: dict[str, int],
    gauges: dict[str, float] | None = None,
    *,
    histograms: list[int] | None = None,
    labelled: dict[str, LabelledGauge] | None = None,
    gauge_help: dict[str, str] | None = None,
) -> bytes:
    """Totals (and optional gauges and histograms) in the Prometheus text exposition format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    helps = gauge_help or {}

    class _Collector:
        def collect(
            self,
        ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
            for name, value in totals.items():
                yield CounterMetricFamily(f"msilo_{name}", COUNTERS.get(name, name), value=value)
            for name, gauge in (gauges or {}).items():
                doc = helps.get(name, name.replace("_", " "))
                yield GaugeMetricFamily(f"msilo_{name}", doc, value=gauge)
            for name, spec in (labelled or {}).items():
                family = GaugeMetricFamily(f"msilo_{name}", spec.doc, labels=list(spec.labels))
                for label_values, reading in spec.values:
                    family.add_metric(list(label_values), reading)
                yield family
            if histograms is not None:
                for name, doc, buckets, total_sum in histogram_families(histograms):
                    yield HistogramMetricFamily(
                        f"msilo_{name}", doc, buckets=buckets, sum_value=total_sum
                    )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)

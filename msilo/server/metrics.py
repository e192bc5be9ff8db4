"""Measurements a worker adds to the statistics block beyond counters: delivery latency and
dump duration (histograms), queue depth, and the leader's view of the silo table (gauges).

The Deliverer is measured from the outside (a subclass), so routing keeps no metrics code:
what a delivered row waited is its arrival time (``inc_time``) to the 2xx of its dump.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from msilo.errors import StorageError
from msilo.routing.delivery import Deliverer, DumpReport
from msilo.server.stats import Counters
from msilo.storage.base import Store, StoredMessage
from msilo.transaction.client import ClientResult

log = logging.getLogger("msilo.server")

GAUGE_PERIOD = 0.5  # queue depth: as fresh as a scrape wants it, for the cost of two writes
SUMMARY_PERIOD_MAX = 15.0  # the leader reads the silo table at most this often


class MeasuredDeliverer(Deliverer):
    """A :class:`Deliverer` that records how long dumped messages waited, and dump times."""

    def __init__(self, *args: Any, counters: Counters, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counters = counters

    async def send_row(self, row: StoredMessage, *args: Any, **kwargs: Any) -> ClientResult:
        """Send one row; a 2xx of a stored message (not a reminder) records its wait."""
        result = await super().send_row(row, *args, **kwargs)
        if result.success and not kwargs.get("reminder", False):
            self._counters.observe("delivery_latency_seconds", max(0.0, time.time() - row.inc_time))
        return result

    async def dump(self, *args: Any, **kwargs: Any) -> DumpReport:
        """m_dump; one that delivered or tried at least one message records its duration."""
        started = time.perf_counter()
        report = await super().dump(*args, **kwargs)
        if report.delivered or report.failed:
            self._counters.observe("dump_duration_seconds", time.perf_counter() - started)
        return report


async def keep_queue_gauges(counters: Counters, pending: Callable[[], int], capacity: int) -> None:
    """Publish this worker's batch-writer queue depth until cancelled."""
    counters.set_gauge("queue_capacity", capacity)
    while True:
        counters.set_gauge("queue_depth", pending())
        await asyncio.sleep(GAUGE_PERIOD)


async def keep_silo_summary(
    counters: Counters, store: Store, leading: Callable[[], bool], period: float
) -> None:
    """While this process leads, read the silo table's size and oldest row every ``period``.

    One leader per deployment does it, so N hosts cost one count, not N; the oldest row
    comes from the expiry index (:meth:`Store.silo_summary`).
    """
    while True:
        if leading():
            try:
                summary = await store.silo_summary()
            except StorageError as exc:
                log.debug("event=summary_failed error=%s", exc)
            else:
                counters.set_gauge("silo_rows", summary.rows)
                counters.set_gauge("oldest_inc_time", summary.oldest_inc_time or 0)
                counters.set_gauge("summary_at", int(time.time()))
        else:
            counters.set_gauge("summary_at", 0)
        await asyncio.sleep(period)

"""The database's state as requests see it: one log line per change, not one per request.

While the database is down every store is answered 503 + Retry-After; logging each
of those would bury the one line an operator needs at 3 a.m.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("msilo.store")


class DatabaseHealth:
    """Tracks up/down from the outcomes of database calls and logs the transitions."""

    def __init__(self) -> None:
        self.up = True
        self.since = time.time()
        self.failures = 0  # failed calls during the current outage

    def failed(self, error: BaseException, what: str) -> None:
        """A database call failed."""
        self.failures += 1
        if self.up:
            self.up = False
            self.since = time.time()
            log.error("event=db_down what=%s error=%s", what, error)
        else:
            log.debug("event=db_error what=%s error=%s", what, error)

    def ok(self) -> None:
        """A database call succeeded."""
        if not self.up:
            log.warning(
                "event=db_up after_seconds=%.1f failed_requests=%d",
                time.time() - self.since,
                self.failures,
            )
            self.up = True
            self.since = time.time()
            self.failures = 0

"""Rate-limited log lines: events an outsider can cause at will must not fill a disk.

A flood of refused connections or wrong passwords is worth one line a second,
not one line per packet.  :class:`LogRate` lets ``burst`` lines through per
``interval`` per event name and counts what it held back; the next line that
gets through says how many (``suppressed=N``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogRate:
    """At most ``burst`` lines per ``interval`` seconds for each event name."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # event -> (start, sent, held)

    def log(self, level: int, event: str, fmt: str = "", *args: object) -> bool:
        """Log ``event=<event> <fmt % args>`` unless over the rate; True when logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        start, sent, held = self._windows.get(event, (now, 0, 0))
        if now - start >= self.interval:
            start, sent = now, 0
        if sent >= self.burst:
            self._windows[event] = (start, sent, held + 1)
            return False
        self._windows[event] = (start, sent + 1, 0)
        tail = f" suppressed={held}" if held else ""
        self.logger.log(level, f"event={event} {fmt}{tail}", *args)
        return True

"""Logging set-up: named loggers (``msilo.sip``, ``msilo.store``, ...), one line per event.

Library code logs ``key=value`` pairs in the message (``event=stored aor=alice@example.com``);
this module only decides where lines go and what prefix they get.
"""

from __future__ import annotations

import logging
import os
import sys

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Never a multi-line traceback in the log stream: one event, one line.
        return line.replace("\n", " | ")


def setup_logging(level: str = "info", *, process: str = "main") -> None:
    """Send msilo's logs to stderr as ``time level logger pid=… proc=… message`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            f"%(asctime)s %(levelname)s %(name)s pid={os.getpid()} proc={process} %(message)s"
        )
    )
    root = logging.getLogger("msilo")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False


def redact_url(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url

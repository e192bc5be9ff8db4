"""Logging set-up: named loggers (``msilo.sip``, ``msilo.store``, ...), one line per event.

Library code logs ``key=value`` pairs in the message (``event=stored aor=alice@example.com``);
this module only decides where lines go and what prefix they get.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Never a secret in the log stream, whoever logged it (an error message quoting a
        # database URL, say); never a multi-line traceback either: one event, one line.
        return redact_text(line, self.secrets).replace("\n", " | ")


class _ExceptionInLine(logging.Filter):
    """A library's record logged with its traceback keeps one line: message and exception.

    asyncpg logs some failures it handles itself with a traceback -- a warm pool refilling
    its floor while no server is the primary, during a failover -- and a traceback in the
    log stream reads as a crash.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.msg = f"{record.getMessage()} error={type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(
    level: str = "info", *, process: str = "main", secrets: Iterable[str] = ()
) -> None:
    """Send msilo's logs to stderr as ``time level logger pid=… proc=… message`` lines;
    URL passwords and each of ``secrets`` (e.g. ``auth.secret``) are printed as ``***``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            f"%(asctime)s %(levelname)s %(name)s pid={os.getpid()} proc={process} %(message)s",
            secrets,
        )
    )
    root = logging.getLogger("msilo")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False
    # The database driver's own warnings, in the same format (and redacted), one line each.
    library = logging.StreamHandler(sys.stderr)
    library.setFormatter(handler.formatter)
    library.addFilter(_ExceptionInLine())
    driver = logging.getLogger("asyncpg")
    driver.handlers[:] = [library]
    driver.setLevel(logging.WARNING)
    driver.propagate = False


#: What a redacted secret is printed as.
REDACTED = "***"

# Query parameters of a libpq / asyncpg URL that carry a secret.
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:password|sslpassword)=)[^&]*")
# scheme://user:password@ anywhere in a text (an error message quoting a URL).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` query parameter)
    replaced by ``***``, for output, logs, error messages and /stats (issue 14, item 7).

    Works on a multi-host URL (``postgres://u:pw@h1:5432,h2:5433/db``) and on text that is
    not a URL at all (returned with any ``scheme://user:password@`` in it redacted).
    """
    if not isinstance(url, str):
        return REDACTED
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", url)
    # The user info ends at the last "@": a password may hold "/", "?" or "@" unescaped,
    # as people type them.  (An "@" in the query hides more than the password: safe.)
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        user, colon, _password = creds.partition(":")
        rest = f"{user}:{REDACTED}@{host}" if colon else f"{user}@{host}"
    return _SECRET_PARAMS.sub(rf"\1{REDACTED}", f"{scheme}://{rest}")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL password and every one of ``secrets`` (non-empty) redacted."""
    out = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    out = _SECRET_PARAMS.sub(rf"\1{REDACTED}", out)
    for secret in secrets:
        if secret:
            out = out.replace(secret, REDACTED)
    return out

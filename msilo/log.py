"""Logging set-up: named loggers (``msilo.sip``, ``msilo.store``, ...), one line per event.

Library code logs ``key=value`` pairs in the message (``event=stored aor=alice@example.com``);
this module only decides where lines go and what prefix they get:

* msilo's own loggers at ``server.log_level``;
* third-party loggers (asyncpg, asyncio, ...) at WARNING and above, in the same one-line
  format, as ``event=library logger=… message="…" error="…"``: their tracebacks are cut to the
  exception's one-line description, and a message a library repeats (asyncpg retries its
  pool floor every few seconds during an outage) is logged once until it changes, or until
  msilo logs that the database is back;
* under systemd (``JOURNAL_STREAM`` names our stderr), each line starts with the sd-daemon
  ``<N>`` priority so that journald keeps the level (``journalctl -p warning`` works).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# sd-daemon(3) priorities: <3> error, <4> warning, <6> info, <7> debug.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

# msilo's own events after which a library may legitimately say the same thing again.
_STATE_CHANGES = ("event=db_up", "event=db_down", "event=leader_elected")


def journal_stream(stream: object) -> bool:
    """True when ``stream`` is the journal connection systemd announced in ``JOURNAL_STREAM``
    (``device:inode`` of the stream, systemd.exec(5)); a redirected stderr is not."""
    announced = os.environ.get("JOURNAL_STREAM")
    if not announced:
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return announced == f"{st.st_dev}:{st.st_ino}"


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, *, priority: bool, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.priority = priority
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Never a secret in the log stream, whoever logged it (an error message quoting a
        # database URL, say); never a multi-line traceback either: one event, one line.
        line = redact_text(line, self.secrets).replace("\n", " | ")
        if self.priority:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class _LibraryFormatter(_Formatter):
    """A third-party record as one msilo line; its traceback as one ``error=`` value."""

    def format(self, record: logging.LogRecord) -> str:
        error = ""
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            error = f" error={_quote(f'{type(exc).__name__}: {exc}')}"
        clean = logging.makeLogRecord(record.__dict__)
        clean.exc_info = None
        clean.exc_text = None
        clean.stack_info = None
        clean.msg = (
            f"event=library logger={record.name} message={_quote(record.getMessage())}{error}"
        )
        clean.args = None
        return super().format(clean)


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Repeats(logging.Filter):
    """Lets a library's message through once per state change (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.levelno}:{record.msg}"
        with self._lock:
            if self._last.get(record.name) == key:
                return False
            self._last[record.name] = key
        return True

    def state_changed(self) -> None:
        with self._lock:
            self._last.clear()


class _StateWatch(logging.Filter):
    """On msilo's handler: a database or leadership change resets the library repeats."""

    def __init__(self, repeats: _Repeats) -> None:
        super().__init__()
        self.repeats = repeats

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_STATE_CHANGES):
            self.repeats.state_changed()
        return True


def setup_logging(
    level: str = "info", *, process: str = "main", secrets: Iterable[str] = ()
) -> None:
    """Send msilo's logs (and libraries' warnings) to stderr as
    ``time level logger pid=… proc=… message`` lines; URL passwords and each of
    ``secrets`` (e.g. ``auth.secret``) are printed as ``***``."""
    priority = journal_stream(sys.stderr)
    prefix = f"%(asctime)s %(levelname)s %(name)s pid={os.getpid()} proc={process} "
    repeats = _Repeats()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prefix + "%(message)s", priority=priority, secrets=secrets))
    handler.addFilter(_StateWatch(repeats))
    root = logging.getLogger("msilo")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False

    library = logging.StreamHandler(sys.stderr)
    library.setFormatter(
        _LibraryFormatter(prefix + "%(message)s", priority=priority, secrets=secrets)
    )
    library.addFilter(repeats)
    library.setLevel(logging.WARNING)
    top = logging.getLogger()
    top.handlers[:] = [h for h in top.handlers if not getattr(h, "_msilo", False)]
    library._msilo = True  # type: ignore[attr-defined]
    top.addHandler(library)
    if top.level == logging.NOTSET or top.level > logging.WARNING:
        top.setLevel(logging.WARNING)


def set_process_title(title: str) -> None:
    """Name this process ``msilo: <title>`` in ps/top/systemctl status (setproctitle)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a dependency; only a missing wheel gets here
        return
    setproctitle.setproctitle(f"msilo: {title}")


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

"""MySQL/MariaDB URLs: ``mysql://user:password@host:port/database``.

The form OpenSIPS and Kamailio take in ``db_url`` (``mysql://opensips:opensipsrw@localhost/
opensips``), so a converted configuration keeps its URL.  ``?unix_socket=/path`` connects
over a Unix socket instead of TCP.  Messages never include the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SCHEME = "mysql://"
DEFAULT_PORT = 3306
_PARAMS = ("unix_socket",)


@dataclass(frozen=True)
class MyUrl:
    """The parts of a MySQL URL the driver needs."""

    host: str
    port: int
    user: str
    password: str
    database: str
    unix_socket: str | None = None

    def where(self) -> str:
        """``host:port/database``: where the data lives, never who logs in."""
        place = self.unix_socket or f"{self.host}:{self.port}"
        return f"{place}/{self.database}"


def parse_my_url(url: str) -> MyUrl:
    """Parse ``url``; ``ValueError`` saying what is wrong (without the password)."""
    if not url.startswith(SCHEME):
        raise ValueError("must start with mysql://")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a port number") from None
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError("must name a database: mysql://user:password@host:port/database")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - set(_PARAMS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} (known: unix_socket)")
    socket = query.get("unix_socket", [None])[-1]
    return MyUrl(
        host=unquote(parts.hostname or "localhost"),
        port=port or DEFAULT_PORT,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=database,
        unix_socket=socket,
    )


def where(url: str) -> str:
    """``MyUrl.where`` of ``url``, or a placeholder when it does not parse."""
    try:
        return parse_my_url(url).where()
    except ValueError:
        return "<unparsable MySQL URL>"

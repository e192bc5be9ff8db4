"""PostgreSQL URLs as libpq and asyncpg take them, with one host or several.

``postgres://user:pass@h1:5432,h2:5433/db?target_session_attrs=read-write`` lists the
servers of a primary/standby pair: a new connection tries them in order and keeps the first
that matches ``target_session_attrs`` (``read-write``: the primary).  After a failover every
new connection -- the store's pool and the leader's lock connection alike -- therefore lands
on whichever host is the primary now.

Only what asyncpg would otherwise refuse with an unhelpful error is checked here (host list,
ports, ``target_session_attrs``); messages never include the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

SCHEMES = ("postgres://", "postgresql://")
#: The values libpq and asyncpg accept for ``target_session_attrs``.
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


@dataclass(frozen=True)
class PgUrl:
    """The parts of a PostgreSQL URL that matter for messages and checks."""

    hosts: tuple[tuple[str, int | None], ...]  # (host, port); "" = the default (a socket)
    database: str
    target_session_attrs: str | None

    def where(self) -> str:
        """``h1:5432,h2:5433/db``: where the data lives, never who logs in."""
        shown = (
            ",".join(f"{host or 'localhost'}:{port or 5432}" for host, port in self.hosts)
            or "localhost:5432"
        )
        return f"{shown}/{self.database}"


def parse_pg_url(url: str) -> PgUrl:
    """Parse ``url``; ``ValueError`` saying what is wrong (without the password)."""
    scheme = next((s for s in SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise ValueError("must start with postgres:// or postgresql://")
    rest = url[len(scheme) :]
    # As urllib (and so asyncpg) splits: the authority ends at the first "/", "?" or "#".
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    hostlist = netloc.rpartition("@")[2]
    path, _, query = tail.partition("?")
    hosts: list[tuple[str, int | None]] = []
    for item in hostlist.split(",") if hostlist else []:
        if item.startswith("["):
            host, bracket, port_text = item[1:].partition("]")
            if not bracket or (port_text and not port_text.startswith(":")):
                raise ValueError(f"host {item!r} is not [IPv6]:port")
            port_text = port_text[1:]
        else:
            host, _, port_text = item.partition(":")
        port: int | None = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"port {port_text!r} of host {host!r} is not a port number")
            port = int(port_text)
        hosts.append((unquote(host), port))
    attrs = parse_qs(query.partition("#")[0]).get("target_session_attrs")
    target = attrs[-1] if attrs else None
    if target is not None and target not in SESSION_ATTRS:
        raise ValueError(
            f"target_session_attrs must be one of {', '.join(SESSION_ATTRS)} (got {target!r})"
        )
    return PgUrl(tuple(hosts), unquote(path.lstrip("/").partition("#")[0]), target)


def where(url: str) -> str:
    """``PgUrl.where`` of ``url``, or a placeholder when it does not parse."""
    try:
        return parse_pg_url(url).where()
    except ValueError:
        return "<unparsable PostgreSQL URL>"

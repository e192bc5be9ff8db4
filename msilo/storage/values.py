"""What a column can hold: the checks both backends share (issue 14, item 5).

PostgreSQL's ``text`` cannot hold NUL and refuses strings that do not encode as UTF-8 (the
SIP parser keeps undecodable bytes as lone surrogates, ``surrogateescape``); OpenSIPS's
columns are ``VARCHAR(n)``, which counts characters.  SQLite would accept all of these, but
the two backends must agree on what is storable, and a value the database refuses must fail
its own request with a clear answer before any SQL runs -- never as a database error, which
the server would take for an outage.
"""

from __future__ import annotations

from msilo.errors import InvalidRecord

#: ``VARCHAR(64)`` of OpenSIPS's ``username`` and ``domain`` columns (silo, location,
#: subscriber).
OWNER_LIMIT = 64


def text_problem(value: object, limit: int | None = None) -> str | None:
    """Why ``value`` cannot be stored in a text column of ``limit`` characters, or None."""
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    if limit is not None and len(value) > limit:
        return f"is longer than {limit} characters ({len(value)})"
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8 text"
    return None


def check_text(field: str, value: object, limit: int | None = None) -> None:
    """Raise ``InvalidRecord`` naming ``field`` when ``value`` cannot be stored."""
    problem = text_problem(value, limit)
    if problem is not None:
        raise InvalidRecord(f"{field} {problem}", field=field)


def owner_storable(username: str, domain: str) -> bool:
    """True when ``(username, domain)`` fits the owner columns.

    A lookup by an owner that cannot be stored finds nothing, without a query: no row
    can have that key, and the database would refuse the query itself.
    """
    return text_problem(username, OWNER_LIMIT) is None and text_problem(domain, OWNER_LIMIT) is None


def check_int(field: str, value: object, low: int, high: int) -> None:
    """Raise ``InvalidRecord`` when ``value`` is not an integer in ``low..high``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRecord(
            f"{field} must be an integer in {low}..{high}, got {value!r}", field=field
        )

"""Message storage: the ``Store`` interface, its SQLite and PostgreSQL backends, and the
``BatchWriter`` that group-commits store requests.

Storage knows nothing of SIP or of the config module; it receives plain values.
"""

from __future__ import annotations

from typing import Any

from msilo.storage.base import (
    DEFAULT_NAMES,
    NewMessage,
    SiloNames,
    Store,
    StoredMessage,
    StoreOutcome,
    StoreResult,
)
from msilo.storage.batch import BatchWriter

__all__ = [
    "BatchWriter",
    "NewMessage",
    "SiloNames",
    "Store",
    "StoreOutcome",
    "StoreResult",
    "StoredMessage",
    "open_store",
]

_SQLITE = "sqlite:///"
_POSTGRES = ("postgres://", "postgresql://")
_MYSQL = "mysql://"


def open_store(db_url: str, names: SiloNames = DEFAULT_NAMES, **options: Any) -> Store:
    """The store for ``db_url`` (not yet opened: ``await store.open()``).

    ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` → ``SQLiteStore``
    (options: ``busy_timeout``, ``synchronous``); ``postgres://`` or ``postgresql://`` →
    ``PostgresStore`` (options: ``min_size``, ``max_size``, ``command_timeout``,
    ``connect_timeout``, ``application_name``, ``warm``); ``mysql://`` → ``MySQLStore``
    (MySQL 8.0.4+ or MariaDB 10.6+; options: ``max_size``, ``connect_timeout``, ``warm``).
    """
    if not isinstance(db_url, str):
        raise ValueError(f"db_url is expected to be a string, got {type(db_url).__name__}")
    if db_url.startswith(_SQLITE):
        path = db_url[len(_SQLITE) :]
        if not path or "?" in path or "#" in path:
            raise ValueError(
                f"db_url {db_url!r}: expected sqlite:///relative/path.db or "
                f"sqlite:////absolute/path.db"
            )
        from msilo.storage.sqlite import SQLiteStore

        return SQLiteStore(path, names, **options)
    if db_url.startswith(_POSTGRES):
        from msilo.storage.postgres import PostgresStore

        return PostgresStore(db_url, names, **options)
    if db_url.startswith(_MYSQL):
        from msilo.storage.mysql import MySQLStore

        return MySQLStore(db_url, names, **options)
    scheme = db_url.split(":", 1)[0] if ":" in db_url else db_url
    raise ValueError(
        # The URL itself is not echoed: it may hold a password.
        f"db_url: unsupported scheme {scheme!r}; expected sqlite:///path/to/file.db "
        f"or postgres://user:password@host:port/database "
        f"or mysql://user:password@host:port/database"
    )

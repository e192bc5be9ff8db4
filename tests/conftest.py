"""Shared fixtures: a real PostgreSQL for the tests that need one.

Where the server comes from, in order (as asyncpg's own harness does):
1. ``MSILO_TEST_PG_DSN`` if set;
2. ``postgres://postgres@127.0.0.1:5432/postgres`` if it answers;
3. a throwaway cluster started from the PostgreSQL binaries on the machine.
If none can be had, PostgreSQL tests are skipped with the reason, unless
``MSILO_REQUIRE_PG=1`` (CI), where that is a failure.
Every test session works in a fresh database that is dropped at the end.

MySQL/MariaDB tests use a throwaway MariaDB server of their own (tests/mariadbserver.py),
started once per session; without the binaries they are skipped, and under
``MSILO_REQUIRE_PG=1`` (CI) that is a failure too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

LOCAL_DSN = "postgres://postgres@127.0.0.1:5432/postgres"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion, even when called from inside a running loop
    (a session fixture may first be requested by an async test)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _answers(dsn: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def _admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _with_database(dsn: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _start_temp_cluster() -> tuple[str, object] | None:
    """A throwaway cluster from the PostgreSQL binaries on this machine, or None.

    (asyncpg's TempCluster cannot run as root, which CI is: tests/pgcluster.py runs the
    server binaries as the ``postgres`` user then.)"""
    from tests.pgcluster import ClusterUnavailable, PgCluster

    try:
        cluster = PgCluster()
        cluster.init()
        cluster.start_blocking()
    except ClusterUnavailable:
        return None
    return cluster.dsn(), cluster


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL server's maintenance database (see module docstring)."""
    cluster = None
    dsn = os.environ.get("MSILO_TEST_PG_DSN")
    reason = ""
    if dsn is None:
        if _run(_answers(LOCAL_DSN)):
            dsn = LOCAL_DSN
        else:
            started = _start_temp_cluster()
            if started is not None:
                dsn, cluster = started
            else:
                reason = (
                    "no PostgreSQL: MSILO_TEST_PG_DSN unset, nothing on 127.0.0.1:5432, "
                    "and no PostgreSQL binaries to start a throwaway cluster"
                )
    if dsn is None:
        if os.environ.get("MSILO_REQUIRE_PG") == "1":
            pytest.fail(reason + " (MSILO_REQUIRE_PG=1)")
        pytest.skip(reason)
    try:
        yield dsn
    finally:
        if cluster is not None:
            cluster.stop_blocking()  # type: ignore[attr-defined]
            cluster.destroy()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of a fresh database for this test session, dropped at the end."""
    name = f"msilo_test_{uuid.uuid4().hex[:10]}"
    _run(_admin(pg_server_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(pg_server_dsn, name)
    finally:
        _run(_admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_execute(dsn: str, sql: str) -> None:
    """Run one statement on ``dsn`` (from synchronous fixtures and tests)."""
    _run(_admin(dsn, sql))


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[Any]:
    """A throwaway MariaDB server for this session (see tests/mariadbserver.py)."""
    from tests.mariadbserver import MariaDBServer, ServerUnavailable

    MariaDBServer.reap_orphans()
    try:
        server = MariaDBServer()
    except ServerUnavailable as exc:
        if os.environ.get("MSILO_REQUIRE_PG") == "1":
            pytest.fail(f"{exc} (MSILO_REQUIRE_PG=1)")
        pytest.skip(str(exc))
    try:
        server.init()
        server.start()
    except BaseException:
        server.destroy()
        raise
    try:
        yield server
    finally:
        server.destroy()


async def _my_admin(
    url: str, sql: str, args: tuple[Any, ...] = (), *, script: bool = False
) -> list[tuple[Any, ...]]:
    import asyncmy

    from msilo.storage.mysql_sql import SESSION_SQL_MODE
    from msilo.storage.myurl import parse_my_url

    u = parse_my_url(url)
    conn = await asyncmy.connect(
        host=u.host, port=u.port, user=u.user, password=u.password, database=u.database,
        autocommit=True, charset="utf8mb4", connect_timeout=10,
    )  # fmt: skip
    try:
        async with conn.cursor() as cur:
            # msilo's own session mode: the tests' SQL double-quotes names, as msilo does.
            await cur.execute(f"SET SESSION sql_mode = '{SESSION_SQL_MODE}', sql_notes = 0")
            await cur.execute(sql, args or None)
            rows = await cur.fetchall()
            # A script's later statements (asyncmy sends several at once): their errors too.
            while script and await cur.nextset():
                pass
        return [tuple(r) for r in rows or ()]
    finally:
        await conn.ensure_closed()


def mysql_execute(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on ``url`` (from synchronous fixtures and tests); its rows."""
    return _run(_my_admin(url, sql, args))


async def mysql_connect(url: str) -> Any:
    """An asyncmy connection to ``url`` in msilo's session mode (autocommit), for tests that
    hold locks behind a server's back; close it with ``ensure_closed()``."""
    import asyncmy

    from msilo.storage.mysql_sql import SESSION_SQL_MODE
    from msilo.storage.myurl import parse_my_url

    u = parse_my_url(url)
    conn = await asyncmy.connect(
        host=u.host, port=u.port, user=u.user, password=u.password, database=u.database,
        autocommit=True, charset="utf8mb4", connect_timeout=10,
    )  # fmt: skip
    async with conn.cursor() as cur:
        await cur.execute(f"SET SESSION sql_mode = '{SESSION_SQL_MODE}'")
    return conn


async def mysql_script(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run statements separated by ``;`` on ``url``; the first one's rows."""
    return await _my_admin(url, sql, script=True)


def mysql_database(server: Any) -> str:
    """A fresh database on the session's MariaDB server; its URL."""
    name = f"msilo_test_{uuid.uuid4().hex[:10]}"
    mysql_execute(server.url("mysql"), f"CREATE DATABASE {name}")
    return str(server.url(name))


def drop_mysql_database(url: str) -> None:
    """Drop the database of ``url`` (made by :func:`mysql_database`)."""
    name = url.rsplit("/", 1)[1]
    mysql_execute(url.rsplit("/", 1)[0] + "/mysql", f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(scope="session")
def mysql_url(mysql_server: Any) -> Iterator[str]:
    """URL of a fresh MariaDB database for this test session, dropped at the end."""
    url = mysql_database(mysql_server)
    yield url
    drop_mysql_database(url)


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database URL for a whole msilo process: an SQLite file, or a fresh schema in the
    session's PostgreSQL database, or a fresh MariaDB database (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/msilo.db"
        return
    if request.param == "mysql":
        url = mysql_database(request.getfixturevalue("mysql_server"))
        yield url
        drop_mysql_database(url)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    pg_execute(dsn, f"CREATE SCHEMA {schema}")
    yield f"{dsn}?search_path={schema}"
    pg_execute(dsn, f"DROP SCHEMA {schema} CASCADE")

"""Shared fixtures: a real PostgreSQL for the tests that need one.

Where the server comes from, in order (as asyncpg's own harness does):
1. ``MSILO_TEST_PG_DSN`` if set;
2. ``postgres://postgres@127.0.0.1:5432/postgres`` if it answers;
3. a throwaway cluster started from the PostgreSQL binaries on the machine.
If none can be had, PostgreSQL tests are skipped with the reason, unless
``MSILO_REQUIRE_PG=1`` (CI), where that is a failure.
Every test session works in a fresh database that is dropped at the end.
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


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database URL for a whole msilo process: an SQLite file, or a fresh schema in the
    session's PostgreSQL database (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/msilo.db"
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    pg_execute(dsn, f"CREATE SCHEMA {schema}")
    yield f"{dsn}?search_path={schema}"
    pg_execute(dsn, f"DROP SCHEMA {schema} CASCADE")

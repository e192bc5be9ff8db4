"""Fixtures for the storage tests: every store test runs on SQLite, PostgreSQL and
MariaDB.

Each test gets its own silo table (a random name), so tests never see each other's rows;
PostgreSQL and MariaDB tables, functions and procedures are dropped afterwards.  The
location table is shared (its name is fixed): tests of bindings use the ``user`` fixture,
whose rows go at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from storage_helpers import drop_my_tables, drop_pg_tables

from msilo.storage import SiloNames, Store
from msilo.storage.mysql import MySQLStore
from msilo.storage.postgres import PostgresStore
from msilo.storage.sqlite import SQLiteStore
from tests.conftest import mysql_execute

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(autouse=True)
async def _no_unhandled_loop_errors() -> AsyncIterator[None]:
    """Fail the test if a callback or task raised without anyone seeing it (as asyncpg's
    own harness does)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(previous)
    assert not errors, f"unhandled errors in the event loop: {errors}"


@pytest.fixture
def names() -> SiloNames:
    return SiloNames(table=f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where this test's database lives (PostgreSQL: the session's fresh database)."""
    if backend == "sqlite":
        return str(tmp_path / "msilo.db")
    if backend == "mysql":
        return str(request.getfixturevalue("mysql_url"))
    return str(request.getfixturevalue("pg_dsn"))


@pytest.fixture
async def make_store(backend: str, db_url: str, names: SiloNames) -> AsyncIterator[StoreFactory]:
    """Opens stores on this test's database (several = several processes); closes them."""
    opened: list[Store] = []

    async def make(table_names: SiloNames = names, **options: object) -> Store:
        store: Store
        if backend == "sqlite":
            store = SQLiteStore(db_url, table_names, **options)  # type: ignore[arg-type]
        elif backend == "mysql":
            store = MySQLStore(db_url, table_names, **options)  # type: ignore[arg-type]
        else:
            store = PostgresStore(db_url, table_names, **options)  # type: ignore[arg-type]
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
    if backend == "postgres":
        await drop_pg_tables(db_url, names.table)
    if backend == "mysql":
        await drop_my_tables(db_url, names.table)


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    """An open store with the schema created."""
    s = await make_store()
    await s.create_schema()
    return s


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the backend variants a ``backend_only`` test does not apply to:
    a test that cannot fail on a backend is not run there, and CI shows no skips."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("backend_only")
        callspec = getattr(item, "callspec", None)
        if (
            marker is not None
            and callspec is not None
            and callspec.params.get("backend") not in marker.args
        ):
            dropped.append(item)
            continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
async def user(store: Store) -> AsyncIterator[str]:
    """A user name no other test uses; its (and ``<name>-*``) bindings go afterwards."""
    name = f"u{uuid.uuid4().hex[:10]}"
    yield name
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.dsn)
        try:
            await conn.execute("DELETE FROM location WHERE username LIKE $1", name + "%")
        finally:
            await conn.close()
    if isinstance(store, MySQLStore):
        await asyncio.to_thread(
            mysql_execute, store.url, "DELETE FROM location WHERE username LIKE %s", (name + "%",)
        )

"""Fixtures for the authentication tests: real databases, both backends, a manual clock.

Every test works in its own realm (= subscriber domain), so tests sharing the session's
PostgreSQL database never see each other's subscribers; nonces are unique by construction.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from msilo.auth import Authenticator
from msilo.storage import SiloNames, Store
from msilo.storage.mysql import MySQLStore
from msilo.storage.postgres import PostgresStore
from msilo.storage.sqlite import SQLiteStore
from msilo.storage.subscriber import AUTH_FAIL_TABLE, NONCE_TABLE

StoreFactory = Callable[[], Awaitable[Store]]
SECRET = "correct horse battery staple"
START = 1_800_000_000  # a fixed "now" for the manual clock


class ManualClock:
    """A clock the test moves by hand (``clock.now += 301``)."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
async def _no_unhandled_loop_errors() -> AsyncIterator[None]:
    """Fail the test if a callback or task raised without anyone seeing it."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(previous)
    assert not errors, f"unhandled errors in the event loop: {errors}"


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return str(tmp_path / "msilo.db")
    if backend == "mysql":
        return str(request.getfixturevalue("mysql_url"))
    return str(request.getfixturevalue("pg_dsn"))


@pytest.fixture
async def make_store(backend: str, db_url: str, realm: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on this test's database; several stores = several processes.

    On PostgreSQL the session's database is shared with other test modules (some expect
    an empty ``subscriber`` table): what a test added is removed afterwards.
    """
    names = SiloNames(table=f"t_{uuid.uuid4().hex[:12]}")
    opened: list[Store] = []

    async def make() -> Store:
        store: Store
        if backend == "sqlite":
            store = SQLiteStore(db_url, names)
        elif backend == "mysql":
            store = MySQLStore(db_url, names, max_size=4)
        else:
            store = PostgresStore(db_url, names, min_size=0, max_size=4)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
    if backend == "mysql":
        from tests.conftest import mysql_script

        await mysql_script(
            db_url,
            f"DROP TABLE IF EXISTS `{names.table}`, `msilo_{names.table}_delivery`; "
            f"DROP PROCEDURE IF EXISTS `msilo_{names.table}_store`; "
            f"DELETE FROM version WHERE table_name = '{names.table}'; "
            f"DELETE FROM subscriber WHERE domain = '{realm}' OR domain LIKE '%.{realm}'; "
            f"DELETE FROM {NONCE_TABLE}; DELETE FROM {AUTH_FAIL_TABLE}",
        )
    if backend == "postgres":
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f'DROP TABLE IF EXISTS "{names.table}" CASCADE')
            await conn.execute(f'DROP FUNCTION IF EXISTS "msilo_{names.table}_store_batch"')
            await conn.execute("DELETE FROM version WHERE table_name = $1", names.table)
            if await conn.fetchval("SELECT to_regclass('subscriber')") is not None:
                await conn.execute(
                    "DELETE FROM subscriber WHERE domain = $1 OR domain LIKE $2",
                    realm,
                    "%." + realm,
                )
            if await conn.fetchval(f"SELECT to_regclass('{NONCE_TABLE}')") is not None:
                await conn.execute(f"DELETE FROM {NONCE_TABLE}")
            if await conn.fetchval(f"SELECT to_regclass('{AUTH_FAIL_TABLE}')") is not None:
                await conn.execute(f"DELETE FROM {AUTH_FAIL_TABLE}")
        finally:
            await conn.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    """An open store with the schema created."""
    s = await make_store()
    await s.create_schema()
    return s


@pytest.fixture
def realm() -> str:
    """This test's realm, also the subscribers' domain."""
    return f"{uuid.uuid4().hex[:10]}.example.com"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_auth(store: Store, realm: str, clock: ManualClock) -> Callable[..., Authenticator]:
    """Authenticators on this test's database (one per "worker"), sharing the secret."""

    def make(
        on: Store | None = None,
        *,
        algorithms: tuple[str, ...] = ("SHA-512-256", "SHA-256", "MD5"),
        secret: str = SECRET,
        nonce_expires: int = 300,
    ) -> Authenticator:
        return Authenticator(
            on or store,
            realm,
            secret,
            nonce_expires=nonce_expires,
            algorithms=algorithms,
            clock=clock,
        )

    return make

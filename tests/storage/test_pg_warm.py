"""PostgreSQL for a serving process: a warm pool, and functions planned once.

A serving worker opens its whole pool at start and runs the hot statements once on every new
connection, in a transaction that is rolled back; the store and registrar functions carry
``plan_cache_mode = force_generic_plan`` (see msilo/storage/_sql.py for the numbers).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import asyncpg
import pytest
from conftest import StoreFactory
from storage_helpers import OWNER, message

from msilo.cli import open_configured_store, open_serving_store
from msilo.config import load_config
from msilo.storage import SiloNames, Store, StoreOutcome
from msilo.storage.location_pg import FUNCTION as LOCATION_FUNCTION
from msilo.storage.location_pg import FUNCTION_ARGS as LOCATION_ARGS
from msilo.storage.postgres import STORE_FUNCTION_ARGS, PostgresStore
from msilo.storage.sqlite import SQLiteStore

pytestmark = pytest.mark.backend_only("postgres")


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _settings(store: PostgresStore, function: str, args: str) -> list[str] | None:
    rows = await _fetch(
        store.dsn,
        "SELECT proconfig FROM pg_proc WHERE oid = to_regprocedure($1)",
        f"{function}({args})",
    )
    assert rows, f"{function} is missing"
    value: list[str] | None = rows[0][0]
    return value


def _store_function(store: Store) -> str:
    assert isinstance(store, PostgresStore)
    return f'"{store.function}"'


async def test_the_functions_are_planned_once_not_per_call(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    generic = ["plan_cache_mode=force_generic_plan"]
    assert await _settings(store, _store_function(store), STORE_FUNCTION_ARGS) == generic
    assert await _settings(store, LOCATION_FUNCTION, LOCATION_ARGS) == generic


async def test_upgrade_gives_a_previous_releases_function_its_settings(store: Store) -> None:
    # The previous release created the same body without the setting.
    assert isinstance(store, PostgresStore)
    function = _store_function(store)
    await _fetch(
        store.dsn, f"ALTER FUNCTION {function}({STORE_FUNCTION_ARGS}) RESET plan_cache_mode"
    )
    assert await _settings(store, function, STORE_FUNCTION_ARGS) is None
    actions = await store.upgrade_schema()
    assert f"updated function {store.function}" in actions
    assert await _settings(store, function, STORE_FUNCTION_ARGS) == [
        "plan_cache_mode=force_generic_plan"
    ]
    assert await store.upgrade_schema() == []
    assert (await store.store_batch([message()], 0))[0].outcome is StoreOutcome.STORED


async def test_a_warm_pool_opens_every_connection_and_leaves_no_trace(
    make_store: StoreFactory, store: Store, names: SiloNames
) -> None:
    app = f"warm-{uuid.uuid4().hex[:8]}"
    warm = await make_store(names, warm=True, max_size=3, application_name=app)
    assert isinstance(warm, PostgresStore)
    sessions = await _fetch(
        warm.dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
    )
    assert sessions[0][0] == 3  # opened at open(), not on the first burst of messages
    # The warm-up rows were rolled back: nothing stored, the warm-up key is still free.
    assert await warm.count("msilo-warm-up", "invalid.") == 0
    assert await warm.count(*OWNER) == 0
    [first] = await warm.store_batch([message(key="msilo-warm-up")], 0)
    assert first.outcome is StoreOutcome.STORED
    assert await warm.count(*OWNER) == 1


async def test_a_connection_that_cannot_warm_up_still_serves(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # No schema yet (e.g. `msilo db init` not run): the warm-up fails on every connection,
    # each failure is one warning line, and the store still reports the real problem.
    caplog.set_level(logging.WARNING, logger="msilo.store")
    s = await make_store(warm=True, max_size=2)
    failures = [r for r in caplog.records if "event=db_warm_up_failed" in r.getMessage()]
    assert len(failures) == 2
    await s.create_schema()
    assert (await s.store_batch([message()], 0))[0].outcome is StoreOutcome.STORED


def test_only_serving_processes_get_a_warm_pool(tmp_path: Path) -> None:
    pg = load_config(overrides=['msilo.db_url="postgres://db.example/msilo"'])
    serving, command = open_serving_store(pg), open_configured_store(pg)
    assert isinstance(serving, PostgresStore) and serving.warm
    assert isinstance(command, PostgresStore) and not command.warm
    lite = load_config(overrides=[f'msilo.db_url="sqlite:///{tmp_path}/m.db"'])
    assert isinstance(open_serving_store(lite), SQLiteStore)

"""Concurrent stores and claims from separate connections (as from separate processes or
hosts): the quota is never exceeded, a key is stored once, no row is claimed twice."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest
from conftest import StoreFactory
from storage_helpers import NOW, OWNER, message

from msilo.errors import DatabaseUnavailable
from msilo.storage import SiloNames, Store, StoredMessage, StoreOutcome
from msilo.storage.postgres import PostgresStore
from msilo.storage.sqlite import SQLiteStore

STORES = 20


async def open_many(make_store: StoreFactory, n: int = STORES) -> list[Store]:
    first = await make_store()
    await first.create_schema()
    return [first] + [await make_store(min_size=1, max_size=1)
                      if isinstance(first, PostgresStore) else await make_store()
                      for _ in range(n - 1)]  # fmt: skip


async def test_quota_holds_under_concurrent_batches(make_store: StoreFactory) -> None:
    stores = await open_many(make_store)
    batches = [[message(body=f"{i}-{j}".encode()) for j in range(3)] for i in range(STORES)]
    start = asyncio.Event()

    async def run(store: Store, batch: list) -> list:  # type: ignore[type-arg]
        await start.wait()
        return await store.store_batch(batch, 5)

    tasks = [asyncio.create_task(run(s, b)) for s, b in zip(stores, batches, strict=True)]
    start.set()
    results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    stored = [r for r in results if r.outcome is StoreOutcome.STORED]
    assert len(stored) == 5
    assert len(results) - len(stored) == 3 * STORES - 5
    assert await stores[0].count(*OWNER) == 5


async def test_quota_holds_for_many_owners_in_overlapping_batches(
    make_store: StoreFactory,
) -> None:
    # Batches touch owners in different orders: the per-owner locks must not deadlock.
    stores = await open_many(make_store, 8)
    owners = [f"user{i}" for i in range(6)]
    batches = [[message(owners[(i + j) % 6]) for j in range(12)] for i in range(8)]
    results = await asyncio.gather(
        *(s.store_batch(b, 4) for s, b in zip(stores, batches, strict=True))
    )
    for owner in owners:
        assert await stores[0].count(owner, OWNER[1]) == 4
    assert sum(r.outcome is StoreOutcome.STORED for rs in results for r in rs) == 24


async def test_the_same_key_from_concurrent_stores_is_stored_once(
    make_store: StoreFactory,
) -> None:
    stores = await open_many(make_store)
    results = await asyncio.gather(
        *(s.store_batch([message(key="call;1;tag"), message(key=f"own-{i}")], 0)
          for i, s in enumerate(stores))
    )  # fmt: skip
    firsts = [rs[0] for rs in results]
    assert sum(r.outcome is StoreOutcome.STORED for r in firsts) == 1
    winner = next(r.mid for r in firsts if r.outcome is StoreOutcome.STORED)
    assert all(r.mid == winner for r in firsts)  # duplicates name the stored row
    assert all(rs[1].outcome is StoreOutcome.STORED for rs in results)
    assert await stores[0].count(*OWNER) == STORES + 1


async def test_concurrent_claimers_get_disjoint_rows(make_store: StoreFactory) -> None:
    stores = await open_many(make_store, 4)
    await stores[0].store_batch([message(inc_time=NOW - i) for i in range(100)], 0)

    async def claimer(store: Store, name: str) -> list[StoredMessage]:
        got: list[StoredMessage] = []
        while True:
            rows = await store.claim_for_dump(
                *OWNER, lease_owner=name, lease_seconds=60, now=NOW, limit=7
            )
            if not rows:
                return got
            got.extend(rows)
            await asyncio.sleep(0)

    claims = await asyncio.gather(*(claimer(s, f"w{i}") for i, s in enumerate(stores)))
    mids = [m.mid for c in claims for m in c]
    assert len(mids) == len(set(mids)) == 100
    assert sum(1 for c in claims if c) >= 2 or isinstance(stores[0], SQLiteStore)


async def test_concurrent_reminder_claims_are_disjoint(make_store: StoreFactory) -> None:
    stores = await open_many(make_store, 4)
    await stores[0].store_batch([message(f"u{i}", snd_time=NOW - i) for i in range(60)], 0)
    claims = await asyncio.gather(
        *(s.claim_due_reminders(now=NOW, lease_owner=f"w{i}", lease_seconds=60, limit=20)
          for i, s in enumerate(stores))
    )  # fmt: skip
    mids = [m.mid for c in claims for m in c]
    assert len(mids) == len(set(mids)) == 60


@pytest.mark.backend_only("sqlite")
async def test_sqlite_writer_waiting_too_long_is_unavailable(
    backend: str, make_store: StoreFactory
) -> None:
    s = await make_store(busy_timeout=0.2)
    await s.create_schema()
    assert isinstance(s, SQLiteStore)
    blocker = sqlite3.connect(s.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseUnavailable, match="locked"):
            await s.store_batch([message()], 0)
        blocker.execute("ROLLBACK")
        assert (await s.store_batch([message()], 0))[0].outcome is StoreOutcome.STORED
    finally:
        blocker.close()


@pytest.mark.backend_only("postgres")
async def test_postgres_down_is_unavailable(backend: str, names: SiloNames) -> None:
    store = PostgresStore("postgres://postgres@127.0.0.1:1/none", names, connect_timeout=2)
    with pytest.raises(DatabaseUnavailable, match=r"cannot connect to PostgreSQL at 127.0.0.1:1"):
        await store.open()


@pytest.mark.backend_only("postgres")
async def test_repeatable_read_callers_are_refused(backend: str, store: Store) -> None:
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(store.dsn)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.RaiseError, match="READ COMMITTED"):
                await conn.fetchrow(
                    f'SELECT * FROM "{store.function}"($1, $2, $3, $4, $5, $6, $7, $8, $9, '
                    f"$10, $11, $12, $13, $14)",
                    ["a"], ["b"], ["s"], ["d"], [b"x"], [None], [1], [2], [0], [None], 1,
                    [False], 0, [None],
                )  # fmt: skip
    finally:
        await conn.close()

"""Expiry of many rows: bounded statements, every expired row gone and counted, nothing
else touched -- on every backend."""

from __future__ import annotations

import asyncio

from storage_helpers import NOW, OWNER, message

from msilo.leader.cycles import delete_expired_in_batches
from msilo.storage import Store, StoreOutcome


async def _store_many(store: Store, n: int, **fields: int) -> None:
    batch = [message(f"user{i % 7}", body=str(i).encode(), **fields) for i in range(n)]  # type: ignore[arg-type]
    results = await store.store_batch(batch, 0)
    assert all(r.outcome is StoreOutcome.STORED for r in results)


async def test_one_expiry_statement_deletes_at_most_its_limit(store: Store) -> None:
    await _store_many(store, 12, exp_time=NOW - 5)
    assert await store.delete_expired(NOW, 5) == 5
    assert await store.delete_expired(NOW, 5) == 5
    assert await store.delete_expired(NOW, 5) == 2
    assert await store.delete_expired(NOW, 5) == 0


async def test_expiry_of_more_rows_than_a_batch_deletes_and_counts_them_all(
    store: Store,
) -> None:
    await _store_many(store, 53, exp_time=NOW - 1)
    counted: list[int] = []
    deleted = await delete_expired_in_batches(store, NOW, batch=10, pause=0, count=counted.append)
    assert deleted == 53
    assert counted == [10, 10, 10, 10, 10, 3]  # per batch, as each commits
    assert [await store.count(f"user{i}", OWNER[1]) for i in range(7)] == [0] * 7


async def test_a_batch_that_comes_out_exact_ends_with_an_empty_one(store: Store) -> None:
    await _store_many(store, 20, exp_time=NOW)
    counted: list[int] = []
    deleted = await delete_expired_in_batches(store, NOW, batch=10, pause=0, count=counted.append)
    assert deleted == 20
    assert counted == [10, 10]  # the empty third statement counts nothing


async def test_expiry_leaves_live_rows_and_pending_reminders_alone(store: Store) -> None:
    await _store_many(store, 25, exp_time=NOW - 1)
    await store.store_batch(
        [
            message(body=b"live", exp_time=NOW + 1),
            message(body=b"reminder", snd_time=NOW + 600, exp_time=NOW + 3600),
            message(body=b"reminder, expired", snd_time=NOW - 60, exp_time=NOW - 1),
        ],
        0,
    )
    assert await delete_expired_in_batches(store, NOW, batch=4, pause=0) == 26
    kept = await store.list(*OWNER)
    assert [(m.body, m.snd_time) for m in kept] == [(b"live", 0), (b"reminder", NOW + 600)]


async def test_stores_go_on_while_a_batched_expiry_runs(store: Store) -> None:
    await _store_many(store, 60, exp_time=NOW - 1)

    async def keep_storing() -> int:
        stored = 0
        for i in range(20):
            [r] = await store.store_batch([message("carol", body=str(i).encode())], 0)
            stored += r.outcome is StoreOutcome.STORED
            await asyncio.sleep(0)
        return stored

    deleted, stored = await asyncio.gather(
        delete_expired_in_batches(store, NOW, batch=5, pause=0.001), keep_storing()
    )
    assert (deleted, stored) == (60, 20)
    assert await store.count("carol", OWNER[1]) == 20


async def test_the_leader_deletes_the_stores_own_batch_size_per_statement(store: Store) -> None:
    size = store.expiry_batch
    await _store_many(store, size + 3, exp_time=NOW - 1)
    counted: list[int] = []
    assert await delete_expired_in_batches(store, NOW, pause=0, count=counted.append) == size + 3
    assert counted == [size, 3]

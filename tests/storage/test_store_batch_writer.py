"""The batch writer: callers get their own row's fate, only after the commit that holds it;
batches form under load; a full queue is refused at once; a failed flush fails its callers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest
from conftest import StoreFactory
from storage_helpers import OWNER, message

from msilo.errors import DatabaseUnavailable, InvalidRecord, QueueFull, StorageError
from msilo.storage import BatchWriter, NewMessage, Store, StoreOutcome, StoreResult
from msilo.storage.postgres import PostgresStore
from msilo.storage.sqlite import SQLiteStore


class GatedStore:
    """Wraps a store; each ``store_batch`` waits for the gate and records its batch size."""

    def __init__(self, inner: Store | None = None) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.sizes: list[int] = []
        self.fail_with: Exception | None = None

    async def store_batch(
        self, messages: Sequence[NewMessage], max_messages: int
    ) -> list[StoreResult]:
        self.sizes.append(len(messages))
        self.entered.set()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.inner is not None:
            return await self.inner.store_batch(messages, max_messages)
        return [StoreResult(StoreOutcome.STORED, i) for i in range(len(messages))]


def writer(store: object, **kw: int) -> BatchWriter:
    kw.setdefault("max_messages", 0)
    return BatchWriter(store, **kw)  # type: ignore[arg-type]


async def test_each_caller_gets_its_own_result(store: Store) -> None:
    w = writer(store, max_messages=3)
    w.start()
    results = await asyncio.gather(
        *(w.submit(message(f"user{i % 10}", key=f"k{i}", body=str(i).encode()))
          for i in range(100))
    )  # fmt: skip
    await w.close()
    for i, r in enumerate(results):
        if r.outcome is StoreOutcome.STORED:
            rows = {m.mid: m.body for m in await store.list(f"user{i % 10}", OWNER[1])}
            assert rows[r.mid] == str(i).encode()
    for u in range(10):
        assert await store.count(f"user{u}", OWNER[1]) == 3
    assert sum(r.outcome is StoreOutcome.STORED for r in results) == 30


async def test_batches_form_under_concurrency(store: Store) -> None:
    w = writer(store)
    callers = 300
    results = await asyncio.gather(*(w.submit(message(key=f"k{i}")) for i in range(callers)))
    await w.close()
    assert all(r.outcome is StoreOutcome.STORED for r in results)
    assert await store.count(*OWNER) == callers
    assert w.rows == callers
    assert w.flushes < callers / 10
    assert w.largest_batch > 1


async def test_an_idle_writer_flushes_a_lone_request_at_once() -> None:
    gated = GatedStore()
    w = writer(gated)
    r = await asyncio.wait_for(w.submit(message()), timeout=1)
    assert r.outcome is StoreOutcome.STORED
    assert gated.sizes == [1]
    await w.close()


async def test_requests_queue_while_a_flush_runs_then_go_together() -> None:
    gated = GatedStore()
    gated.gate.clear()
    w = writer(gated, max_batch=4)
    first = asyncio.create_task(w.submit(message()))
    await gated.entered.wait()
    rest = [asyncio.create_task(w.submit(message())) for _ in range(6)]
    await asyncio.sleep(0)
    assert w.pending == 6
    gated.gate.set()
    await asyncio.gather(first, *rest)
    assert gated.sizes == [1, 4, 2]
    await w.close()


async def test_a_second_flush_starts_while_the_first_commits_but_no_third() -> None:
    gated = GatedStore()
    gated.gate.clear()
    w = writer(gated, max_inflight=2)
    first = asyncio.create_task(w.submit(message()))
    await gated.entered.wait()
    second = [asyncio.create_task(w.submit(message())) for _ in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert gated.sizes == [1, 3]  # started without waiting for the first to end
    third = [asyncio.create_task(w.submit(message())) for _ in range(2)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert gated.sizes == [1, 3] and w.pending == 2  # two in flight: these wait
    gated.gate.set()
    await asyncio.gather(first, *second, *third)
    assert gated.sizes == [1, 3, 2]
    await w.close()
    with pytest.raises(ValueError):
        writer(gated, max_inflight=0)


async def test_a_full_queue_is_refused_at_once() -> None:
    gated = GatedStore()
    gated.gate.clear()
    w = writer(gated, max_queue=3)
    in_flight = asyncio.create_task(w.submit(message()))
    await gated.entered.wait()
    queued = [asyncio.create_task(w.submit(message())) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queue full"):
        await w.submit(message())
    gated.gate.set()
    await asyncio.gather(in_flight, *queued)
    assert (await w.submit(message())).outcome is StoreOutcome.STORED  # room again
    await w.close()


async def test_close_flushes_everything_pending(store: Store) -> None:
    gated = GatedStore(store)
    gated.gate.clear()
    w = writer(gated)
    tasks = [asyncio.create_task(w.submit(message(key=f"k{i}"))) for i in range(50)]
    await gated.entered.wait()
    closing = asyncio.create_task(w.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    gated.gate.set()
    await closing
    assert all(t.result().outcome is StoreOutcome.STORED for t in tasks)
    assert await store.count(*OWNER) == 50
    with pytest.raises(StorageError, match="closed"):
        await w.submit(message())


async def test_a_failed_flush_fails_every_caller_and_the_next_one_works() -> None:
    gated = GatedStore()
    gated.gate.clear()
    w = writer(gated)
    first = asyncio.create_task(w.submit(message()))
    await gated.entered.wait()
    batch = [asyncio.create_task(w.submit(message())) for _ in range(5)]
    await asyncio.sleep(0)
    gated.fail_with = DatabaseUnavailable("PostgreSQL went away")
    gated.gate.set()
    outcomes = await asyncio.gather(first, *batch, return_exceptions=True)
    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == len(outcomes)  # one error object per caller
    gated.fail_with = None
    assert (await w.submit(message())).outcome is StoreOutcome.STORED
    assert w.failed_flushes == 2
    await w.close()


async def test_an_unexpected_error_reaches_callers_as_storage_error() -> None:
    gated = GatedStore()
    gated.fail_with = RuntimeError("bug")
    w = writer(gated)
    with pytest.raises(StorageError, match="bug") as info:
        await w.submit(message())
    assert isinstance(info.value.__cause__, RuntimeError)
    await w.close()


async def test_a_bad_row_fails_only_its_own_caller(store: Store) -> None:
    w = writer(store)
    good = asyncio.create_task(w.submit(message()))
    with pytest.raises(InvalidRecord, match="username"):
        await w.submit(message("u" * 100))
    assert (await good).outcome is StoreOutcome.STORED
    await w.close()


async def test_a_caller_that_gave_up_before_the_flush_is_not_stored() -> None:
    gated = GatedStore()
    gated.gate.clear()
    w = writer(gated)
    first = asyncio.create_task(w.submit(message()))
    await gated.entered.wait()
    quitter = asyncio.create_task(w.submit(message()))
    stayer = asyncio.create_task(w.submit(message()))
    await asyncio.sleep(0)
    quitter.cancel()
    gated.gate.set()
    await asyncio.gather(first, stayer)
    assert gated.sizes == [1, 1]
    await w.close()


# --- a real PostgreSQL connection lost in the middle of a flush ----------------------------------


async def terminate_other_backends(dsn: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()


async def flush_cut_mid_way(store: PostgresStore, w: BatchWriter, keyed: bool) -> list[object]:
    """Submit 10 rows, hold their flush on a table lock, terminate its connection."""
    admin = await asyncpg.connect(store.dsn)
    try:
        tx = admin.transaction()
        await tx.start()
        await admin.execute(f'LOCK TABLE "{store.names.table}" IN EXCLUSIVE MODE')
        callers = [
            asyncio.create_task(w.submit(message(key=f"k{i}" if keyed else None)))
            for i in range(10)
        ]
        waiting = 0
        for _ in range(300):
            waiting = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the flush never reached the database"
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await tx.rollback()
        return list(await asyncio.gather(*callers, return_exceptions=True))
    finally:
        await admin.close()


@pytest.mark.backend_only("postgres")
async def test_lost_connection_fails_that_flush_and_the_next_succeeds(
    backend: str, store: Store
) -> None:
    assert isinstance(store, PostgresStore)
    w = writer(store)
    assert (await w.submit(message())).outcome is StoreOutcome.STORED

    # Rows without a dedupe key: a second attempt could store them twice, so the outcome
    # of the cut flush is unknown and every caller of it is failed.
    outcomes = await flush_cut_mid_way(store, w, keyed=False)
    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
    assert "unavailable during store" in str(outcomes[0])
    assert await store.count(*OWNER) == 1  # nothing of the failed flush was committed

    results = await asyncio.gather(*(w.submit(message()) for _ in range(10)))
    assert all(r.outcome is StoreOutcome.STORED for r in results)
    assert await store.count(*OWNER) == 11
    await w.close()


@pytest.mark.backend_only("postgres")
async def test_a_keyed_flush_survives_a_lost_connection(backend: str, store: Store) -> None:
    assert isinstance(store, PostgresStore)
    w = writer(store)
    # Every row keyed: trying again on a fresh connection cannot store anything twice.
    outcomes = await flush_cut_mid_way(store, w, keyed=True)
    assert [getattr(o, "outcome", o) for o in outcomes] == [StoreOutcome.STORED] * 10
    assert await store.count(*OWNER) == 10
    await w.close()


@pytest.mark.backend_only("postgres")
async def test_idle_connections_killed_by_the_server_do_not_fail_the_next_flush(
    backend: str, make_store: StoreFactory
) -> None:
    store = await make_store(min_size=4, max_size=4)
    await store.create_schema()
    assert isinstance(store, PostgresStore)
    w = writer(store)
    for round_ in range(10):
        await asyncio.gather(*(store.count(*OWNER) for _ in range(4)))  # warm the pool
        await terminate_other_backends(store.dsn)
        keyed = [w.submit(message(key=f"{round_}-{i}")) for i in range(5)]
        assert all(r.outcome is StoreOutcome.STORED for r in await asyncio.gather(*keyed))
    assert await store.count(*OWNER) == 50
    await w.close()


async def test_flushes_in_flight_follow_what_the_database_can_take(store: Store) -> None:
    # PostgreSQL commits a pool's worth of flushes at once (group commit shares their WAL
    # flush); SQLite has one writer, so a second flush would only wait for the first.
    expected = 1 if isinstance(store, SQLiteStore) else 8
    assert store.write_concurrency == expected

"""The read-only queries operations use: a page of a mailbox (``messages list --limit``) and
the summary behind the stored-rows and oldest-message gauges, on both backends."""

from __future__ import annotations

from storage_helpers import NOW, OWNER, message

from msilo.storage import Store


async def test_a_page_of_a_mailbox_in_arrival_order(store: Store) -> None:
    await store.store_batch([message(body=f"m{i}".encode(), inc_time=NOW + i) for i in range(7)], 0)
    everything = [m.body for m in await store.list(*OWNER)]
    assert [m.body for m in await store.list_page(*OWNER, None)] == everything
    assert [m.body for m in await store.list_page(*OWNER, 3)] == everything[:3]
    assert [m.body for m in await store.list_page(*OWNER, 3, 5)] == everything[5:]
    assert await store.list_page(*OWNER, 3, 7) == []
    assert [m.body for m in await store.list_page(*OWNER, None, 6)] == everything[6:]


async def test_summary_counts_rows_and_finds_the_oldest(store: Store) -> None:
    empty = await store.silo_summary()
    assert (empty.rows, empty.oldest_inc_time) == (0, None)
    await store.store_batch(
        [
            message(body=b"new", inc_time=NOW),
            message(body=b"old", inc_time=NOW - 500),
            message("bob", body=b"other", inc_time=NOW - 100),
        ],
        0,
    )
    summary = await store.silo_summary()
    assert (summary.rows, summary.oldest_inc_time) == (3, NOW - 500)

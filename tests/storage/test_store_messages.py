"""Storing, reading and the delivery life cycle of rows, on both backends."""

from __future__ import annotations

import asyncio

import pytest
from storage_helpers import NOW, OWNER, message

from msilo.errors import InvalidRecord
from msilo.storage import NewMessage, Store, StoreOutcome, StoreResult
from msilo.storage.postgres import PostgresStore

LEASE = {"lease_owner": "worker-1", "lease_seconds": 40}


async def store_one(store: Store, msg: NewMessage, max_messages: int = 0) -> StoreResult:
    [result] = await store.store_batch([msg], max_messages)
    return result


# --- storing ------------------------------------------------------------------------------------


async def test_stored_rows_come_back_byte_for_byte(store: Store) -> None:
    body = bytes(range(256)) * 300  # binary, NUL bytes, 76 KiB
    ctype = "application/octet-stream; name=" + "n" * 300  # no length cap (D4)
    r = await store_one(store, message(body=body, ctype=ctype, src="sip:bob@example.org;x=1"))
    assert r.outcome is StoreOutcome.STORED and isinstance(r.mid, int)
    [m] = await store.list(*OWNER)
    assert (m.mid, m.body, m.ctype, m.src_addr) == (r.mid, body, ctype, "sip:bob@example.org;x=1")
    assert (m.dst_addr, m.inc_time, m.exp_time, m.snd_time, m.attempts) == (
        "sip:alice@example.com", NOW, NOW + 3600, 0, 0)  # fmt: skip


async def test_empty_body_and_missing_ctype_are_stored(store: Store) -> None:
    await store_one(store, message(body=b"", ctype=None))
    [m] = await store.list(*OWNER)
    assert (m.body, m.ctype) == (b"", None)


async def test_results_come_back_in_input_order(store: Store) -> None:
    batch = [message(f"user{i}", body=str(i).encode()) for i in range(50)]
    results = await store.store_batch(batch, 0)
    assert [r.outcome for r in results] == [StoreOutcome.STORED] * 50
    for i, r in enumerate(results):
        [m] = await store.list(f"user{i}", OWNER[1])
        assert (m.mid, m.body) == (r.mid, str(i).encode())


async def test_64_bit_times_are_kept(store: Store) -> None:
    await store_one(store, message(inc_time=2**33, exp_time=2**62, snd_time=2**34))
    [m] = await store.list(*OWNER)
    assert (m.inc_time, m.exp_time, m.snd_time) == (2**33, 2**62, 2**34)


async def test_empty_batch_stores_nothing(store: Store) -> None:
    assert await store.store_batch([], 5) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"username": "u" * 65}, "username is longer than 64"),
        ({"domain": "d" * 65}, "domain is longer than 64"),
        ({"src": "s" * 256}, "src_addr is longer than 255"),
        ({"ctype": "text/plain\x00"}, "ctype contains a NUL"),
        ({"key": "\ud800"}, "dedupe_key is not valid UTF-8"),
        ({"inc_time": 2**63}, "inc_time must be a 64-bit integer"),
    ],
)
async def test_rows_that_do_not_fit_are_refused_before_the_database(
    store: Store, change: dict[str, object], error: str
) -> None:
    with pytest.raises(InvalidRecord, match=error):
        await store.store_batch([message(), message(**change)], 0)  # type: ignore[arg-type]
    assert await store.count(*OWNER) == 0


# --- dedupe and quota ---------------------------------------------------------------------------


async def test_a_replayed_message_is_stored_once(store: Store) -> None:
    first = await store_one(store, message(key="call-1;1;tag"))
    again = await store_one(store, message(key="call-1;1;tag", body=b"replay"))
    assert first.outcome is StoreOutcome.STORED
    assert again == StoreResult(StoreOutcome.DUPLICATE, first.mid)
    assert [m.body for m in await store.list(*OWNER)] == [b"hello"]


async def test_a_key_repeated_inside_one_batch_is_stored_once(store: Store) -> None:
    results = await store.store_batch(
        [message(key="k"), message(key="other"), message(key="k", body=b"dup"), message()], 0
    )
    assert [r.outcome for r in results] == [
        StoreOutcome.STORED, StoreOutcome.STORED, StoreOutcome.DUPLICATE, StoreOutcome.STORED,
    ]  # fmt: skip
    assert results[2].mid == results[0].mid
    assert await store.count(*OWNER) == 3


async def test_rows_without_a_key_are_never_duplicates(store: Store) -> None:
    results = await store.store_batch([message(), message()], 0)
    assert [r.outcome for r in results] == [StoreOutcome.STORED] * 2


async def test_quota_counts_rows_of_the_batch_in_order(store: Store) -> None:
    await store_one(store, message())
    batch = [message(), message("bob"), message(), message(), message("bob")]
    results = await store.store_batch(batch, 3)
    assert [r.outcome for r in results] == [
        StoreOutcome.STORED, StoreOutcome.STORED, StoreOutcome.STORED,
        StoreOutcome.OVER_QUOTA, StoreOutcome.STORED,
    ]  # fmt: skip
    assert results[3].mid is None
    assert await store.count(*OWNER) == 3


async def test_quota_counts_every_row_of_the_owner(store: Store) -> None:
    # Scheduled, leased and expired rows all count, as in OpenSIPS (spec §3.4).
    await store.store_batch([message(snd_time=NOW + 60), message(exp_time=NOW - 1), message()], 0)
    await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert (await store_one(store, message(), 3)).outcome is StoreOutcome.OVER_QUOTA
    assert (await store_one(store, message(), 4)).outcome is StoreOutcome.STORED


async def test_a_duplicate_is_reported_even_when_the_mailbox_is_full(store: Store) -> None:
    first = await store_one(store, message(key="k"), 1)
    assert await store_one(store, message(key="k"), 1) == StoreResult(
        StoreOutcome.DUPLICATE, first.mid
    )


async def test_a_repeat_of_an_over_quota_row_is_over_quota_too(store: Store) -> None:
    results = await store.store_batch([message(), message(key="k"), message(key="k")], 1)
    assert [r.outcome for r in results] == [StoreOutcome.STORED] + [StoreOutcome.OVER_QUOTA] * 2


async def test_zero_max_messages_means_no_quota(store: Store) -> None:
    results = await store.store_batch([message() for _ in range(20)], 0)
    assert {r.outcome for r in results} == {StoreOutcome.STORED}


async def test_owners_are_matched_exactly(store: Store) -> None:
    await store.store_batch([message(), message("Alice"), message(domain="EXAMPLE.com")], 0)
    assert await store.count(*OWNER) == 1


# --- delivery: claims and leases ----------------------------------------------------------------


async def test_claim_takes_deliverable_rows_in_arrival_order(store: Store) -> None:
    results = await store.store_batch(
        [
            message(body=b"third", inc_time=NOW - 10),
            message(body=b"first", inc_time=NOW - 30),
            message(body=b"second", inc_time=NOW - 20),
            message(body=b"scheduled", snd_time=NOW + 60),
            message(body=b"expired", exp_time=NOW),
            message("bob", body=b"someone else's"),
        ],
        0,
    )
    assert all(r.outcome is StoreOutcome.STORED for r in results)
    claimed = await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in claimed] == [b"first", b"second", b"third"]
    # Leased now: nobody else gets them until the lease is released or runs out.
    assert await store.claim_for_dump(*OWNER, now=NOW, **LEASE) == []  # type: ignore[arg-type]
    assert await store.claim_for_dump(*OWNER, now=NOW + 39, **LEASE) == []  # type: ignore[arg-type]
    late = await store.claim_for_dump(*OWNER, now=NOW + 40, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in late] == [b"first", b"second", b"third"]


async def test_claim_order_breaks_ties_by_id(store: Store) -> None:
    await store.store_batch([message(body=str(i).encode()) for i in range(5)], 0)
    claimed = await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in claimed] == [b"0", b"1", b"2", b"3", b"4"]
    assert [m.mid for m in claimed] == sorted(m.mid for m in claimed)


async def test_claim_limit_takes_the_oldest(store: Store) -> None:
    await store.store_batch([message(body=str(i).encode(), inc_time=NOW + i) for i in range(5)], 0)
    first = await store.claim_for_dump(*OWNER, now=NOW, limit=2, **LEASE)  # type: ignore[arg-type]
    rest = await store.claim_for_dump(*OWNER, now=NOW, limit=10, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in first] == [b"0", b"1"]
    assert [m.body for m in rest] == [b"2", b"3", b"4"]


async def test_delivered_rows_are_deleted(store: Store) -> None:
    results = await store.store_batch([message(), message(), message()], 0)
    mids = [r.mid for r in results if r.mid is not None]
    assert await store.delete_delivered(mids[:2]) == 2
    assert await store.delete_delivered(mids[:2]) == 0
    assert await store.delete_delivered([]) == 0
    assert [m.mid for m in await store.list(*OWNER)] == mids[2:]


async def test_concurrent_single_deletes_each_count_their_own_row(store: Store) -> None:
    # Every dump deletes its delivered rows one by one, while other dumps do the same; on
    # PostgreSQL those deletes share DELETE statements, and each caller must still learn
    # whether its own row was deleted.
    results = await store.store_batch([message(body=str(i).encode()) for i in range(30)], 0)
    mids = [r.mid for r in results if r.mid is not None]
    gone = mids[:20]
    await store.delete_delivered(gone[:5])
    counts = await asyncio.gather(*(store.delete_delivered([mid]) for mid in gone))
    assert counts == [0] * 5 + [1] * 15
    assert [m.mid for m in await store.list(*OWNER)] == mids[20:]
    if isinstance(store, PostgresStore):
        assert store._deletes.keys == 20 and store._deletes.queries < 10


async def test_a_failed_delivery_releases_the_lease_and_counts(store: Store) -> None:
    await store.store_batch([message(), message()], 0)
    claimed = await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert await store.release_lease([claimed[0].mid]) == 1
    assert await store.release_lease([claimed[1].mid], failed=False) == 1
    again = await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert [(m.mid, m.attempts) for m in again] == [(claimed[0].mid, 1), (claimed[1].mid, 0)]
    assert await store.release_lease([]) == 0


async def test_expired_leases_are_recovered(store: Store) -> None:
    await store.store_batch([message(), message(inc_time=NOW + 1)], 0)
    await store.claim_for_dump(*OWNER, now=NOW, limit=1, **LEASE)  # type: ignore[arg-type]
    await store.claim_for_dump(*OWNER, now=NOW + 20, limit=1, **LEASE)  # type: ignore[arg-type]
    assert await store.recover_expired_leases(NOW + 39) == 0
    assert await store.recover_expired_leases(NOW + 40) == 1
    assert await store.recover_expired_leases(NOW + 60) == 1
    assert await store.recover_expired_leases(NOW + 60) == 0
    # Recovered rows are claimable at any time again, with no failure counted.
    again = await store.claim_for_dump(*OWNER, now=NOW + 1, **LEASE)  # type: ignore[arg-type]
    assert [m.attempts for m in again] == [0, 0]


async def test_expired_rows_are_deleted(store: Store) -> None:
    await store.store_batch(
        [message(exp_time=NOW - 1), message(exp_time=NOW), message(exp_time=NOW + 1)], 0
    )
    assert await store.delete_expired(NOW, 100) == 2
    assert [m.exp_time for m in await store.list(*OWNER)] == [NOW + 1]


async def test_expired_rows_are_taken_with_what_their_senders_need(store: Store) -> None:
    await store.store_batch(
        [
            message(body=b"b", exp_time=NOW, src="sip:carol@example.org"),
            message(body=b"a", exp_time=NOW - 1, src="sip:bob@example.org"),
            message(body=b"kept", exp_time=NOW + 1),
        ],
        0,
    )
    first = await store.take_expired(NOW, 1)  # one batch of one
    rest = await store.take_expired(NOW, 10)
    assert [(m.body, m.src_addr, m.dst_addr) for m in first + rest] == [
        (b"b", "sip:carol@example.org", "sip:alice@example.com"),
        (b"a", "sip:bob@example.org", "sip:alice@example.com"),
    ]  # in id order across batches
    assert [m.body for m in await store.list(*OWNER)] == [b"kept"]
    assert await store.take_expired(NOW, 10) == []


# --- reminders ----------------------------------------------------------------------------------


async def test_due_reminders_are_claimed_by_send_time(store: Store) -> None:
    await store.store_batch(
        [
            message(body=b"later", snd_time=NOW - 10),
            message("bob", body=b"earliest", snd_time=NOW - 30),
            message(body=b"not yet", snd_time=NOW + 1),
            message(body=b"ordinary"),
            message(body=b"expired", snd_time=NOW - 40, exp_time=NOW),
            message("carol", body=b"middle", snd_time=NOW - 20),
        ],
        0,
    )
    due = await store.claim_due_reminders(now=NOW, limit=2, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in due] == [b"earliest", b"middle"]
    more = await store.claim_due_reminders(now=NOW, limit=10, **LEASE)  # type: ignore[arg-type]
    assert [m.body for m in more] == [b"later"]
    assert await store.claim_due_reminders(now=NOW, limit=10, **LEASE) == []  # type: ignore[arg-type]


async def test_a_scheduled_row_is_not_dumped_until_reset(store: Store) -> None:
    [r] = await store.store_batch([message(snd_time=NOW - 5)], 0)
    assert await store.claim_for_dump(*OWNER, now=NOW, **LEASE) == []  # type: ignore[arg-type]
    [due] = await store.claim_due_reminders(now=NOW, limit=5, **LEASE)  # type: ignore[arg-type]
    assert await store.reset_reminder([due.mid]) == 1
    assert await store.reset_reminder([]) == 0
    [m] = await store.claim_for_dump(*OWNER, now=NOW, **LEASE)  # type: ignore[arg-type]
    assert (m.mid, m.snd_time) == (r.mid, 0)


# --- admin --------------------------------------------------------------------------------------


async def test_count_list_and_purge_work_per_owner(store: Store) -> None:
    await store.store_batch([message(body=b"a"), message("bob"), message(body=b"b")], 0)
    assert await store.count(*OWNER) == 2
    assert [m.body for m in await store.list(*OWNER)] == [b"a", b"b"]
    assert await store.purge(*OWNER) == 2
    assert await store.count(*OWNER) == 0
    assert await store.list(*OWNER) == []
    assert await store.count("bob", OWNER[1]) == 1

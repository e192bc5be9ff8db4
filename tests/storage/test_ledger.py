"""The delivery ledger and the device table, on both backends: per-device leases, the last
delivery deletes a message, forgetting devices completes messages, one Call-ID per message."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from storage_helpers import NOW, execute_sql, message

from msilo.storage import Store
from msilo.storage.base import NewMessage

MEMORY = 30 * 86400


def _owner() -> tuple[str, str]:
    # The device table is shared by every test of the session: one user per test.
    return f"u{uuid.uuid4().hex[:10]}", "example.com"


def _msg(owner: tuple[str, str], n: int, **changes: object) -> NewMessage:
    m = message(*owner, body=f"m{n}".encode(), key=f"{owner[0]}-{n}", inc_time=NOW + n)
    return dataclasses.replace(m, **changes)  # type: ignore[arg-type]


async def _claim(store: Store, owner: tuple[str, str], device: str) -> list[int]:
    rows = await store.claim_for_device(
        *owner, device, lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    return [row.mid for row, _ in rows]


async def test_each_device_claims_every_row_once(store: Store) -> None:
    owner = _owner()
    await store.store_batch([_msg(owner, n) for n in range(3)], 0)
    phone = await _claim(store, owner, "phone")
    desktop = await _claim(store, owner, "desktop")
    assert len(phone) == 3 and phone == desktop  # the same rows, both at once
    assert await _claim(store, owner, "phone") == []  # leased to the phone already


async def test_concurrent_claims_for_one_device_never_share_a_row(make_store: object) -> None:
    stores = [await make_store() for _ in range(4)]  # type: ignore[operator]
    await stores[0].create_schema()
    owner = _owner()
    await stores[0].store_batch([_msg(owner, n) for n in range(40)], 0)

    async def claim(s: Store) -> list[int]:
        rows = await s.claim_for_device(
            *owner, "phone", lease_owner="t", lease_seconds=60, now=NOW + 100, limit=5
        )
        return [row.mid for row, _ in rows]

    taken: list[int] = []
    for _ in range(3):
        for got in await asyncio.gather(*(claim(s) for s in stores)):
            taken.extend(got)
    assert len(taken) == len(set(taken))  # never one row to two claims of the device
    while more := await claim(stores[0]):  # and none lost: the rest comes after
        taken.extend(more)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 40


async def test_the_last_due_device_to_get_a_message_deletes_it(store: Store) -> None:
    owner = _owner()
    await store.touch_devices(*owner, ["phone", "desktop"], now=NOW)
    [result] = await store.store_batch([_msg(owner, 1)], 0)
    assert result.mid is not None
    [(row, first)] = await store.claim_for_device(
        *owner, "phone", lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    assert first
    assert await store.settle_delivered([(row.mid, "phone")], memory=MEMORY) == 0
    assert await store.count(*owner) == 1  # the desktop is still due
    assert await _claim(store, owner, "phone") == []  # the phone has it
    assert await _claim(store, owner, "desktop") == [row.mid]
    assert await store.settle_delivered([(row.mid, "desktop")], memory=MEMORY) == 1
    assert await store.count(*owner) == 0


async def test_two_devices_settling_at_once_still_delete_the_message(make_store: object) -> None:
    a, b = await make_store(), await make_store()  # type: ignore[operator]
    await a.create_schema()
    owner = _owner()
    await a.touch_devices(*owner, ["phone", "desktop"], now=NOW)
    results = await a.store_batch([_msg(owner, n) for n in range(30)], 0)
    mids = [r.mid for r in results]
    await asyncio.gather(
        *(a.settle_delivered([(m, "phone")], memory=MEMORY) for m in mids),
        *(b.settle_delivered([(m, "desktop")], memory=MEMORY) for m in mids),
    )
    assert await a.count(*owner) == 0  # no message left behind with both deliveries


async def test_a_failed_attempt_releases_the_device_lease_and_counts(store: Store) -> None:
    owner = _owner()
    await store.store_batch([_msg(owner, 1)], 0)
    [mid] = await _claim(store, owner, "phone")
    assert await store.release_device_leases([(mid, "phone")], failed=True) == 1
    # Nothing left to drop: a second release (a retry) counts no second attempt.
    assert await store.release_device_leases([(mid, "phone")], failed=True) == 0
    [row] = await store.list(*owner)
    assert row.attempts == 1
    claimed = await store.claim_for_device(
        *owner, "phone", lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    assert [(r.mid, first) for r, first in claimed] == [(mid, True)]


async def test_forgetting_the_last_undelivered_device_completes_the_message(store: Store) -> None:
    owner = _owner()
    await store.touch_devices(*owner, ["phone", "desktop"], now=NOW)
    [result] = await store.store_batch([_msg(owner, 1)], 0)
    assert result.mid is not None
    await store.settle_delivered([(result.mid, "phone")], memory=MEMORY)
    assert await store.remembered_devices(*owner, since=NOW - 1) == ["desktop", "phone"]
    assert await store.forget_devices(*owner, ["desktop"], memory=MEMORY) == 1
    assert await store.count(*owner) == 0
    assert await store.remembered_devices(*owner, since=NOW - 1) == ["phone"]


async def test_forgetting_every_device_keeps_undelivered_messages(store: Store) -> None:
    owner = _owner()
    await store.touch_devices(*owner, ["phone"], now=NOW)
    await store.store_batch([_msg(owner, 1)], 0)
    assert await store.forget_devices(*owner, None, memory=MEMORY) == 0
    assert await store.count(*owner) == 1  # the next device to register takes it
    assert await store.remembered_devices(*owner, since=0) == []


async def test_old_devices_are_forgotten_and_orphan_ledger_rows_dropped(store: Store) -> None:
    owner = _owner()
    await store.touch_devices(*owner, ["old"], now=NOW - 100)
    await store.touch_devices(*owner, ["new"], now=NOW)
    await store.store_batch([_msg(owner, 1)], 0)
    await _claim(store, owner, "new")
    await store.purge(*owner)
    assert await store.forget_old_devices(NOW - 50) >= 1
    assert await store.remembered_devices(*owner, since=0) == ["new"]


async def test_one_call_id_per_stored_message_of_an_owner(store: Store) -> None:
    owner, other = _owner(), _owner()
    await store.store_batch(
        [_msg(owner, 1, callid="c@x"), _msg(owner, 2, callid="c@x"), _msg(other, 3, callid="c@x")],
        0,
    )
    await store.store_batch([_msg(owner, 4, callid="c@x")], 0)
    claimed = await store.claim_for_device(
        *owner, "phone", lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    ids = [row.callid for row, _ in claimed]
    # The first keeps the request's Call-ID; the others get one made from their row id.
    assert ids[0] == "c@x"
    assert len(set(ids)) == 3 and all(i is not None and i.startswith("c@x") for i in ids)
    # Written back: every later attempt, to any device, carries the same.
    assert [r.callid for r in await store.list(*owner)] == ids
    again = await store.claim_for_device(
        *owner, "desktop", lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    assert [row.callid for row, _ in again] == ids
    # Another owner's message keeps it: only one owner's messages are compared.
    [(theirs, _)] = await store.claim_for_device(
        *other, "phone", lease_owner="t", lease_seconds=60, now=NOW + 100
    )
    assert theirs.callid == "c@x"


async def test_first_device_claims_fix_the_call_id_too(store: Store) -> None:
    owner = _owner()
    await store.store_batch([_msg(owner, n, callid="same@x") for n in (1, 2)], 0)
    rows = await store.claim_for_dump(*owner, lease_owner="t", lease_seconds=60, now=NOW + 100)
    assert rows[0].callid == "same@x"
    assert len({r.callid for r in rows}) == 2


async def test_a_message_stored_after_a_relay_is_not_offered_to_the_device_that_has_it(
    store: Store,
) -> None:
    owner = _owner()
    relayed = dataclasses.replace(
        _msg(owner, 1),
        delivered_to=("phone",),
        leased_to=("tablet",),
        lease_until=NOW + 500,
        lease_owner="relay",
    )
    await store.store_batch([relayed], 0)
    assert await _claim(store, owner, "phone") == []  # answered 2xx to the relay
    assert await _claim(store, owner, "tablet") == []  # its branch is still running
    assert len(await _claim(store, owner, "desktop")) == 1


async def test_a_table_of_an_earlier_release_gets_the_callid_column_at_start(
    store: Store,
) -> None:
    table = store.names.table
    await execute_sql(store, f'ALTER TABLE "{table}" DROP COLUMN callid')
    await store.create_schema()  # what `msilo serve` runs at start
    owner = _owner()
    await store.store_batch([_msg(owner, 1, callid="back@x")], 0)
    assert [r.callid for r in await store.list(*owner)] == ["back@x"]

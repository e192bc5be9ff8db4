"""Push targets on both backends: kept past the binding, one claim per device per window
across stores, dead tokens dropped, forgotten with the device, the push time taken once."""

from __future__ import annotations

import asyncio
import uuid

from storage_helpers import NOW

from msilo.storage import Store
from msilo.storage.push_targets import PushRecord

WINDOW_MS = 10_000
NOW_MS = NOW * 1000


def _owner() -> tuple[str, str]:
    # The push table is shared by every test of the session: one user per test.
    return f"u{uuid.uuid4().hex[:10]}", "example.com"


async def _save(store: Store, owner: tuple[str, str], device: str, prid: str = "tok") -> None:
    await store.save_push_target(*owner, device, provider="fcm", prid=prid, param="proj", now=NOW)


async def _claim(store: Store, owner: tuple[str, str], at_ms: int, **kw: object) -> list[str]:
    got = await store.claim_push_targets(
        *owner,
        now_ms=at_ms,
        window_ms=WINDOW_MS,
        since=NOW - 60,
        **kw,  # type: ignore[arg-type]
    )
    return sorted(r.device for r in got)


async def test_a_saved_target_is_claimed_with_its_parameters(store: Store) -> None:
    owner = _owner()
    await _save(store, owner, "phone", prid="abc")
    got = await store.claim_push_targets(*owner, now_ms=NOW_MS, window_ms=WINDOW_MS, since=NOW - 60)
    assert got == [PushRecord(device="phone", provider="fcm", prid="abc", param="proj")]


async def test_one_push_per_device_per_window(store: Store) -> None:
    owner = _owner()
    await _save(store, owner, "phone")
    assert await _claim(store, owner, NOW_MS) == ["phone"]
    assert await _claim(store, owner, NOW_MS + WINDOW_MS - 1) == []  # coalesced
    assert await _claim(store, owner, NOW_MS + WINDOW_MS) == ["phone"]  # a new window


async def test_concurrent_claims_across_stores_give_each_device_once(make_store: object) -> None:
    stores = [await make_store() for _ in range(4)]  # type: ignore[operator]
    await stores[0].create_schema()
    owner = _owner()
    for device in ("phone", "tablet"):
        await _save(stores[0], owner, device)
    results = await asyncio.gather(*(_claim(s, owner, NOW_MS) for s in stores))
    taken = [d for got in results for d in got]
    assert sorted(taken) == ["phone", "tablet"]  # each once, whoever won it


async def test_excluded_and_forgotten_devices_are_not_claimed(store: Store) -> None:
    owner = _owner()
    for device in ("phone", "tablet", "desk"):
        await _save(store, owner, device)
    assert await _claim(store, owner, NOW_MS, exclude=["tablet"]) == ["desk", "phone"]
    # The excluded one was not marked: it is still free to push.
    assert await _claim(store, owner, NOW_MS + 1) == ["tablet"]
    await store.forget_devices(*owner, ["phone"], memory=86400)
    assert await _claim(store, owner, NOW_MS + WINDOW_MS + 1) == ["desk", "tablet"]
    await store.forget_devices(*owner, None, memory=86400)
    assert await _claim(store, owner, NOW_MS + 3 * WINDOW_MS) == []


async def test_a_device_not_registered_since_is_not_claimed_and_old_ones_are_forgotten(
    store: Store,
) -> None:
    owner = _owner()
    await _save(store, owner, "phone")
    got = await store.claim_push_targets(*owner, now_ms=NOW_MS, window_ms=WINDOW_MS, since=NOW + 1)
    assert got == []  # outside the device memory
    await store.forget_old_devices(NOW + 1)
    assert await _claim(store, owner, NOW_MS) == []  # gone, not just filtered


async def test_a_dead_token_is_dropped_unless_the_device_registered_a_new_one(
    store: Store,
) -> None:
    owner = _owner()
    await _save(store, owner, "phone", prid="old")
    await _save(store, owner, "phone", prid="new")  # the app re-registered meanwhile
    assert await store.drop_push_target(*owner, "phone", prid="old") is False
    assert await _claim(store, owner, NOW_MS) == ["phone"]
    assert await store.drop_push_target(*owner, "phone", prid="new") is True
    assert await _claim(store, owner, NOW_MS + WINDOW_MS) == []


async def test_a_new_token_starts_a_new_window(store: Store) -> None:
    owner = _owner()
    await _save(store, owner, "phone", prid="one")
    assert await _claim(store, owner, NOW_MS) == ["phone"]
    await _save(store, owner, "phone", prid="one")  # a refresh keeps the window
    assert await _claim(store, owner, NOW_MS + 1) == []
    await _save(store, owner, "phone", prid="two")  # reinstalled app: a new token
    assert await _claim(store, owner, NOW_MS + 2) == ["phone"]


async def test_the_push_time_is_taken_once(store: Store) -> None:
    owner = _owner()
    await _save(store, owner, "phone")
    assert await store.take_push_time(*owner, "phone") is None  # never pushed
    await _claim(store, owner, NOW_MS)
    assert await store.take_push_time(*owner, "phone") == NOW_MS
    assert await store.take_push_time(*owner, "phone") is None
    # Cleared by the delivery: the device may be pushed again at once.
    assert await _claim(store, owner, NOW_MS + 1) == ["phone"]


async def test_a_claim_says_how_many_messages_wait(store: Store) -> None:
    from storage_helpers import message

    owner = _owner()
    await _save(store, owner, "phone")
    await store.store_batch(
        [message(*owner, body=f"m{n}".encode(), key=f"{owner[0]}-{n}") for n in range(3)], 0
    )
    [got] = await store.claim_push_targets(
        *owner, now_ms=NOW_MS, window_ms=WINDOW_MS, since=NOW - 60
    )
    assert got.waiting == 3


async def test_many_owners_claimed_at_once_each_get_their_own_devices(store: Store) -> None:
    owners = [_owner() for _ in range(20)]
    for owner in owners:
        await _save(store, owner, f"phone-{owner[0]}", prid=f"tok-{owner[0]}")
    # Concurrent claims (PostgreSQL answers them in one statement).
    results = await asyncio.gather(
        *(_claim(store, o, NOW_MS) for o in owners), _claim(store, owners[0], NOW_MS + 1)
    )
    assert results[1:20] == [[f"phone-{o[0]}"] for o in owners[1:]]
    # owners[0] was asked twice in the window: one of the two claims has the phone.
    assert sorted([results[0], results[20]]) == [[], [f"phone-{owners[0][0]}"]]

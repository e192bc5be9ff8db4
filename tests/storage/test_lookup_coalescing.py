"""Where is this user? Concurrent lookups, each answered with its own user's bindings.

On PostgreSQL concurrent lookups share one query (msilo.storage.coalesce); the answers
must be exactly what one lookup per user would give, in the same order (best q first).
The coalescer's failure and cancellation rules are tested on their own below.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from msilo.storage.base import Store
from msilo.storage.coalesce import Coalescer
from msilo.storage.location import Binding, BindingPlan
from msilo.storage.mysql import MySQLStore
from msilo.storage.postgres import PostgresStore


def _plan(*bindings: Binding) -> object:
    return lambda current: BindingPlan(upserts=bindings)


async def test_concurrent_lookups_each_get_their_own_users_bindings(
    store: Store, user: str
) -> None:
    now = int(time.time())
    users = [f"{user}-{i}" for i in range(40)]
    expected: dict[str, list[str]] = {}
    for i, user in enumerate(users):
        if i % 3 == 0:
            continue  # offline: no binding at all
        contacts = [
            Binding(user, "example.com", f"sip:{user}@192.0.2.{k}", expires=now + 600, q=q)
            for k, q in ((1, 0.5), (2, 1.0))
        ]
        if i % 3 == 2:  # one live binding and one that has expired
            contacts = [
                contacts[0],
                Binding(user, "example.com", f"sip:{user}@old", expires=now - 1, q=1.0),
            ]
        await store.update_bindings(user, "example.com", _plan(*contacts), now=now - 5)  # type: ignore[arg-type]
        live = sorted((b for b in contacts if b.expires > now), key=lambda b: -(b.q or 1.0))
        expected[user] = [b.contact for b in live]

    # The same user asked twice at once gets the same answer twice.
    asked = [*users, users[1], users[2]]
    answers = await asyncio.gather(
        *(store.lookup_bindings(u, "example.com", now=now) for u in asked)
    )
    for user, bindings in zip(asked, answers, strict=True):
        assert [b.contact for b in bindings] == expected.get(user, []), user
        assert all(b.username == user and b.domain == "example.com" for b in bindings)
    # Each caller owns its list: changing one answer changes no other.
    answers[1].clear()
    assert [b.contact for b in answers[-2]] == expected[users[1]]

    if isinstance(store, PostgresStore | MySQLStore):
        stats = store._lookups
        assert stats.keys == len(users) + 0  # the repeated users were asked once
        assert stats.queries < len(users) / 2, (stats.queries, stats.keys)


async def test_a_failed_query_fails_its_callers_and_the_next_one_runs() -> None:
    calls: list[list[str]] = []
    fail = True

    async def fetch_many(keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        if fail:
            raise ConnectionError("database went away")
        return {k: k.upper() for k in keys if k != "nobody"}

    lookups: Coalescer[str, str] = Coalescer(fetch_many, lambda: "-")
    first = [asyncio.ensure_future(lookups.get(k)) for k in ("a", "b")]
    results = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    fail = False
    assert await asyncio.gather(lookups.get("c"), lookups.get("nobody")) == ["C", "-"]
    # Keys asked in the same loop iteration share one query; a failed one is not retried
    # for the callers it failed (they got their error), only new keys are asked next.
    assert calls == [["a", "b"], ["c", "nobody"]]


async def test_a_caller_that_gave_up_is_not_asked_for() -> None:
    asked: list[str] = []

    async def fetch_many(keys: list[str]) -> dict[str, str]:
        asked.extend(keys)
        await asyncio.sleep(0.02)
        return {k: k for k in keys}

    lookups: Coalescer[str, str] = Coalescer(fetch_many, str)
    running = asyncio.ensure_future(lookups.get("first"))
    await asyncio.sleep(0.005)  # "first" is in flight; the next ones queue
    gave_up = asyncio.ensure_future(lookups.get("impatient"))
    waits = asyncio.ensure_future(lookups.get("patient"))
    await asyncio.sleep(0)
    gave_up.cancel()
    assert await running == "first" and await waits == "patient"
    assert asked == ["first", "patient"]
    with pytest.raises(ValueError):
        Coalescer(fetch_many, str, max_batch=0)

"""A REGISTER's change to a user's bindings is atomic against every other REGISTER.

On PostgreSQL the change is read-plan-write with a version check (and a locked
transaction after lost races); on SQLite one writer at a time.  Either way, devices
registering at the same moment must all end up registered: no lost update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from storage_helpers import message

from msilo.errors import DatabaseUnavailable, InvalidRecord
from msilo.storage.base import NewMessage, Store, StoreOutcome
from msilo.storage.location import Binding, BindingPlan


def _replace_all_with(binding: Binding) -> object:
    def plan(current: list[Binding]) -> BindingPlan:
        # Depends on what it read, as the registrar's plans do (limits, CSeq checks):
        # "REGISTER with Contact: * then mine" -- whatever was there goes.
        return BindingPlan(
            removes=tuple(b.contact for b in current if b.contact != binding.contact),
            upserts=(binding,),
        )

    return plan


async def test_plans_of_concurrent_registers_never_interleave(
    store: Store, make_store: object, user: str
) -> None:
    now = int(time.time())
    # Two stores = two workers (own pools) racing for the same user.
    other: Store = await make_store()  # type: ignore[operator]
    contacts = [f"sip:{user}@192.0.2.{i}" for i in range(24)]
    outcomes = await asyncio.gather(
        *(
            (store if i % 2 else other).update_bindings(
                user,
                "example.com",
                _replace_all_with(  # type: ignore[arg-type]
                    Binding(user, "example.com", c, expires=now + 600, last_modified=now)
                ),
                now=now,
            )
            for i, c in enumerate(contacts)
        )
    )
    # Serialised, every REGISTER removed all the others: exactly one binding is left,
    # and each REGISTER answered with its own contact alone.
    for contact, outcome in zip(contacts, outcomes, strict=True):
        assert outcome.error is None
        assert [b.contact for b in outcome.bindings] == [contact]
    live = await store.lookup_bindings(user, "example.com", now=now)
    assert len(live) == 1 and live[0].contact in contacts


async def test_a_plan_error_changes_nothing_and_a_query_writes_nothing(
    store: Store, user: str
) -> None:
    now = int(time.time())
    kept = Binding(user, "example.com", f"sip:{user}@192.0.2.1", expires=now + 60, q=0.5)
    expired = Binding(user, "example.com", f"sip:{user}@192.0.2.2", expires=now - 1)
    await store.update_bindings(
        user, "example.com", lambda cur: BindingPlan(upserts=(kept, expired)), now=now - 10
    )
    refused = await store.update_bindings(
        user,
        "example.com",
        lambda cur: BindingPlan(upserts=(kept,), error=(423, "Interval Too Brief")),
        now=now,
    )
    assert refused.error == (423, "Interval Too Brief") and refused.bindings == ()
    query = await store.update_bindings(user, "example.com", lambda cur: BindingPlan(), now=now)
    assert [b.contact for b in query.bindings] == [kept.contact]  # the expired one is not live
    assert query.bindings[0].q == 0.5


async def test_store_unless_online_asks_the_registrar_in_the_same_round_trip(
    store: Store, user: str
) -> None:
    now = int(time.time())
    online, text_less, expired, absent = (f"{user}-{x}" for x in ("on", "inv", "exp", "none"))
    for name, expires, methods in (
        (online, now + 600, None),  # methods unknown: assumed to take MESSAGE
        (text_less, now + 600, ("INVITE", "BYE")),  # registered, but not for MESSAGE
        (expired, now - 1, None),
    ):
        binding = Binding(name, "example.com", f"sip:{name}@192.0.2.1", expires, methods=methods)
        await store.update_bindings(
            name,
            "example.com",
            lambda cur, b=binding: BindingPlan(upserts=(b,)),  # type: ignore[misc]
            now=now - 5,
        )
    also_online = Binding(
        online, "example.com", f"sip:{online}@192.0.2.2", now + 600, methods=("MESSAGE",)
    )
    await store.update_bindings(
        online, "example.com", lambda cur: BindingPlan(upserts=(also_online,)), now=now
    )

    def msg(name: str, key: str, unless_online: bool = True) -> NewMessage:
        return dataclasses.replace(
            message(name, "example.com", key=f"{user}-{key}"), unless_online=unless_online
        )

    # A plain store (custom routes, relay failures) stores whoever is online.
    first = await store.store_batch([msg(online, "plain", unless_online=False)], 1)
    results = await store.store_batch(
        [
            msg(online, "a"),
            msg(text_less, "b"),
            msg(expired, "c"),
            msg(absent, "d"),
            msg(online, "plain"),  # a replay of the stored one: still a duplicate
        ],
        1,  # max_messages: the online user's stored row must not make "a" over quota
    )
    assert first[0].outcome is StoreOutcome.STORED
    assert [r.outcome for r in results] == [
        StoreOutcome.ONLINE,
        StoreOutcome.STORED,
        StoreOutcome.STORED,
        StoreOutcome.STORED,
        StoreOutcome.DUPLICATE,
    ]
    assert results[0].mid is None and results[4].mid == first[0].mid
    assert await store.count(online, "example.com") == 1
    for name in (text_less, expired, absent):
        assert await store.count(name, "example.com") == 1


async def test_values_the_table_cannot_hold_are_refused_before_any_sql(
    store: Store, user: str
) -> None:
    """InvalidRecord (the request's fault) naming the column, never a database error, and
    nothing written: the same on both backends (issue 14, item 5)."""
    now = int(time.time())
    good = Binding(user, "example.com", f"sip:{user}@192.0.2.1", expires=now + 60)
    bad_values = {
        "contact": "sip:a\udcff@192.0.2.9",
        "callid": "c\udcfe@x",
        "path": "<sip:p\x00@192.0.2.9;lr>",
        "instance": "<urn:\udcff>",
        "cseq": 2**31,
    }
    for column, value in bad_values.items():
        changes: dict[str, object] = {"contact": f"sip:{user}@192.0.2.2", column: value}
        bad = dataclasses.replace(good, **changes)  # type: ignore[arg-type]
        with pytest.raises(InvalidRecord) as caught:
            await store.update_bindings(
                user, "example.com", lambda cur, b=bad: BindingPlan(upserts=(good, b)), now=now
            )
        assert caught.value.field == column
        assert not isinstance(caught.value, DatabaseUnavailable)
    for username, domain, column in (
        ("a\x00b", "example.com", "username"),
        ("u" * 65, "example.com", "username"),
        (user, "d\udcff.example.com", "domain"),
    ):
        with pytest.raises(InvalidRecord) as caught:
            await store.update_bindings(username, domain, lambda cur: BindingPlan(), now=now)
        assert caught.value.field == column
        # No row can have such a key: lookups find nothing, without asking the database.
        assert await store.lookup_bindings(username, domain, now=now) == []
        assert await store.get_subscriber(username, domain) is None
        assert await store.count(username, domain) == 0
        assert await store.list(username, domain) == []
        assert await store.purge(username, domain) == 0
        assert not await store.remove_subscriber(username, domain)
        assert (
            await store.claim_for_dump(username, domain, lease_owner="t", lease_seconds=10, now=now)
            == []
        )
    assert await store.lookup_bindings(user, "example.com", now=now) == []

"""A REGISTER's change to a user's bindings is atomic against every other REGISTER.

On PostgreSQL the change is read-plan-write with a version check (and a locked
transaction after lost races); on SQLite one writer at a time.  Either way, devices
registering at the same moment must all end up registered: no lost update.
"""

from __future__ import annotations

import asyncio
import time

from msilo.storage.base import Store
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

"""PostgreSQL's deferred refreshes (``registrar.write_behind``): the read that answers a
refresh, and the later write that lands only where the binding is still the one refreshed."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest

from msilo.storage import Store
from msilo.storage.base import NewMessage
from msilo.storage.ledger import TOUCH_GRANULARITY
from msilo.storage.location import Binding

NOW = int(time.time())
DOMAIN = "example.com"


def _binding(user: str, contact: str, *, cseq: int = 1, callid: str = "reg") -> Binding:
    return Binding(
        username=user, domain=DOMAIN, contact=contact, expires=NOW + 600, callid=callid,
        cseq=cseq, received="udp:127.0.0.1:5060", transport="udp", last_modified=NOW,
    )  # fmt: skip


@pytest.mark.backend_only("postgres")
async def test_the_state_read_has_live_bindings_and_the_pending_probe(
    store: Store, user: str
) -> None:
    a = _binding(user, f"sip:{user}@10.0.0.1")
    b = dataclasses.replace(_binding(user, f"sip:{user}@10.0.0.2"), q=0.5)
    for x in (a, b):
        assert await store.register_contact(x, now=NOW, device=x.contact) is not None
    nobody = await store.registration_state(f"{user}-nobody", DOMAIN, now=NOW)
    assert nobody == ([], False)
    state = await store.registration_state(user, DOMAIN, now=NOW)
    assert state is not None
    bindings, pending = state
    assert [x.contact for x in bindings] == [a.contact, b.contact]  # best q first
    assert bindings[0].callid == "reg" and bindings[0].received == a.received
    assert not pending
    await store.store_batch(
        [NewMessage(user, DOMAIN, "sip:x@y", f"sip:{user}@{DOMAIN}", b"hi", "text/plain",
                    NOW, NOW + 60)],
        0,
    )  # fmt: skip
    states = await asyncio.gather(
        *(store.registration_state(u, DOMAIN, now=NOW) for u in (user, f"{user}-nobody"))
    )
    assert [s[1] if s else None for s in states] == [True, False]
    # Expired bindings are not live.
    later = await store.registration_state(user, DOMAIN, now=NOW + 601)
    assert later is not None and later[0] == []


@pytest.mark.backend_only("postgres")
async def test_a_deferred_refresh_lands_only_on_the_binding_it_refreshed(
    store: Store, user: str, db_url: str
) -> None:
    users = [f"{user}-{i}" for i in range(4)]
    for u in users:
        await store.register_contact(_binding(u, f"sip:{u}@h"), now=NOW, device=None)
    conn = await asyncpg.connect(db_url)
    try:
        # users[1]: re-registered meanwhile with a new Call-ID; users[2]: a newer CSeq.
        await conn.execute("UPDATE location SET callid = 'rebooted' WHERE username = $1", users[1])
        await conn.execute("UPDATE location SET cseq = 9 WHERE username = $1", users[2])
        await conn.execute("DELETE FROM location WHERE username = $1", users[3])  # logged out
        refreshes = [
            (dataclasses.replace(_binding(u, f"sip:{u}@h", cseq=5), expires=NOW + 900), None)
            for u in users
        ]
        assert await store.refresh_bindings(refreshes) == 1
        rows = {
            r[0]: (r[1], r[2], r[3])
            for r in await conn.fetch(
                "SELECT username, expires, cseq, callid FROM location WHERE username = ANY($1)",
                users,
            )
        }
    finally:
        await conn.close()
    assert rows == {
        users[0]: (NOW + 900, 5, "reg"),
        users[1]: (NOW + 600, 1, "rebooted"),
        users[2]: (NOW + 600, 9, "reg"),
    }
    # Written twice (a retry after a lost answer): the second changes nothing.
    assert await store.refresh_bindings(refreshes[:1]) == 0


@pytest.mark.backend_only("postgres")
async def test_a_deferred_refresh_touches_its_device_as_a_register_does(
    store: Store, user: str, db_url: str
) -> None:
    old = NOW - TOUCH_GRANULARITY - 10
    first = dataclasses.replace(_binding(user, f"sip:{user}@h1"), last_modified=old)
    second = dataclasses.replace(_binding(user, f"sip:{user}@h2"), last_modified=old)
    for x in (first, second):
        await store.register_contact(x, now=old, device="phone")
    # Two contacts of one device in one write: one device row, touched once.
    refreshes = [
        (dataclasses.replace(x, cseq=2, expires=NOW + 600, last_modified=NOW), "phone")
        for x in (first, second)
    ]
    assert await store.refresh_bindings(refreshes) == 2
    conn = await asyncpg.connect(db_url)
    try:
        touched = await conn.fetchval(
            "SELECT last_register FROM msilo_device WHERE username = $1 AND device = 'phone'",
            user,
        )
    finally:
        await conn.close()
    assert touched == NOW


async def test_other_backends_have_no_deferred_refresh(
    backend: str, store: Store, user: str
) -> None:
    if backend == "postgres":
        assert await store.registration_state(user, DOMAIN, now=NOW) == ([], False)
        return
    assert await store.registration_state(user, DOMAIN, now=NOW) is None
    with pytest.raises(NotImplementedError):
        await store.refresh_bindings([(_binding(user, "sip:x@h"), None)])

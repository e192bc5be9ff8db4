"""PostgreSQL's one-contact REGISTER path: concurrent REGISTERs share one round trip and one
commit (group commit), per-user order and the RFC 3261 §10.3 CSeq rule kept, no deadlock
between batches that share users."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from msilo.storage import Store
from msilo.storage.location import Binding
from msilo.storage.postgres import PostgresStore

NOW = int(time.time())


def _binding(user: str, contact: str, *, cseq: int = 1, callid: str = "reg") -> Binding:
    return Binding(
        username=user, domain="example.com", contact=contact, expires=NOW + 600,
        callid=callid, cseq=cseq, received="udp:127.0.0.1:5060", transport="udp",
        last_modified=NOW,
    )  # fmt: skip


@pytest.mark.backend_only("postgres")
async def test_concurrent_registers_share_round_trips(
    backend: str, store: Store, user: str
) -> None:
    assert isinstance(store, PostgresStore)
    users = [f"{user}-{i}" for i in range(300)]
    outcomes = await asyncio.gather(
        *(
            store.register_contact(_binding(u, f"sip:{u}@10.0.0.1:5060"), now=NOW, device=u)
            for u in users
        )
    )
    assert all(o is not None and len(o.bindings) == 1 for o in outcomes)
    assert all(o is not None and not o.pending for o in outcomes)
    # Far fewer calls than REGISTERs: they were committed in batches.
    assert store._registers.queries < len(users) / 4, store._registers.queries
    for u in users[:5]:
        assert [b.contact for b in await store.lookup_bindings(u, "example.com", now=NOW)] == [
            f"sip:{u}@10.0.0.1:5060"
        ]


@pytest.mark.backend_only("postgres")
async def test_one_users_registers_in_one_batch_see_each_other(
    backend: str, store: Store, user: str
) -> None:
    a = _binding(user, "sip:a@10.0.0.1", cseq=1, callid="ca")
    b = _binding(user, "sip:b@10.0.0.2", cseq=1, callid="cb")
    # The same Call-ID and CSeq again (another expiry, so not a retransmission):
    # RFC 3261 §10.3 step 7 is the plan's to answer.
    replayed = dataclasses.replace(a, expires=NOW + 300)
    first, second, replay = await asyncio.gather(
        *(store.register_contact(x, now=NOW, device=x.contact) for x in (a, b, replayed))
    )
    assert first is not None and second is not None
    assert replay is None
    assert {b.contact for b in second.bindings} == {"sip:a@10.0.0.1", "sip:b@10.0.0.2"}


@pytest.mark.backend_only("postgres")
async def test_batches_sharing_users_do_not_deadlock(
    backend: str, make_store: object, user: str
) -> None:
    stores = [await make_store() for _ in range(3)]  # type: ignore[operator]
    await stores[0].create_schema()
    users = [f"{user}-{i}" for i in range(40)]

    async def wave(s: Store, order: list[str], cseq: int) -> list[object]:
        return list(
            await asyncio.gather(
                *(
                    s.register_contact(
                        _binding(u, f"sip:{u}@10.0.0.1", cseq=cseq), now=NOW, device=u
                    )
                    for u in order
                )
            )
        )

    results = await asyncio.gather(
        wave(stores[0], users, 1), wave(stores[1], users[::-1], 2), wave(stores[2], users, 3)
    )
    assert sum(1 for batch in results for r in batch if r is not None) >= len(users)

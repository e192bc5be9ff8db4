"""``registrar.write_behind``: a refresh that changes nothing but the expiry is answered from
a read and written later; everything else is written before its 200, as without it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
import pytest

from msilo.routing.writebehind import FLUSH_CHUNK, RefreshWriteBehind
from msilo.storage.base import NewMessage
from msilo.storage.location import Binding
from tests.service.conftest import Running, ServerFactory, rename_table, stop_worker

DOMAIN = "127.0.0.1"
postgres = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


async def _binding(srv: Running, user: str) -> tuple[int, int, str]:
    """(expires, cseq, callid) of the user's one stored binding, read from the database."""
    conn = await asyncpg.connect(srv.config.msilo.db_url)
    try:
        rows = await conn.fetch(
            "SELECT expires, cseq, callid FROM location WHERE username = $1", user
        )
    finally:
        await conn.close()
    assert len(rows) == 1, rows
    return int(rows[0][0]), int(rows[0][1]), str(rows[0][2])


async def _next_second() -> None:
    """Sleep into the next wall-clock second: a refresh then asks for a later expiry."""
    await asyncio.sleep(1.05 - time.time() % 1)


async def _registered_then_refreshed(srv: Running, user: str) -> tuple[Any, tuple[int, int, str]]:
    ua = await srv.agent(user, DOMAIN)
    assert (await ua.register(600)).status == 200
    before = await _binding(srv, user)
    await _next_second()
    answer = await ua.register(600)
    assert answer.status == 200
    assert ";expires=600" in (answer.get_header("Contact") or "")
    return ua, before


@postgres
async def test_a_refresh_is_answered_at_once_and_written_within_the_window(
    server: ServerFactory,
) -> None:
    srv = await server("registrar.write_behind=1.0")
    _, before = await _registered_then_refreshed(srv, "bob")
    assert srv.stats()["refreshes_deferred"] == 1
    # Answered, not written yet: every other worker still sees the previous expiry.
    assert await _binding(srv, "bob") == before
    deadline = time.monotonic() + 5
    while (after := await _binding(srv, "bob")) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    expires, cseq, callid = after
    assert expires > before[0] and cseq > before[1] and callid == before[2]


@postgres
async def test_a_graceful_stop_writes_the_refreshes_it_deferred(server: ServerFactory) -> None:
    srv = await server("registrar.write_behind=30")
    _, before = await _registered_then_refreshed(srv, "bob")
    assert await _binding(srv, "bob") == before
    await stop_worker(srv)
    expires, cseq, _ = await _binding(srv, "bob")
    assert expires > before[0] and cseq > before[1]


@postgres
async def test_a_refresh_with_a_message_waiting_delivers_it(server: ServerFactory) -> None:
    srv = await server("registrar.write_behind=30", "msilo.add_date=false")
    bob = await srv.agent("bob", DOMAIN)
    assert (await bob.register(600)).status == 200
    now = int(time.time())
    # Stored while bob was online (as when a relay to him failed): his refresh finds it.
    await srv.store.store_batch(
        [NewMessage("bob", DOMAIN, f"sip:alice@{DOMAIN}", f"sip:bob@{DOMAIN}", b"waiting",
                    "text/plain", now, now + 3600)],
        0,
    )  # fmt: skip
    await _next_second()
    assert (await bob.register(600)).status == 200
    assert srv.stats()["refreshes_deferred"] == 1
    [got] = await bob.wait_requests(1)
    assert got.request.method == "MESSAGE" and got.request.body == b"waiting"


@postgres
async def test_a_newer_registration_elsewhere_is_not_overwritten(server: ServerFactory) -> None:
    """Another worker (or host) re-registers the contact with a new Call-ID after our
    deferred refresh: RFC 3261 §10.3 keeps the newer binding, our write lands nowhere."""
    first = await server("registrar.write_behind=30")
    bob, _ = await _registered_then_refreshed(first, "bob")
    other = await server()
    # The device rebooted and registered through the other worker: a new Call-ID.
    via_other = await other.agent("bob", DOMAIN)
    rebooted = await via_other.request(
        "REGISTER", f"sip:{DOMAIN}", to_uri=bob.uri, content_type=None,
        headers=[f"Contact: <{bob.contact}>", "Expires: 300"],
        call_id="after-reboot@127.0.0.1", cseq=1,
    )  # fmt: skip
    assert rebooted.status == 200
    await stop_worker(first)
    _, cseq, callid = await _binding(first, "bob")
    assert callid == "after-reboot@127.0.0.1" and cseq == 1


@postgres
async def test_anything_but_a_pure_refresh_is_written_before_its_200(
    server: ServerFactory,
) -> None:
    srv = await server("registrar.write_behind=30")
    bob = await srv.agent("bob", DOMAIN)
    assert (await bob.register(600)).status == 200
    await _next_second()
    # A changed q is a change: written through.
    changed = await bob.register(600, contact=f"<{bob.contact}>;q=0.5")
    assert changed.status == 200
    conn = await asyncpg.connect(srv.config.msilo.db_url)
    try:
        q = await conn.fetchval("SELECT q FROM location WHERE username = 'bob'")
    finally:
        await conn.close()
    assert q == pytest.approx(0.5)
    assert srv.stats()["refreshes_deferred"] == 0


@postgres
async def test_a_failed_write_keeps_the_refreshes_for_the_next(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await server("registrar.write_behind=30")
    _, before = await _registered_then_refreshed(srv, "bob")
    behind = srv.worker.write_behind
    assert behind is not None and behind.pending == 1
    await rename_table(srv, "location", broken=True)
    with caplog.at_level(logging.ERROR, logger="msilo.registrar"):
        assert await behind.flush() == 0
    assert behind.pending == 1
    assert "event=refresh_write_failed refreshes=1" in caplog.text
    await rename_table(srv, "location", broken=False)
    assert await behind.flush() == 1
    assert behind.pending == 0
    expires, cseq, _ = await _binding(srv, "bob")
    assert expires > before[0] and cseq > before[1]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_other_databases_write_every_refresh_through(server: ServerFactory) -> None:
    srv = await server("registrar.write_behind=30")
    bob = await srv.agent("bob", DOMAIN)
    assert (await bob.register(600)).status == 200
    await _next_second()
    assert (await bob.register(600)).status == 200
    assert srv.stats()["refreshes_deferred"] == 0


@postgres
async def test_more_refreshes_than_one_transaction_takes_are_all_written(
    server: ServerFactory,
) -> None:
    srv = await server()
    behind = RefreshWriteBehind(srv.store, 30)
    now = int(time.time())
    users = [f"u{i}" for i in range(FLUSH_CHUNK + 20)]

    def binding(user: str, cseq: int, expires: int) -> Binding:
        return Binding(
            user, DOMAIN, f"sip:{user}@10.0.0.1", expires, callid=f"c-{user}", cseq=cseq,
            received="udp:10.0.0.1:5060", transport="udp", last_modified=now,
        )  # fmt: skip

    firsts = await asyncio.gather(
        *(behind.register(binding(u, 1, now + 600), now=now, device=None) for u in users)
    )
    assert all(o is not None for o in firsts) and behind.pending == 0  # CSeq 1: written
    refreshed = await asyncio.gather(
        *(behind.register(binding(u, 2, now + 900), now=now, device=None) for u in users)
    )
    assert all(o is not None and o.bindings[0].expires == now + 900 for o in refreshed)
    assert behind.pending == len(users)
    assert await behind.flush() == len(users)
    conn = await asyncpg.connect(srv.config.msilo.db_url)
    try:
        written = await conn.fetchval(
            "SELECT count(*) FROM location WHERE expires = $1 AND cseq = 2", now + 900
        )
    finally:
        await conn.close()
    assert written == len(users)


@postgres
async def test_a_refresh_whose_read_fails_gets_503_and_nothing_is_deferred(
    server: ServerFactory,
) -> None:
    srv = await server("registrar.write_behind=30")
    bob = await srv.agent("bob", DOMAIN)
    assert (await bob.register(600)).status == 200
    behind = srv.worker.write_behind
    assert behind is not None
    await rename_table(srv, "location", broken=True)
    refused = await bob.register(600)
    assert refused.status == 503 and refused.get_header("Retry-After") is not None
    assert behind.pending == 0 and srv.stats()["refreshes_deferred"] == 0
    await rename_table(srv, "location", broken=False)
    await _next_second()
    assert (await bob.register(600)).status == 200
    assert behind.pending == 1

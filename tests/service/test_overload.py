"""Overload sheds, never collapses: while a worker's oldest unanswered request has waited
longer than limits.max_queue_delay, new requests get 503 + Retry-After at once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from tests.service.conftest import ServerFactory

DOMAIN = "127.0.0.1"


@asynccontextmanager
async def _stalled(db_url: str) -> AsyncIterator[None]:
    """The database makes bob's REGISTER wait (his registrar lock, or SQLite's write lock)."""
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url[len("sqlite:///") :], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    if db_url.startswith("mysql://"):
        from msilo.storage.mysql_sql import LOCK_TABLE, location_slot
        from tests.conftest import mysql_connect

        my = await mysql_connect(db_url)
        async with my.cursor() as cur:
            await cur.execute("START TRANSACTION")
            await cur.execute(
                f"SELECT slot FROM {LOCK_TABLE} WHERE slot = %s FOR UPDATE",
                (location_slot("bob", DOMAIN),),
            )
        try:
            yield
        finally:
            my.close()  # the session ends: its transaction and lock with it
        return
    pg = await asyncpg.connect(db_url.split("?", 1)[0])
    key = "msilo-location:bob@127.0.0.1"
    await pg.execute("SELECT pg_advisory_lock(hashtextextended($1, 7))", key)
    try:
        yield
    finally:
        await pg.execute("SELECT pg_advisory_unlock(hashtextextended($1, 7))", key)
        await pg.close()


async def test_a_stalled_worker_answers_503_at_once_then_recovers(
    server: ServerFactory, db_url: str
) -> None:
    srv = await server("limits.max_queue_delay=0.3")
    bob = await srv.agent("bob", DOMAIN)
    carol = await srv.agent("carol", DOMAIN)
    async with _stalled(db_url):
        waiting = asyncio.ensure_future(bob.register(600))
        await asyncio.sleep(0.6)
        started = time.monotonic()
        shed = await carol.register(600)
        assert shed.status == 503
        assert shed.get_header("retry-after") is not None
        assert time.monotonic() - started < 0.25  # at once, not queued
    assert (await waiting).status == 200  # the admitted one goes on
    assert (await carol.register(600)).status == 200  # and admission resumes
    assert srv.stats()["overload_shed"] >= 1


async def test_requests_piled_up_unread_in_the_socket_are_shed_not_served_late(
    server: ServerFactory, db_url: str
) -> None:
    """While the loop is stuck, 1,500 MESSAGEs wait in the UDP socket, where no timer of
    ours sees them. Once it reads again, the backlog says they would be answered late:
    the excess is refused 503 at once (RFC 6357), the rest stored; every one answered,
    every 202 a row."""
    srv = await server(
        "limits.max_queue_delay=0.2", 'server.route="tests.service.routes:stall_when_marked"'
    )
    alice = await srv.agent("alice", DOMAIN)
    stalled = asyncio.ensure_future(
        alice.message(f"sip:bob@{DOMAIN}", "stall", headers=["X-Stall: 0.8"])
    )
    await asyncio.sleep(0.2)  # the worker's loop is blocked now
    senders = [await srv.agent(f"s{n}", DOMAIN) for n in range(10)]
    burst = [
        asyncio.ensure_future(senders[n % 10].message(f"sip:bob@{DOMAIN}", f"m{n}", timeout=20))
        for n in range(1500)
    ]
    answers = await asyncio.gather(*burst)
    assert (await stalled).status == 202
    statuses = [a.status for a in answers]
    shed = statuses.count(503)
    assert set(statuses) <= {202, 503}
    assert shed > 0 and srv.stats()["overload_shed"] == shed
    assert all(a.get_header("retry-after") for a in answers if a.status == 503)
    assert await srv.store.count("bob", DOMAIN) == statuses.count(202) + 1  # none lost

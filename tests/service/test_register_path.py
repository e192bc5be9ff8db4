"""The REGISTER a registrar sees most -- a device's first REGISTER and its refreshes -- in one
database round trip on PostgreSQL, with no silo query when there is nothing to deliver.

Counted with ``pg_stat_statements`` (top-level statements) in a throwaway cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.pgcluster import PgCluster
from tests.service.conftest import Running, start_worker, stop_worker

DOMAIN = "127.0.0.1"


@pytest.fixture
async def counted() -> AsyncIterator[str]:
    """A PostgreSQL cluster that counts every top-level statement; its DSN."""
    cluster = PgCluster()
    await asyncio.to_thread(cluster.init)
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.write("shared_preload_libraries = 'pg_stat_statements'\n")
        conf.write("pg_stat_statements.track = top\n")
    await asyncio.to_thread(cluster.start_blocking)
    try:
        conn = await asyncpg.connect(cluster.dsn())
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        await conn.close()
        yield cluster.dsn()
    finally:
        await asyncio.to_thread(cluster.stop_blocking)
        await asyncio.to_thread(cluster.destroy)


async def _statements(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT query, calls FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat%'"
        )
    finally:
        await conn.close()
    # Only msilo's own statements: not asyncpg's one-time type introspection of a new
    # connection (catalog queries).
    return {
        r["query"]: int(r["calls"])
        for r in rows
        if any(name in r["query"] for name in ("msilo", "location", "silo"))
    }


async def _reset(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


def _silo_queries(statements: dict[str, int]) -> dict[str, int]:
    return {q: n for q, n in statements.items() if '"silo"' in q or " silo " in q}


async def test_a_register_for_an_owner_with_nothing_stored_issues_no_silo_query(
    counted: str,
) -> None:
    srv: Running = await start_worker(counted, "msilo.add_date=false")
    try:
        alice = await srv.agent("alice", DOMAIN)
        assert (await alice.message(f"sip:carol@{DOMAIN}", "for carol")).status == 202
        bob = await srv.agent("bob", DOMAIN)
        carol = await srv.agent("carol", DOMAIN)
        await _reset(counted)
        for _ in range(3):  # the first REGISTER and two refreshes
            assert (await bob.register(600)).status == 200
        bob_statements = await _statements(counted)
        # One round trip per REGISTER (the register function), and none on the silo table.
        assert sum(bob_statements.values()) == 3, bob_statements
        assert _silo_queries(bob_statements) == {}, bob_statements

        # The same count sees the dump's claim when there is something to deliver.
        await _reset(counted)
        assert (await carol.register(600)).status == 200
        await carol.wait_requests(1)
        claims = _silo_queries(await _statements(counted))
        assert any("lease" in q for q in claims), claims
    finally:
        await stop_worker(srv)

"""Fixtures for fault injection: a private PostgreSQL cluster and workers that use it.

The shared PostgreSQL on 127.0.0.1:5432 is never stopped by these tests; each module
gets its own cluster (tests/faults/pgcluster.py), removed at the end whatever happens.
Without PostgreSQL server binaries the tests are skipped with the reason, unless
``MSILO_REQUIRE_PG=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

import asyncpg
import pytest
import uvloop

from tests.pgcluster import ClusterUnavailable, PgCluster
from tests.service.conftest import Running, start_worker, stop_worker


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test here runs on uvloop, like the server."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """A private cluster for this module: started, and always stopped and removed."""
    try:
        PgCluster.reap_orphans()
        cluster = PgCluster()
    except ClusterUnavailable as exc:
        reason = f"fault tests need a private PostgreSQL cluster: {exc}"
        if os.environ.get("MSILO_REQUIRE_PG") == "1":
            pytest.fail(f"{reason} (MSILO_REQUIRE_PG=1)")
        pytest.skip(reason)
    try:
        cluster.init()
        cluster.start_blocking()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def fault_db(pg_cluster: PgCluster) -> str:
    """A fresh database in the private cluster for one test; its DSN."""
    if not pg_cluster.running:
        # An earlier test failed half-way through an outage: bring the server back.
        await pg_cluster.start()
    name = f"msilo_fault_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_cluster.dsn(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg_cluster.dsn(name)


WorkerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def fault_worker(fault_db: str) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers on ``fault_db`` with ``--set`` style overrides; all are
    stopped at the end of the test, even when the database is down by then."""
    running: list[Running] = []

    async def start(*overrides: str) -> Running:
        run = await start_worker(fault_db, *overrides, tcp=False)
        running.append(run)
        return run

    yield start
    for run in running:
        await stop_worker(run)

"""Leader election on MariaDB: ``GET_LOCK`` on a dedicated connection.

The same guarantees as the PostgreSQL lock (tests/leader/test_election.py), on the session's
throwaway MariaDB server: one leader, handover on stop, a killed connection or process
replaced within seconds, the holder reported to any process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from msilo.leader import MySQLLeaderElection
from msilo.storage.mysql import MySQLStore
from tests.conftest import _run, mysql_execute
from tests.leader.test_election import HANDOVER, REPO, RETRY, first_leader, running, stays_true


async def _schema(url: str) -> None:
    store = MySQLStore(url)
    await store.open()
    try:
        await store.create_schema()
    finally:
        await store.close()


@pytest.fixture(scope="module")
def my_db(mysql_url: str) -> str:
    """The session's MariaDB database with msilo's schema (the ``msilo_leader`` note)."""
    _run(_schema(mysql_url))
    return mysql_url


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4().hex}"


def my_election(url: str, key: str, **timeouts: float) -> MySQLLeaderElection:
    return MySQLLeaderElection(url, lock_key=key, retry_interval=RETRY, **timeouts)


async def test_two_elections_on_one_key_have_exactly_one_leader(my_db: str, key: str) -> None:
    a, b = my_election(my_db, key), my_election(my_db, key)
    async with running(a) as rec_a, running(b) as rec_b:
        await first_leader(a, b)
        assert await stays_true(lambda: a.is_leader != b.is_leader, 5 * RETRY)
        assert rec_a.elected + rec_b.elected == 1


async def test_stopping_the_leader_hands_over(my_db: str, key: str) -> None:
    a, b = my_election(my_db, key), my_election(my_db, key)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        standby = b if leader is a else a
        rec_leader = rec_a if leader is a else rec_b
        await asyncio.sleep(2 * RETRY)
        await asyncio.wait_for(leader.stop(), 5)
        assert rec_leader.lost == 1
        await asyncio.wait_for(standby.wait_elected(), HANDOVER)


async def test_killed_connection_loses_leadership_and_standby_takes_over(
    my_db: str, key: str
) -> None:
    a, b = my_election(my_db, key), my_election(my_db, key)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        standby = b if leader is a else a
        rec_leader = rec_a if leader is a else rec_b
        holder = await leader.current_leader()
        assert holder is not None
        await asyncio.to_thread(mysql_execute, my_db, f"KILL {holder['conn_id']}")
        await asyncio.wait_for(rec_leader.lost_event.wait(), HANDOVER)
        await asyncio.wait_for(standby.wait_elected(), HANDOVER + 2 * RETRY)
        assert await stays_true(lambda: standby.is_leader != leader.is_leader, 4 * RETRY)


async def test_different_databases_do_not_share_the_lock(
    my_db: str, key: str, mysql_server: object
) -> None:
    from tests.conftest import drop_mysql_database, mysql_database

    other = await asyncio.to_thread(mysql_database, mysql_server)
    try:
        a, b = my_election(my_db, key), my_election(other, key)
        async with running(a), running(b):
            await asyncio.wait_for(a.wait_elected(), 5)
            await asyncio.wait_for(b.wait_elected(), 5)
    finally:
        await asyncio.to_thread(drop_mysql_database, other)


async def test_current_leader_reports_the_holder_to_any_process(my_db: str, key: str) -> None:
    a = my_election(my_db, key)
    observer = my_election(my_db, key)
    assert await observer.current_leader() is None
    async with running(a):
        await asyncio.wait_for(a.wait_elected(), 5)
        holder = await observer.current_leader()
        assert holder is not None
        assert (holder["host"], holder["pid"]) == (a.host, os.getpid())
    assert await observer.current_leader() is None


CHILD = """
import asyncio, sys
from msilo.leader import MySQLLeaderElection

async def main(url, key):
    election = MySQLLeaderElection(url, lock_key=key, retry_interval=0.2)
    async def elected():
        print("elected", flush=True)
    await election.run(elected)

asyncio.run(main(*sys.argv[1:]))
"""


@asynccontextmanager
async def child_leader(url: str, key: str) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, key, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"elected\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def test_killed_leader_process_is_replaced_within_seconds(my_db: str, key: str) -> None:
    standby = my_election(my_db, key)
    async with child_leader(my_db, key) as child, running(standby):
        holder = await standby.current_leader()
        assert holder is not None and holder["pid"] == child.pid
        assert not standby.is_leader
        child.kill()  # SIGKILL: the server ends its session, and the lock with it
        await asyncio.wait_for(standby.wait_elected(), 5)


async def test_unreachable_server_keeps_the_process_standby_and_logs_once(
    caplog: pytest.LogCaptureFixture, key: str
) -> None:
    e = my_election("mysql://root@127.0.0.1:1/none", key, connect_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="msilo.leader"):
        async with running(e):
            await asyncio.sleep(5 * RETRY)
            assert not e.is_leader
    lines = [r.getMessage() for r in caplog.records if r.name == "msilo.leader"]
    standby = [line for line in lines if line.startswith("event=standby")]
    assert len(standby) == 1 and "reason=unavailable" in standby[0], lines

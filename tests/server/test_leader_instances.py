"""Two ``msilo serve`` instances (two hosts, here two ports) on one PostgreSQL database.

Exactly one leader process in the deployment runs the timer cycles; a reminder
goes out once; when the leader's host dies (its supervisor and leader process
are killed) the other instance's leader takes over and expiry goes on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from msilo.cli import open_configured_store
from msilo.config import load_config
from msilo.storage.base import NewMessage
from tests.server.conftest import Instance, sql, wait_for
from tests.service.sipua import UserAgent

pytestmark = pytest.mark.pg

CYCLES = (
    "server.workers=1",
    "msilo.check_time=1",
    "msilo.clean_period=1",
    "msilo.send_time=1",
    'msilo.reminder="sip:reminder@127.0.0.1"',
)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_leader(instance: Instance) -> bool:
    process = instance.leader_process()
    return bool(process and process.get("is_leader"))


async def _store(db_url: str, *messages: NewMessage) -> None:
    store = open_configured_store(load_config(overrides=[f'msilo.db_url="{db_url}"']))
    await store.open()
    try:
        await store.store_batch(list(messages), 0)
    finally:
        await store.close()


async def test_one_leader_one_reminder_and_the_standby_takes_over(serve, pg_url: str) -> None:
    a: Instance = serve(pg_url, *CYCLES, name="a")
    b: Instance = serve(pg_url, *CYCLES, name="b")
    await a.wait_ready(1)
    await b.wait_ready(1)

    leaders = await wait_for(
        lambda: [i for i in (a, b) if _is_leader(i)], lambda found: len(found) == 1, 10, "a leader"
    )
    [leader] = leaders
    other = b if leader is a else a
    leader_pid = leader.leader_process()["pid"]  # type: ignore[index]

    def holder(i: Instance) -> Any:
        return ((i.health() or {}).get("leader") or {}).get("holder")

    for instance in (a, b):  # both see the same holder in the database
        await wait_for(
            lambda i=instance: holder(i), lambda h: h and h["pid"] == leader_pid, 8, "holder"
        )
    await asyncio.sleep(2.5)  # a standby polls every 2 s: still one leader
    assert [i for i in (a, b) if _is_leader(i)] == [leader]

    # A due reminder for bob is sent once, by the one leader, to the contact he registered.
    bob = await UserAgent(other.address, user="bob", domain="127.0.0.1").start()
    try:
        assert (await bob.register(600, headers=["Allow: MESSAGE"])).status == 200
        now = int(time.time())
        await _store(
            pg_url,
            NewMessage("bob", "127.0.0.1", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1",
                       b"meeting", "text/plain", now, now + 3600, snd_time=now - 1),
        )  # fmt: skip
        [got] = await bob.wait_requests(1, timeout=8)
        assert got.request.body.startswith(b"[Reminder message - ")
        await asyncio.sleep(2.5)
        assert len(bob.received) == 1
    finally:
        bob.close()
    assert sum(i.get("/stats")["dumped_reminders"] for i in (a, b)) == 1
    assert leader.get("/stats")["dumped_reminders"] == 1

    # The leader's host goes away: its supervisor and its leader process die at once.
    orphans = list(leader.worker_pids().values())
    os.kill(leader.pid, signal.SIGKILL)
    os.kill(leader_pid, signal.SIGKILL)
    await wait_for(
        lambda: [p for p in orphans if _alive(p)], lambda alive: not alive, 8, "orphans exit"
    )
    await wait_for(lambda: _is_leader(other), bool, 12, "the standby takes over", other)

    now = int(time.time())
    await _store(
        pg_url,
        NewMessage("carol", "127.0.0.1", "sip:alice@127.0.0.1", "sip:carol@127.0.0.1",
                   b"too late", "text/plain", now - 100, now - 1),
    )  # fmt: skip
    query = "SELECT count(*) FROM silo WHERE username = 'carol'"
    await _wait_count(pg_url, query, other)
    assert other.get("/stats")["expired_messages"] >= 1


async def _wait_count(db_url: str, query: str, instance: Instance) -> None:
    deadline = time.monotonic() + 8
    count = None
    while time.monotonic() < deadline:
        count = await sql(db_url, query)
        if count == 0:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"expired row still there ({count})\n{instance.log()[-3000:]}")

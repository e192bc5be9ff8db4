"""Leader election: exactly one leader, fast handover, loss noticed at once.

Real PostgreSQL (``pg_dsn``), real lock files, real processes killed with SIGKILL; no mocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from msilo.errors import ConfigError, DatabaseUnavailable
from msilo.leader import (
    FileLeaderElection,
    LeaderElection,
    MySQLLeaderElection,
    PostgresLeaderElection,
    advisory_lock_key,
    leader_election_for,
)

RETRY = 0.2
# Handover must happen within one poll of the standby; the slack covers a slow CI machine.
HANDOVER = RETRY + 1.5
REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """Callbacks that count terms, as the timer cycles would start and stop."""

    def __init__(self) -> None:
        self.elected = 0
        self.lost = 0
        self.lost_event = asyncio.Event()

    async def on_elected(self) -> None:
        self.elected += 1

    async def on_lost(self) -> None:
        self.lost += 1
        self.lost_event.set()


@asynccontextmanager
async def running(election: LeaderElection) -> AsyncIterator[Recorder]:
    """Run ``election`` in a task; stop it (bounded) and check the task ended cleanly."""
    rec = Recorder()
    task = asyncio.create_task(election.run(rec.on_elected, rec.on_lost))
    try:
        yield rec
    finally:
        await asyncio.wait_for(election.stop(), 10)
        await asyncio.wait_for(task, 10)


async def first_leader(*elections: LeaderElection, timeout: float = 5.0) -> LeaderElection:
    waiters = {asyncio.ensure_future(e.wait_elected()): e for e in elections}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    assert done, "nobody was elected"
    return waiters[next(iter(done))]


async def stays_true(check: Callable[[], bool], seconds: float) -> bool:
    """``check()`` holds at every sample over ``seconds`` (several standby polls)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check():
            return False
        await asyncio.sleep(RETRY / 4)
    return check()


def pg_election(dsn: str, key: str, **timeouts: float) -> PostgresLeaderElection:
    return PostgresLeaderElection(dsn, lock_key=key, retry_interval=RETRY, **timeouts)


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4().hex}"


# -- a leader in another process ----------------------------------------------------------------

CHILD = """
import asyncio, sys
from msilo.leader import FileLeaderElection, PostgresLeaderElection

async def main(kind, target, key):
    if kind == "pg":
        election = PostgresLeaderElection(target, lock_key=key, retry_interval=0.2)
    else:
        election = FileLeaderElection(target, retry_interval=0.2)
    async def elected():
        print("elected", flush=True)
    await election.run(elected)

asyncio.run(main(*sys.argv[1:]))
"""


@asynccontextmanager
async def child_leader(
    kind: str, target: str, key: str = ""
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A separate Python process that becomes leader; yielded once it says so."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, kind, target, key, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line == b"elected\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.mark.pg
async def test_two_elections_on_one_key_have_exactly_one_leader(pg_dsn: str, key: str) -> None:
    a, b = pg_election(pg_dsn, key), pg_election(pg_dsn, key)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        assert await stays_true(lambda: a.is_leader != b.is_leader, 5 * RETRY)
        assert leader.is_leader
        assert rec_a.elected + rec_b.elected == 1


@pytest.mark.pg
async def test_stopping_the_leader_hands_over_within_one_retry_interval(
    pg_dsn: str, key: str
) -> None:
    a, b = pg_election(pg_dsn, key), pg_election(pg_dsn, key)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        standby = b if leader is a else a
        rec_leader = rec_a if leader is a else rec_b
        await asyncio.sleep(2 * RETRY)  # the standby is polling now
        started = time.monotonic()
        await asyncio.wait_for(leader.stop(), 5)
        assert not leader.is_leader
        assert rec_leader.lost == 1  # the work stopped before the lock was released
        await asyncio.wait_for(standby.wait_elected(), HANDOVER)
        assert time.monotonic() - started < HANDOVER


@pytest.mark.pg
async def test_terminated_backend_loses_leadership_and_standby_takes_over(
    pg_dsn: str, key: str
) -> None:
    a, b = pg_election(pg_dsn, key), pg_election(pg_dsn, key)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        standby = b if leader is a else a
        rec_leader = rec_a if leader is a else rec_b
        term_lost = leader.lost
        admin = await asyncpg.connect(pg_dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'msilo-leader %' AND datname = current_database()"
            )
        finally:
            await admin.close()
        assert killed == 1
        # The termination listener reports it: no waiting for the next liveness check.
        await asyncio.wait_for(term_lost.wait(), 1.0)
        assert not leader.is_leader
        await asyncio.wait_for(rec_leader.lost_event.wait(), 1.0)
        await asyncio.wait_for(standby.wait_elected(), HANDOVER)
        assert await stays_true(lambda: standby.is_leader and not leader.is_leader, 4 * RETRY)


@pytest.mark.pg
async def test_old_leader_rejoins_as_standby_after_losing(pg_dsn: str, key: str) -> None:
    a = pg_election(pg_dsn, key)
    async with running(a) as rec:
        await asyncio.wait_for(a.wait_elected(), 5)
        backend = (await a.current_leader() or {})["backend_pid"]
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", backend)
        finally:
            await admin.close()
        await asyncio.wait_for(rec.lost_event.wait(), 1.0)
        # Alone, it reconnects and wins again on a fresh connection.
        await asyncio.wait_for(a.wait_elected(), 5)
        assert rec.elected == 2
        assert (await a.current_leader() or {})["backend_pid"] != backend


@pytest.mark.pg
async def test_different_keys_have_independent_leaders(pg_dsn: str, key: str) -> None:
    a, b = pg_election(pg_dsn, key + "-a"), pg_election(pg_dsn, key + "-b")
    async with running(a), running(b):
        await asyncio.wait_for(a.wait_elected(), 5)
        await asyncio.wait_for(b.wait_elected(), 5)
        assert a.is_leader and b.is_leader


@pytest.mark.pg
async def test_current_leader_reports_the_holder_to_any_process(pg_dsn: str, key: str) -> None:
    a = pg_election(pg_dsn, key)
    observer = pg_election(pg_dsn, key)  # never runs: like the supervisor's /health
    assert await observer.current_leader() is None
    async with running(a):
        await asyncio.wait_for(a.wait_elected(), 5)
        holder = await observer.current_leader()
        assert holder is not None
        assert (holder["host"], holder["pid"]) == (a.host, os.getpid())
        assert isinstance(holder["backend_pid"], int)
        assert a.holder_info()["is_leader"] is True
        assert a.holder_info()["since"] is not None
    assert await observer.current_leader() is None
    assert a.holder_info()["is_leader"] is False


@pytest.mark.pg
async def test_killed_leader_process_is_replaced_within_seconds(pg_dsn: str, key: str) -> None:
    standby = pg_election(pg_dsn, key)
    async with child_leader("pg", pg_dsn, key) as child, running(standby):
        holder = await standby.current_leader()
        assert holder is not None and holder["pid"] == child.pid
        await asyncio.sleep(3 * RETRY)
        assert not standby.is_leader
        started = time.monotonic()
        child.send_signal(signal.SIGKILL)
        # The kernel closes the dead process's socket; the backend sees EOF and exits.
        await asyncio.wait_for(standby.wait_elected(), 5)
        assert time.monotonic() - started < 5
        holder = await standby.current_leader()
        assert holder is not None and holder["pid"] == os.getpid()


class StallingProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding while keeping both sockets open.

    That is what a half-open connection looks like to the client: no error, no EOF,
    just silence.  Only the liveness check can notice it.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.pumps: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        self.pumps += [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.pumps:
            task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()


@pytest.mark.pg
async def test_silent_connection_is_caught_by_the_liveness_check(
    pg_dsn: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(pg_dsn)
    if parts.hostname is None or parts.hostname.startswith("/") or parts.port is None:
        pytest.skip("the test database is not reached over TCP")
    proxy = StallingProxy(parts.hostname, parts.port)
    port = await proxy.start()
    userinfo = parts.netloc.rpartition("@")[0]
    proxied = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))
    e = pg_election(proxied, key, check_timeout=0.5, connect_timeout=5.0)
    try:
        with caplog.at_level(logging.INFO, logger="msilo.leader"):
            async with running(e) as rec:
                await asyncio.wait_for(e.wait_elected(), 5)
                proxy.flowing.clear()  # the network goes silent; nobody sees an error
                # Noticed within one check interval plus the check's timeout.
                await asyncio.wait_for(rec.lost_event.wait(), RETRY + 0.5 + 1.0)
                assert not e.is_leader
                # Rejoining now hangs in connect (5 s); stop() must not wait for it.
                await asyncio.sleep(e.rejoin_delay + RETRY)
                stopping = time.monotonic()
                await asyncio.wait_for(e.stop(), 1.0)
                assert time.monotonic() - stopping < 1.0
        lines = [r.getMessage() for r in caplog.records if r.name == "msilo.leader"]
        assert any(line.startswith("event=leader_lost reason=liveness_timeout") for line in lines)
    finally:
        await proxy.close()


@pytest.mark.pg
async def test_unreachable_database_keeps_the_process_standby_and_logs_once(
    caplog: pytest.LogCaptureFixture, key: str
) -> None:
    # Port 1 on loopback refuses at once: the database is "down".
    e = pg_election("postgres://postgres@127.0.0.1:1/none", key, connect_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="msilo.leader"):
        async with running(e):
            await asyncio.sleep(5 * RETRY)
            assert not e.is_leader
    lines = [r.getMessage() for r in caplog.records if r.name == "msilo.leader"]
    standby = [line for line in lines if line.startswith("event=standby")]
    assert len(standby) == 1, lines
    assert "reason=unavailable" in standby[0]
    assert lines[-1].startswith("event=stopped")


@pytest.mark.pg
async def test_no_host_that_is_the_primary_keeps_the_process_standby(
    pg_dsn: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a failover every host of a multi-host db_url may be up but none read-write
    (the old primary gone, the standby not promoted yet): asyncpg then says
    TargetServerAttributeNotMatched.  The election waits as a standby, it does not crash;
    here that state is made real by asking for a standby of a server that is a primary."""
    parts = urlsplit(pg_dsn)
    host = f"{parts.hostname}:{parts.port or 5432}"
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@{host},{host}", query=""))
    e = pg_election(f"{url}?target_session_attrs=standby", key)
    with caplog.at_level(logging.INFO, logger="msilo.leader"):
        async with running(e):
            await asyncio.sleep(5 * RETRY)
            assert not e.is_leader
    lines = [r.getMessage() for r in caplog.records if r.name == "msilo.leader"]
    assert any("reason=unavailable error=TargetServerAttributeNotMatched" in x for x in lines)
    with pytest.raises(DatabaseUnavailable):
        await e.current_leader()


@pytest.mark.pg
async def test_state_changes_are_logged_once_each_not_per_retry(
    pg_dsn: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pg_election(pg_dsn, key), pg_election(pg_dsn, key)
    with caplog.at_level(logging.INFO, logger="msilo.leader"):
        async with running(a), running(b):
            leader = await first_leader(a, b)
            await asyncio.sleep(6 * RETRY)  # several standby polls
            await leader.stop()
            standby = b if leader is a else a
            await asyncio.wait_for(standby.wait_elected(), HANDOVER)
    events = [r.getMessage().split()[0] for r in caplog.records if r.name == "msilo.leader"]
    assert events.count("event=leader_elected") == 2
    assert events.count("event=standby") == 1
    assert events.count("event=leader_lost") == 2  # each leader, when stopped
    assert all("host=" in r.getMessage() and "key=" in r.getMessage() for r in caplog.records)


def test_lock_key_is_stable_and_64_bit() -> None:
    # Fixed value: every process on every host must derive the same key from a name.
    assert advisory_lock_key("msilo") == advisory_lock_key("msilo")
    assert advisory_lock_key("msilo") != advisory_lock_key("silo")
    assert -(2**63) <= advisory_lock_key("msilo") < 2**63
    assert PostgresLeaderElection("postgres://x/y", lock_key=7).lock_key == 7
    with pytest.raises(ValueError):
        PostgresLeaderElection("postgres://x/y", lock_key=2**63)


# -- lock file ----------------------------------------------------------------------------------


def file_election(path: Path) -> FileLeaderElection:
    return FileLeaderElection(path, retry_interval=RETRY)


async def test_file_lock_has_exactly_one_leader_and_hands_over_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "msilo.db.leader"
    a, b = file_election(path), file_election(path)
    async with running(a) as rec_a, running(b) as rec_b:
        leader = await first_leader(a, b)
        standby = b if leader is a else a
        assert await stays_true(lambda: a.is_leader != b.is_leader, 5 * RETRY)
        started = time.monotonic()
        await asyncio.wait_for(leader.stop(), 5)
        assert rec_a.lost + rec_b.lost == 1
        await asyncio.wait_for(standby.wait_elected(), HANDOVER)
        assert time.monotonic() - started < HANDOVER


async def test_file_lock_current_leader_reports_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "msilo.db.leader"
    a, observer = file_election(path), file_election(path)
    assert await observer.current_leader() is None  # no file yet
    async with running(a):
        await asyncio.wait_for(a.wait_elected(), 5)
        holder = await observer.current_leader()
        assert holder is not None
        assert (holder["host"], holder["pid"]) == (a.host, os.getpid())
        assert holder["since"] is not None
    assert await observer.current_leader() is None  # file left behind, but unlocked


async def test_killed_file_lock_holder_is_replaced_within_seconds(tmp_path: Path) -> None:
    path = tmp_path / "msilo.db.leader"
    standby = file_election(path)
    async with child_leader("file", str(path)) as child, running(standby):
        holder = await standby.current_leader()
        assert holder is not None and holder["pid"] == child.pid
        await asyncio.sleep(3 * RETRY)
        assert not standby.is_leader
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(standby.wait_elected(), 5)


async def test_replacing_the_lock_file_costs_the_leader_its_term(tmp_path: Path) -> None:
    path = tmp_path / "msilo.db.leader"
    a = file_election(path)
    async with running(a) as rec:
        await asyncio.wait_for(a.wait_elected(), 5)
        path.unlink()  # a newcomer could now lock a fresh file: two leaders unless we step down
        await asyncio.wait_for(rec.lost_event.wait(), 5 * RETRY)
        assert not a.is_leader
        await asyncio.wait_for(a.wait_elected(), 5)  # and wins the new file
        assert rec.elected == 2


async def test_unwritable_lock_directory_keeps_the_process_standby(tmp_path: Path) -> None:
    e = file_election(tmp_path / "missing-dir" / "msilo.db.leader")
    async with running(e):
        await asyncio.sleep(3 * RETRY)
        assert not e.is_leader


# -- choice by URL ------------------------------------------------------------------------------


def test_election_is_chosen_by_database_url(tmp_path: Path) -> None:
    e = leader_election_for(f"sqlite:///{tmp_path}/msilo.db", lock_key="ignored", retry_interval=1)
    assert isinstance(e, FileLeaderElection)
    assert e.path == f"{tmp_path}/msilo.db.leader"
    assert e.retry_interval == 1
    relative = leader_election_for("sqlite:///msilo.db")
    assert isinstance(relative, FileLeaderElection) and relative.path == "msilo.db.leader"
    for url in ("postgres://u@h/db", "postgresql://u@h:5433/db"):
        pg = leader_election_for(url, lock_key="silo")
        assert isinstance(pg, PostgresLeaderElection)
        assert pg.lock_key == advisory_lock_key("silo")
    my = leader_election_for("mysql://u@h/db", lock_key="silo")
    assert isinstance(my, MySQLLeaderElection)
    assert my.lock_name != leader_election_for("mysql://u@h/other", lock_key="silo").lock_name
    assert len(my.lock_name) <= 64
    with pytest.raises(ConfigError):
        leader_election_for("mariadb://u@h/db")

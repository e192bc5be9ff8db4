"""Fixtures that run a real msilo worker on 127.0.0.1 against a real database."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from msilo.cli import open_configured_store
from msilo.config import Config, load_config
from msilo.server.worker import Worker
from msilo.storage.base import Store
from msilo.transaction.clock import TimerValues
from tests.conftest import drop_mysql_database, mysql_database, mysql_script
from tests.service.sipua import UserAgent, free_port

BACKENDS = ["sqlite", "postgres", "mysql"]


class Running:
    """A started worker, its store and its address."""

    def __init__(self, worker: Worker, store: Store, config: Config, port: int) -> None:
        self.worker = worker
        self.store = store
        self.config = config
        self.port = port
        self.address = ("127.0.0.1", port)
        self.agents: list[UserAgent] = []

    def stats(self) -> dict[str, int]:
        return self.worker.stats.total()

    async def agent(self, user: str, domain: str = "127.0.0.1", **kwargs: object) -> UserAgent:
        ua = await UserAgent(self.address, user=user, domain=domain, **kwargs).start()  # type: ignore[arg-type]
        self.agents.append(ua)
        return ua


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database per test: an SQLite file, a PostgreSQL schema, or a MariaDB database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/msilo.db"
        return
    if request.param == "mysql":
        url = await asyncio.to_thread(mysql_database, request.getfixturevalue("mysql_server"))
        yield url
        await asyncio.to_thread(drop_mysql_database, url)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    # asyncpg passes unknown DSN query parameters on as server settings.
    yield f"{dsn}?search_path={schema}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


ServerFactory = Callable[..., Awaitable[Running]]


async def start_worker(db_url: str, *overrides: str, tcp: bool = True) -> Running:
    """A worker in this process on a free port, with ``--set`` style overrides."""
    port = free_port()
    listen = f'"udp:127.0.0.1:{port}","tcp:127.0.0.1:{port}"' if tcp else f'"udp:127.0.0.1:{port}"'
    config = load_config(
        overrides=[
            f"server.listen=[{listen}]",
            'server.http=""',
            f'msilo.db_url="{db_url}"',
            # Tests send bursts (200 guesses, 1,500 MESSAGEs) on shared, loaded machines:
            # only the overload tests, which set their own, may shed with 503.
            "limits.max_queue_delay=30",
            *overrides,
        ]
    )
    store = open_configured_store(config)
    await store.open()
    await store.create_schema()
    # Short RFC 3261 timers (T1 = 50 ms: Timer F = 3.2 s) keep timeout tests quick.
    worker = Worker(config, store, timers=TimerValues(t1=0.05, t2=0.4, t4=0.5))
    try:
        await worker.start()
    except BaseException:
        await worker.stop(grace=0)
        await store.close()
        raise
    return Running(worker, store, config, port)


async def stop_worker(run: Running, timeout: float = 20) -> None:
    """Stop a worker started by :func:`start_worker` (bounded, even with the database down)."""
    for ua in run.agents:
        ua.close()
    await asyncio.wait_for(run.worker.stop(grace=2), timeout)
    await asyncio.wait_for(run.store.close(), timeout)


@pytest.fixture
async def server(db_url: str) -> AsyncIterator[ServerFactory]:
    """Start a worker with ``--set`` style overrides; stopped at the end of the test."""
    running: list[Running] = []

    async def start(*overrides: str) -> Running:
        run = await start_worker(db_url, *overrides)
        running.append(run)
        return run

    yield start
    for run in running:
        await stop_worker(run)


async def rename_table(srv: Running, table: str, *, broken: bool) -> None:
    """Rename ``table`` behind the server's back (every statement on it fails), or back."""
    url = srv.config.msilo.db_url
    old, new = (table, f"broken_{table}") if broken else (f"broken_{table}", table)
    sql = f"ALTER TABLE {old} RENAME TO {new}"
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as db:
            db.execute(sql)
        return
    if url.startswith("mysql://"):
        await mysql_script(url, sql)
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()

"""``msilo db upgrade`` refuses to run under a serving msilo (its leader holds the deployment
lock) and shows progress on a terminal only."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.server.conftest import ROOT, Instance, wait_for


def _upgrade(db_url: str, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msilo", "db", "upgrade", "--set", f'msilo.db_url="{db_url}"'],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An SQLite file, or a fresh schema in the test session's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    schema = f"u_{uuid.uuid4().hex[:12]}"
    _pg(dsn, f"CREATE SCHEMA {schema}")
    yield f"{dsn}?search_path={schema}"
    _pg(dsn, f"DROP SCHEMA {schema} CASCADE")


def _pg(dsn: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


async def test_db_upgrade_refuses_while_a_leader_serves_then_runs(
    serve: Callable[..., Instance], tmp_path: Path, any_db: str
) -> None:
    db_url = any_db
    srv = serve(db_url, "server.workers=1")
    await srv.wait_ready(1)
    holder = await wait_for(
        lambda: (srv.health() or {}).get("leader", {}).get("holder"), bool, 20, "a leader", srv
    )
    out = _upgrade(db_url, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr == (
        "msilo: error: database: db upgrade: msilo is serving this database (the leader lock "
        f"is held by host {holder['host']} pid {holder['pid']}); stop every msilo serve that "
        "uses it, then run db upgrade again\n"
    )
    srv.signal(15)
    assert srv.wait_exit(30) == 0
    out = _upgrade(db_url, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("schema up to date (0 change(s))\n")
    assert out.stderr == ""  # not a terminal: no progress line


def test_db_upgrade_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/m.db"
    init = subprocess.run(
        [sys.executable, "-m", "msilo", "db", "init", "--set", f'msilo.db_url="{db_url}"'],
        cwd=tmp_path, capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert init.returncode == 0
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "msilo", "db", "upgrade", "--set", f'msilo.db_url="{db_url}"'],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=secondary,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        while True:
            ready, _, _ = select.select([primary], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=30)
    finally:
        os.close(primary)
    assert proc.returncode == 0
    assert b"db upgrade" in seen, seen  # the progress line, on the terminal
    assert b"schema up to date" in stdout and b"db upgrade:" not in stdout

"""Fixtures that run the real ``msilo serve`` (supervisor, workers, leader) as processes.

Each instance runs in its own session (process group), so teardown can SIGKILL
the supervisor and every child it spawned even when a test failed half-way.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.service.sipua import free_port

ROOT = Path(__file__).resolve().parents[2]


def free_tcp_port() -> int:
    return free_port()


class Instance:
    """One ``msilo serve`` process tree, its SIP port and its management HTTP port."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        db_url: str,
        overrides: tuple[str, ...],
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.http_port = free_tcp_port()
        self.db_url = db_url
        self.address = ("127.0.0.1", self.port)
        self.log_path = tmp_path / f"{name}.log"
        self.argv = [
            sys.executable, "-m", "msilo", "serve",
            "--set", f'server.listen=["udp:127.0.0.1:{self.port}","tcp:127.0.0.1:{self.port}"]',
            "--set", f'server.http="127.0.0.1:{self.http_port}"',
            "--set", f'msilo.db_url="{db_url}"',
            *(arg for item in overrides for arg in ("--set", item)),
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        log_file = os.fstat(self._log.fileno())
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            **{
                k: v.format(log=f"{log_file.st_dev}:{log_file.st_ino}")
                for k, v in (env or {}).items()
            },
        }
        self.proc = subprocess.Popen(
            self.argv,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> dict[str, Any]:
        """GET a management endpoint as JSON (503 bodies too)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return orjson.loads(response.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            return orjson.loads(exc.read())  # type: ignore[no-any-return]

    def text(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.read().decode()

    def health(self) -> dict[str, Any] | None:
        try:
            return self.get("/health")
        except (OSError, ValueError):
            return None

    def worker_pids(self) -> dict[int, int]:
        """index -> pid of the ready workers."""
        health = self.health() or {}
        return {w["index"]: w["pid"] for w in health.get("workers", []) if w["state"] == "ready"}

    def leader_process(self) -> dict[str, Any] | None:
        health = self.health() or {}
        process: dict[str, Any] | None = health.get("leader", {}).get("process")
        return process

    async def wait_ready(self, workers: int, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until ``workers`` workers and the leader process are ready."""

        def ready(h: dict[str, Any] | None) -> bool:
            if not h or h.get("status") != "ok":
                return False
            live = [w for w in h["workers"] if w["state"] == "ready"]
            leader = h["leader"]["process"]
            return len(live) == workers and leader is not None and leader["state"] == "ready"

        return await wait_for(self.health, ready, timeout, f"{self.name} ready", self)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the whole process group (supervisor and children) and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


async def wait_for(
    probe: Callable[[], Any],
    check: Callable[[Any], bool],
    timeout: float,
    what: str,
    instance: Instance | None = None,
    interval: float = 0.2,
) -> Any:
    """Poll ``probe()`` until ``check`` accepts its value; fail with the last value (and log)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = probe()
        if check(value):
            return value
        await asyncio.sleep(interval)
    tail = instance.log()[-4000:] if instance is not None else ""
    raise AssertionError(f"timed out waiting for {what}; last: {value!r}\n{tail}")


Start = Callable[..., Awaitable[Instance]]


@pytest.fixture
async def pg_url(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL schema for this test (as tests/service does)."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    yield f"{pg_dsn}?search_path={schema}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    """Start ``msilo serve`` instances; every one is killed (process group) at teardown."""
    started: list[Instance] = []

    def start(
        db_url: str, *overrides: str, name: str | None = None, env: dict[str, str] | None = None
    ) -> Instance:
        """``env``: extra environment; ``{log}`` in a value is the log file's dev:inode."""
        instance = Instance(tmp_path, name or f"msilo{len(started)}", db_url, overrides, env)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.kill_all()


async def silo_rows(db_url: str) -> list[bytes]:
    """Every stored body (as bytes) in the test's schema."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT body FROM silo")
    finally:
        await conn.close()
    return [bytes(r["body"]) for r in rows]


async def sql(db_url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()

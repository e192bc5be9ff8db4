"""``msilo db upgrade`` refuses to run under a serving msilo (its leader holds the deployment
lock) and shows progress on a terminal only."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.conftest import pg_execute
from tests.server.conftest import ROOT, Instance, wait_for


def _upgrade(db_url: str, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msilo", "db", "upgrade", "--set", f'msilo.db_url="{db_url}"'],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


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


def _on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal: (status, what the terminal got, stdout)."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=secondary,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        while True:
            ready, _, _ = select.select([primary], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(primary)
    return proc.returncode, seen, stdout


OPENSIPS_SILO = """
CREATE TABLE version (table_name VARCHAR(32) NOT NULL UNIQUE, table_version INTEGER NOT NULL);
INSERT INTO version VALUES ('silo', 6);
CREATE TABLE silo (
    id SERIAL PRIMARY KEY NOT NULL,
    src_addr VARCHAR(255) DEFAULT '' NOT NULL, dst_addr VARCHAR(255) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL, domain VARCHAR(64) DEFAULT '' NOT NULL,
    inc_time INTEGER DEFAULT 0 NOT NULL, exp_time INTEGER DEFAULT 0 NOT NULL,
    snd_time INTEGER DEFAULT 0 NOT NULL, ctype VARCHAR(255) DEFAULT NULL, body BYTEA
);
CREATE INDEX silo_account_idx ON silo (username, domain);
INSERT INTO silo (src_addr, dst_addr, username, domain, inc_time, exp_time, ctype, body)
SELECT 'sip:bob@example.org', 'sip:u' || n || '@example.com', 'u' || (n % 5000),
       'example.com', 1700000000 + n, 1900000000 + n, 'text/plain', 'message body'::bytea
FROM generate_series(1, 400000) AS n;
"""


def test_db_upgrade_of_a_large_postgresql_table_names_each_step_on_a_terminal(
    tmp_path: Path, pg_dsn: str
) -> None:
    schema = f"big_{uuid.uuid4().hex[:10]}"
    pg_execute(pg_dsn, f"CREATE SCHEMA {schema}; SET search_path = {schema}; {OPENSIPS_SILO}")
    db_url = f"{pg_dsn}?search_path={schema}"
    try:
        status, terminal, stdout = _on_a_terminal(
            [sys.executable, "-m", "msilo", "db", "upgrade", "--set", f'msilo.db_url="{db_url}"',
             "--set", 'msilo.sc_mid="id"'],
            tmp_path,
        )  # fmt: skip
    finally:
        pg_execute(pg_dsn, f"DROP SCHEMA {schema} CASCADE")
    assert status == 0, terminal.decode(errors="replace")
    shown = terminal.decode(errors="replace")
    # The statement running at the time: the table rewrite or an index build.
    assert re.search(r"db upgrade: . \d+ s (ALTER TABLE|CREATE (UNIQUE )?INDEX)", shown), shown
    assert "db upgrade: done in " in shown
    assert b"widened silo.inc_time to BIGINT" in stdout and b"db upgrade" not in stdout


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

"""The README's MySQL/MariaDB steps run as printed, on a MariaDB with grant tables: a user
and a database for msilo, then an OpenSIPS ``silo`` table moved over with mysqldump and
upgraded by ``msilo db upgrade`` with every row."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mariadbserver import OPENSIPS_MYSQL, MariaDBServer, ServerUnavailable

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(after: str) -> str:
    start = README.index(after)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"README lost the sh block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDBServer]:
    try:
        srv = MariaDBServer(grants=True)
    except ServerUnavailable as exc:
        if os.environ.get("MSILO_REQUIRE_PG") == "1":
            pytest.fail(f"{exc} (MSILO_REQUIRE_PG=1)")
        pytest.skip(str(exc))
    try:
        srv.init()
        srv.start()
        yield srv
    finally:
        srv.destroy()


def _sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bindir = cwd / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "msilo").write_text(f'#!/bin/sh\nexec {sys.executable} -P -m msilo "$@"\n')
    (bindir / "msilo").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["sh", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _on(server: MariaDBServer, script: str) -> str:
    """The script pointed at the test's server (its socket and port)."""
    return (
        script.replace("-u root", f"-u root --socket={server.socket}")
        .replace("127.0.0.1:3306", f"127.0.0.1:{server.port}")
        .replace("mysql://msilo:secret@db/", f"mysql://msilo:secret@127.0.0.1:{server.port}/")
    )


def test_readme_mysql_setup_runs_as_printed(server: MariaDBServer, tmp_path: Path) -> None:
    script = _block("## Using MySQL or MariaDB")
    run = _sh(_on(server, script), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "schema ready (mysql://msilo:***@127.0.0.1:" in run.stdout


def test_readme_opensips_mysql_migration_runs_as_printed(
    server: MariaDBServer, tmp_path: Path
) -> None:
    """OpenSIPS's table in its own database, then the README's steps from the backup on."""
    root = f"mariadb -u root --socket={server.socket}"
    setup = (
        f"{root} -e \"DROP DATABASE IF EXISTS msilo; DROP USER IF EXISTS msilo@'%'; "
        'CREATE DATABASE opensips"\n'
        f"{root} opensips <<'EOF'\n"
        + OPENSIPS_MYSQL.format(t="silo", now=1_800_000_000, exp=2_100_000_000)
        + "EOF\n"
    )
    prepared = _sh(setup, tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    (tmp_path / "msilo.toml").write_text(
        f'[msilo]\ndb_url = "mysql://msilo:secret@127.0.0.1:{server.port}/msilo"\nsc_mid = "id"\n'
    )
    steps = _block("**MySQL/MariaDB** (OpenSIPS's default)")
    run = _sh(_on(server, steps), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "widened silo.body to MEDIUMBLOB (16 MiB)" in run.stdout
    assert (tmp_path / "silo-before-msilo.sql").stat().st_size > 0
    count = _sh("msilo -c msilo.toml messages count --aor alice@example.com", tmp_path)
    assert count.returncode == 0, count.stderr
    assert count.stdout.strip() == "2"
    listed = _sh("msilo -c msilo.toml messages list --aor alice@example.com --json", tmp_path)
    assert '"body":"old one"' in listed.stdout

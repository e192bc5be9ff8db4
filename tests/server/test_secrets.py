"""Secrets are never printed (issue 14, item 7): a database password or ``auth.secret`` does
not appear in ``check-config``, ``db init``, config error messages, logs, /health or /stats.

PostgreSQL on 127.0.0.1 uses trust authentication, so a URL with a password still connects:
the tests use real passwords in real URLs against the real server.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from msilo.log import redact_text, redact_url, setup_logging
from tests.server.conftest import ROOT, Instance, wait_for
from tests.service.sipua import UserAgent

PASSWORD = "hunter2-" + uuid.uuid4().hex[:6]
SECRET = "nonce-key-" + uuid.uuid4().hex[:8]


def _with_password(dsn: str) -> str:
    """``dsn`` with ``PASSWORD`` in its user info (trust auth ignores it)."""
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{PASSWORD}@{host}"


def msilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msilo", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgres://postgres:pw@db:5432/msilo", "postgres://postgres:***@db:5432/msilo"),
        (
            "postgres://u:p@ss/w?rd@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgres://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write",
        ),
        (
            "postgres://u@h/db?sslmode=require&password=pw",
            "postgres://u@h/db?sslmode=require&password=***",
        ),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("sqlite:///var/lib/msilo.db", "sqlite:///var/lib/msilo.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_finds_urls_and_named_secrets_in_any_text() -> None:
    text = "bad (got 'mysql://opensips:opensipsrw@db/x') key=s3cr3t"
    assert redact_text(text, ["s3cr3t"]) == "bad (got 'mysql://opensips:***@db/x') key=***"


def test_check_config_and_config_errors_never_echo_a_password(tmp_path: Path) -> None:
    url = f"postgres://msilo:{PASSWORD}@db.example.com:5432/msilo"
    ok = msilo(
        "check-config", "--set", f'msilo.db_url="{url}"', "--set", f'auth.secret="{SECRET}"',
        cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "msilo.db_url = 'postgres://msilo:***@db.example.com:5432/msilo'" in ok.stdout
    assert "auth.secret = '***'" in ok.stdout
    mysql = msilo(
        "check-config", "--set", f'msilo.db_url="mysql://o:{PASSWORD}@h/db"', cwd=tmp_path
    )
    assert mysql.returncode == 0, mysql.stderr
    assert "msilo.db_url = 'mysql://o:***@h/db'" in mysql.stdout
    bad_scheme = msilo(
        "check-config", "--set", f'msilo.db_url="mariadb://o:{PASSWORD}@h/db"', cwd=tmp_path
    )
    not_a_pair = msilo("check-config", "--set", f"msilo.db_url {url}", cwd=tmp_path)
    not_text = msilo("check-config", "--set", "auth.secret=123456789", cwd=tmp_path)
    for run in (bad_scheme, not_a_pair, not_text):
        assert run.returncode == 2
        assert run.stderr.startswith("msilo: error:")
    assert "mariadb://o:***@h/db" in bad_scheme.stderr
    toml = tmp_path / "msilo.toml"
    toml.write_text(
        f'[msilo]\ndb_url = "mariadb://o:{PASSWORD}@h/db"\n[auth]\nsecret = "{SECRET}"\n'
    )
    from_file = msilo("check-config", "-c", str(toml), cwd=tmp_path)
    assert from_file.returncode == 2
    for run in (ok, mysql, bad_scheme, not_a_pair, not_text, from_file):
        assert PASSWORD not in run.stdout + run.stderr
        assert SECRET not in run.stdout + run.stderr
        assert "123456789" not in run.stderr


def test_db_init_and_its_errors_never_echo_a_password(tmp_path: Path, pg_dsn: str) -> None:
    url = _with_password(pg_dsn)
    ready = msilo("db", "init", "--set", f'msilo.db_url="{url}"', cwd=tmp_path)
    assert ready.returncode == 0, ready.stderr
    assert f"schema ready ({redact_url(url)})" in ready.stdout and ":***@" in ready.stdout
    # Nothing listens on port 1: the error names where, never the password.
    down = msilo(
        "db", "init", "--set", f'msilo.db_url="postgres://u:{PASSWORD}@127.0.0.1:1/x"',
        cwd=tmp_path,
    )  # fmt: skip
    assert down.returncode == 1 and "127.0.0.1:1" in down.stderr
    for run in (ready, down):
        assert PASSWORD not in run.stdout + run.stderr


def test_log_lines_redact_url_passwords_and_the_auth_secret() -> None:
    stream = io.StringIO()
    root = logging.getLogger("msilo")
    saved = root.handlers[:], root.level, root.propagate
    try:
        setup_logging("debug", secrets=[SECRET])
        assert isinstance(root.handlers[0], logging.StreamHandler)
        root.handlers[0].setStream(stream)
        log = logging.getLogger("msilo.test")
        log.error("event=oops url=postgres://u:%s@h/db key=%s", PASSWORD, SECRET)
        try:
            raise RuntimeError(f"connect to postgresql://u:{PASSWORD}@h:5432/db failed")
        except RuntimeError:
            log.exception("event=traceback")
    finally:
        root.handlers[:], root.level, root.propagate = saved
    text = stream.getvalue()
    assert "event=oops url=postgres://u:***@h/db key=***" in text
    assert "postgresql://u:***@h:5432/db" in text
    assert PASSWORD not in text and SECRET not in text


async def test_a_serving_deployment_never_shows_its_secrets(
    serve: Callable[..., Instance], pg_url: str
) -> None:
    """Logs at debug level, /health, /stats and /metrics of real ``msilo serve`` processes."""
    instance = serve(
        _with_password(pg_url), "server.workers=1", 'server.log_level="debug"',
        "auth.enabled=true", f'auth.secret="{SECRET}"', 'auth.realm="127.0.0.1"',
        "auth.message=true",
    )  # fmt: skip
    await instance.wait_ready(1)
    ua = await UserAgent(instance.address, user="alice", domain="127.0.0.1").start()
    try:
        challenged = await ua.register(600)
        assert challenged.status == 401
        assert (await ua.message("sip:bob@127.0.0.1", "hi")).status == 407
    finally:
        ua.close()
    await wait_for(
        lambda: instance.get("/stats"), lambda s: s.get("requests", 0) >= 2, 10, "stats", instance
    )
    shown = [
        instance.text("/health"), instance.text("/stats"), instance.text("/metrics"),
        instance.log(),
    ]  # fmt: skip
    assert ":***@" in shown[0]  # the database is shown, without its password
    for text in shown:
        assert PASSWORD not in text
        assert SECRET not in text

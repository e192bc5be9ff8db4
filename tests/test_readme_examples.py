"""The README's examples, run as printed: the custom route, the TLS and PostgreSQL set-ups,
and what ``check-config`` and the commands promise about the files a configuration names."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from msilo.config import load_config
from msilo.storage import open_store
from tests.service.sipua import UserAgent, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def msilo(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``msilo ARGS`` as the installed console script runs it: ``-P`` keeps the working
    directory off ``sys.path``, as it is for ``/usr/local/bin/msilo``."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "msilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _block(after: str, lang: str = "sh") -> str:
    """The first fenced block of ``lang`` after the text ``after``."""
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"README lost the {lang} block after {after!r}"
    return match.group(1)


def _route_files(where: Path) -> str:
    """Write the README's myroute.py into ``where``; return the printed serve command."""
    code = _block("Custom route", "python")
    assert code.startswith("# myroute.py")
    (where / "myroute.py").write_text(code)
    [command] = [line for line in _block("msilo looks for the route's module").splitlines() if line]
    return command


def test_readme_route_runs_as_printed_from_its_directory(tmp_path: Path) -> None:
    command = _route_files(tmp_path)
    argv = shlex.split(command)
    assert argv[:2] == ["msilo", "serve"]
    port, http = free_port(), free_port()
    extra = [
        "--set", f'server.listen=["udp:127.0.0.1:{port}"]',
        "--set", f'server.http="127.0.0.1:{http}"',
        "--set", "server.workers=1",
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "msilo", *argv[1:], *extra],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()

        async def exchange() -> list[int]:
            alice = await UserAgent(("127.0.0.1", port), user="alice", domain="127.0.0.1").start()
            try:
                first = await alice.message("sip:bob@127.0.0.1", "now")
                later = await alice.message(
                    "sip:bob@127.0.0.1", "later", headers=["X-Deliver-At: 20301231120000"]
                )
                assert (first.status, later.status) == (202, 202)
            finally:
                alice.close()
            async with open_store(f"sqlite:///{tmp_path}/msilo.db") as store:
                return [row.snd_time for row in await store.list("bob", "127.0.0.1")]

        snd_times = asyncio.run(exchange())
        assert snd_times[0] == 0 and snd_times[1] > 0  # X-Deliver-At became a send time
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        finally:
            proc.kill()
            log.close()


def test_check_config_finds_a_route_beside_the_config_file(tmp_path: Path) -> None:
    etc, elsewhere = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    elsewhere.mkdir()
    _route_files(etc)
    (etc / "msilo.toml").write_text('[server]\nroute = "myroute:route"\n')
    out = msilo("-c", str(etc / "msilo.toml"), "check-config", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert "server.route: myroute:route imports" in out.stdout


def test_check_config_refuses_a_route_that_does_not_import(tmp_path: Path) -> None:
    out = msilo("check-config", "--set", 'server.route="nosuch:route"', cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("msilo: error: server.route: cannot import 'nosuch'")
    assert out.stderr.count("\n") == 1
    (tmp_path / "halfway.py").write_text("async def other(request, ctx): pass\n")
    out = msilo("check-config", "--set", 'server.route="halfway:route"', cwd=tmp_path)
    assert out.returncode == 2
    assert "server.route: 'halfway:route' is not an async function" in out.stderr


def _tls_example(tmp_path: Path) -> tuple[str, str]:
    """The README's TLS config and openssl command, with /etc/msilo/ moved under tmp_path."""
    etc = f"{tmp_path}/etc/"
    toml = _block("a `tls:HOST:PORT` listener with", "toml").replace("/etc/msilo/", etc)
    command = _block("For a test, a self-signed certificate").replace("/etc/msilo/", etc)
    return toml, command


def test_readme_tls_example_errors_name_the_file_then_pass_with_the_certificate(
    tmp_path: Path,
) -> None:
    toml, command = _tls_example(tmp_path)
    conf = tmp_path / "msilo.toml"
    conf.write_text(toml)
    (tmp_path / "etc").mkdir()
    out = msilo("-c", str(conf), "check-config", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == (
        f"msilo: error: tls.certificate: cannot read '{tmp_path}/etc/cert.pem' "
        "(No such file or directory)\n"
    )
    made = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    out = msilo("-c", str(conf), "check-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"# tls: {tmp_path}/etc/cert.pem and {tmp_path}/etc/key.pem load" in out.stdout
    # An unreadable key is the key's fault, with the operating system's reason.
    key = tmp_path / "etc" / "key.pem"
    key.rename(tmp_path / "etc" / "key.bak")
    key.mkdir()
    out = msilo("-c", str(conf), "check-config", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == (f"msilo: error: tls.private_key: cannot read '{key}' (Is a directory)\n")


def test_readme_postgresql_example_runs_as_printed(tmp_path: Path, pg_server_dsn: str) -> None:
    """The printed steps, with the role and database renamed so parallel runs do not meet."""
    name = f"msilo_{uuid.uuid4().hex[:8]}"
    server = urlsplit(pg_server_dsn)
    host, port = server.hostname or "127.0.0.1", str(server.port or 5432)
    script = _block("## Using PostgreSQL")
    assert script.rstrip().endswith("msilo -c msilo.toml serve")
    steps = script.rstrip().rsplit("\n", 1)[0]  # all but serve (the suite runs serve elsewhere)
    steps = re.sub(r"\bmsilo\b(?=[ \n/:'\"])", name, steps)  # role and database names...
    steps = steps.replace(f"{name} -c", "msilo -c")  # ...not the command
    steps = steps.replace("-h 127.0.0.1", f"-h {host} -p {port}").replace(
        "127.0.0.1:5432", f"{host}:{port}"
    )
    steps = steps.replace(f"cat > {name}.toml", "cat > msilo.toml")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "msilo").write_text(f'#!/bin/sh\nexec {sys.executable} -P -m msilo "$@"\n')
    (bindir / "msilo").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            ["sh", "-ec", steps], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines()[-1] == "0"
        assert f"postgres://{name}:secret@" in (tmp_path / "msilo.toml").read_text()
    finally:
        admin = ["-h", host, "-p", port, "-U", "postgres"]
        subprocess.run(["dropdb", *admin, "--if-exists", "--force", name], capture_output=True)
        subprocess.run(["dropuser", *admin, "--if-exists", name], capture_output=True)


@pytest.mark.parametrize(
    "command",
    [
        ("messages", "list", "--aor", "bob@example.com"),
        ("messages", "count", "--aor", "bob@example.com"),
        ("messages", "purge", "--aor", "bob@example.com", "--yes"),
        ("subscriber", "remove", "bob@example.com"),
        ("db", "upgrade"),
    ],
)
def test_commands_never_create_a_database_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    out = msilo(*command, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"msilo: error: database: {tmp_path}/msilo.db does not exist (create it with "
        "`msilo db init`"
    )
    assert out.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_db_init_is_the_command_that_creates_the_database(tmp_path: Path) -> None:
    out = msilo("db", "init", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "msilo.db").exists()
    assert msilo("messages", "count", "--aor", "bob@example.com", cwd=tmp_path).stdout == "0\n"


def test_check_config_reads_the_sqlite_file_but_never_creates_it(tmp_path: Path) -> None:
    out = msilo("check-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"# msilo.db_url: {tmp_path}/msilo.db does not exist yet" in out.stdout
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "msilo.db").mkdir()  # not a file msilo can read
    out = msilo("check-config", cwd=tmp_path)
    assert out.returncode == 2
    assert f"msilo.db_url: cannot read {tmp_path}/msilo.db (Is a directory)" in out.stderr


def _push_example(tmp_path: Path, after: str) -> Path:
    """The README's ``[push.NAME]`` block after ``after`` as a config, /etc/msilo/ under
    tmp_path."""
    toml = _block(after, "toml").replace("/etc/msilo/", f"{tmp_path}/etc/")
    conf = tmp_path / "msilo.toml"
    conf.write_text(toml)
    (tmp_path / "etc").mkdir(exist_ok=True)
    return conf


def test_readme_push_examples_load_with_their_keys(tmp_path: Path) -> None:
    """Each provider's example passes check-config once its key file is there, and names the
    missing file before (the worked examples of "Push notifications", as printed)."""
    from tests.push.fakes import ec_key, rsa_key, write_p8, write_service_account

    etc = tmp_path / "etc"
    keys = {
        "**FCM**": lambda: write_service_account(
            etc / "fcm-service-account.json", rsa_key(),
            token_uri="https://oauth2.googleapis.com/token",
        ),
        "**APNs**": lambda: write_p8(etc / "AuthKey_ABC123DEFG.p8", ec_key()),
        "**Webhook**": None,
    }  # fmt: skip
    for after, write_key in keys.items():
        conf = _push_example(tmp_path, after)
        if write_key is not None:
            out = msilo("-c", str(conf), "check-config", cwd=tmp_path)
            assert out.returncode == 2, out.stdout
            assert f"{etc}/" in out.stderr  # names the key file it cannot read
            write_key()
        out = msilo("-c", str(conf), "check-config", cwd=tmp_path)
        assert out.returncode == 0, (after, out.stderr)


def test_readme_write_behind_example_loads(tmp_path: Path) -> None:
    toml = _block("Refreshes written behind", "toml")
    path = tmp_path / "msilo.toml"
    path.write_text(toml)
    out = msilo("-c", str(path), "check-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert load_config(str(path)).registrar.write_behind == 5.0

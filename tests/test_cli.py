"""The ``msilo`` command, run as a user runs it (a subprocess), on both backends."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msilo.storage import open_store
from msilo.storage.base import NewMessage
from tests.service.sipua import free_port


def msilo(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``msilo ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "msilo", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def db_url(any_db: str) -> str:
    """A database URL for the CLI: an SQLite file, or a fresh PostgreSQL schema."""
    return any_db


def _seed(db_url: str, user: str, bodies: list[bytes]) -> None:
    async def run() -> None:
        async with open_store(db_url) as store:
            now = int(time.time())
            await store.store_batch(
                [
                    NewMessage(user, "example.com", "sip:a@x", f"sip:{user}@example.com", b,
                               "text/plain", now, now + 600)
                    for b in bodies
                ],
                0,
            )  # fmt: skip

    asyncio.run(run())


def test_version_names_the_active_parser(tmp_path: Path) -> None:
    out = msilo("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.strip() in ("msilo 0.1.0 (parser: C)", "msilo 0.1.0 (parser: Python)")
    env_out = subprocess.run(
        [sys.executable, "-m", "msilo", "--version"],
        capture_output=True, text=True, env={**os.environ, "MSILO_NO_EXTENSIONS": "1"},
    )  # fmt: skip
    assert env_out.stdout.strip() == "msilo 0.1.0 (parser: Python)"


def test_check_config_accepts_c_before_or_after_the_subcommand(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text("[msilo]\ncheck_time = 10\n")
    for args in (("-c", str(conf), "check-config"), ("check-config", "-c", str(conf))):
        out = msilo(*args, "--set", "msilo.max_messages=3", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "msilo.check_time = 10" in out.stdout
        assert "msilo.max_messages = 3" in out.stdout


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = msilo("check-config", "--set", "msilo.check_time=0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == "msilo: error: msilo.check_time: must be an integer >= 1 (got 0)\n"


def test_db_init_then_messages_count_list_purge(db_url: str, tmp_path: Path) -> None:
    setting = f'msilo.db_url="{db_url}"'
    assert msilo("db", "init", "--set", setting, cwd=tmp_path).returncode == 0
    _seed(db_url, "alice", [b"one", b"two"])
    count = msilo("messages", "count", "--aor", "alice@example.com", "--set", setting, cwd=tmp_path)
    assert (count.returncode, count.stdout) == (0, "2\n")
    listed = msilo("messages", "list", "--aor", "sip:alice@EXAMPLE.com", "--set", setting,
                   cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0
    assert [line.split("\t")[-1] for line in listed.stdout.splitlines()] == ["one", "two"]
    refused = msilo("messages", "purge", "--aor", "alice@example.com", "--set", setting,
                    cwd=tmp_path, stdin="")  # fmt: skip
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = msilo("messages", "purge", "--aor", "alice@example.com", "--yes", "--set", setting,
                   cwd=tmp_path)  # fmt: skip
    assert purged.stdout == "deleted 2 message(s)\n"
    count = msilo("messages", "count", "--aor", "alice@example.com", "--set", setting, cwd=tmp_path)
    assert count.stdout == "0\n"


def test_messages_on_a_database_without_schema_says_what_to_do(tmp_path: Path) -> None:
    setting = f'msilo.db_url="sqlite:///{tmp_path}/empty.db"'
    out = msilo("messages", "count", "--aor", "a@b", "--set", setting, cwd=tmp_path)
    assert out.returncode == 1
    assert "msilo db init" in out.stderr and out.stderr.count("\n") == 1


def test_bad_aor_is_refused(tmp_path: Path) -> None:
    out = msilo("messages", "count", "--aor", "nodomain", cwd=tmp_path)
    assert out.returncode == 2 and "must be user@domain" in out.stderr


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    setting = 'msilo.db_url="postgres://postgres@127.0.0.1:1/nowhere"'
    out = msilo("db", "init", "--set", setting, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("msilo: error: database:")
    assert "Traceback" not in out.stderr


def test_serve_with_no_config_uses_sqlite_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "msilo", "serve", "--set",
         f'server.listen=["udp:127.0.0.1:{port}"]', "--set", 'server.http=""'],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        # SIGTERM once a worker serves (not after a fixed sleep: a loaded host starts slowly).
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while not any("event=serving" in line for line in seen):
                assert time.monotonic() < deadline, "".join(seen)
                if sel.select(timeout=0.5):
                    line = proc.stderr.readline()
                    assert line, "".join(seen)  # exited before serving
                    seen.append(line)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        proc.kill()
    err = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert (tmp_path / "msilo.db").exists()  # the embedded default, relative to the cwd
    assert "event=stopped" in err


def test_serve_on_a_taken_port_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        out = msilo("serve", "--set", f'server.listen=["udp:127.0.0.1:{port}"]', "--set",
                    'server.http=""', cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert f"server.listen: udp:127.0.0.1:{port} is already served by another process" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def test_subscriber_add_passwd_remove(db_url: str, tmp_path: Path) -> None:
    setting = f'msilo.db_url="{db_url}"'
    assert msilo("db", "init", "--set", setting, cwd=tmp_path).returncode == 0
    added = msilo("subscriber", "add", "alice@example.com", "--set", setting, cwd=tmp_path,
                  stdin="wonderland\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "wonderland" not in added.stdout + added.stderr  # never echoed or logged
    again = msilo("subscriber", "add", "alice@example.com", "--set", setting, cwd=tmp_path,
                  stdin="x\n")  # fmt: skip
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    changed = msilo("subscriber", "passwd", "alice@example.com", "--set", setting, cwd=tmp_path,
                    stdin="looking-glass\n")  # fmt: skip
    assert changed.returncode == 0

    async def ha1() -> str | None:
        async with open_store(db_url) as store:
            sub = await store.get_subscriber("alice", "example.com")
            return sub.ha1 if sub is not None else None

    from msilo.auth import compute_ha1

    assert asyncio.run(ha1()) == compute_ha1("MD5", "alice", "example.com", "looking-glass")
    removed = msilo("subscriber", "remove", "alice@example.com", "--set", setting, cwd=tmp_path)
    assert removed.returncode == 0
    assert asyncio.run(ha1()) is None


def test_messages_list_pages_and_json(db_url: str, tmp_path: Path) -> None:
    setting = f'msilo.db_url="{db_url}"'
    assert msilo("db", "init", "--set", setting, cwd=tmp_path).returncode == 0
    _seed(db_url, "alice", [f"m{i}".encode() for i in range(5)] + [b"\xff\xfe"])
    base = ("messages", "list", "--aor", "alice@example.com", "--set", setting)
    page = msilo(*base, "--limit", "2", "--offset", "1", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert [line.split("\t")[-1] for line in page.stdout.splitlines()] == ["m1", "m2"]
    assert page.stderr == (
        "2-3 of 6 message(s) for alice@example.com (--limit/--offset for the others)\n"
    )
    import orjson

    listed = msilo(*base, "--json", "--offset", "4", cwd=tmp_path)
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [r.get("body") for r in rows] == ["m4", None]
    assert rows[1]["body_base64"] == "//4="  # not UTF-8: the bytes, exactly
    assert set(rows[0]) == {"mid", "username", "domain", "src_addr", "dst_addr", "ctype",
                            "inc_time", "exp_time", "snd_time", "body"}  # fmt: skip
    assert (rows[0]["username"], rows[0]["domain"]) == ("alice", "example.com")
    everything = msilo(*base, "--limit", "0", cwd=tmp_path)
    assert len(everything.stdout.splitlines()) == 6
    assert everything.stderr == "6 message(s) for alice@example.com\n"
    bad = msilo(*base, "--limit", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "must be 0 or more" in bad.stderr


def test_messages_list_shows_the_first_hundred_unless_told(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/many.db"
    setting = f'msilo.db_url="{db_url}"'
    assert msilo("db", "init", "--set", setting, cwd=tmp_path).returncode == 0
    _seed(db_url, "bob", [f"n{i}".encode() for i in range(130)])
    out = msilo("messages", "list", "--aor", "bob@example.com", "--set", setting, cwd=tmp_path)
    assert len(out.stdout.splitlines()) == 100
    assert out.stderr.startswith("1-100 of 130 message(s) for bob@example.com")


@pytest.mark.parametrize("command", ["list", "check-config"])
def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path, command: str) -> None:
    db_url = f"sqlite:///{tmp_path}/pipe.db"
    setting = f'msilo.db_url="{db_url}"'
    assert msilo("db", "init", "--set", setting, cwd=tmp_path).returncode == 0
    _seed(db_url, "carol", [b"x" * 200] * 50)
    argv = (
        ["messages", "list", "--aor", "carol@example.com", "--limit", "0"]
        if command == "list"
        else ["check-config"]
    )
    # The reader is gone before msilo writes a byte (as `| head` is after its lines).
    proc = subprocess.Popen(
        [sys.executable, "-m", "msilo", *argv, "--set", setting],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    proc.wait(60)
    assert (proc.returncode, err) == (141, "")

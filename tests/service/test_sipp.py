"""Real SIP tools against a real worker: sipp (tools/sipp/*.xml) and sipsak, both backends.

Every tool runs through ``asyncio.create_subprocess_exec`` so the worker, which
lives on this test's event loop, keeps serving while the tool talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.service.conftest import Running, ServerFactory
from tests.service.sipua import free_port

ROOT = Path(__file__).resolve().parents[2]
SIPP_DIR = ROOT / "tools" / "sipp"
DATA = ROOT / "tests" / "data"

pytestmark = pytest.mark.sipp
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
needs_sipsak = pytest.mark.skipif(shutil.which("sipsak") is None, reason="sipsak not installed")

# Options every sipp run shares: no keyboard, a hard time limit that counts as a
# failure, and no BYE when a (dialog-less) MESSAGE/REGISTER call is aborted.
SIPP_COMMON = ("-nostdin", "-timeout", "15", "-timeout_error", "-default_behaviors", "all,-bye")


@contextlib.asynccontextmanager
async def _spawn(*argv: str, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a tool; whatever happens in the block, it is not left running."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _finish(process: asyncio.subprocess.Process, timeout: float) -> tuple[int, str]:
    """Wait for a started tool's exit code and output (killed by _spawn on timeout)."""
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def _run(*argv: str, cwd: Path, timeout: float = 20.0) -> tuple[int, str]:
    """Run a tool to completion without blocking the event loop."""
    async with _spawn(*argv, cwd=cwd) as process:
        return await _finish(process, timeout)


async def _users_csv(path: Path, count: int, *contact: str) -> Path:
    """Write an injection CSV with tools/sipp/make_users.py (so the script is tested too)."""
    code, output = await _run(
        sys.executable, str(SIPP_DIR / "make_users.py"), str(count), *contact, cwd=path.parent
    )
    assert code == 0, output
    path.write_text(output)
    return path


def _sipp_stats(path: Path) -> dict[str, str]:
    """The last (final) row of a sipp -trace_stat CSV, by column name."""
    header, *rows = path.read_text().splitlines()
    return dict(zip(header.split(";"), rows[-1].split(";"), strict=False))


def _sipp_uac(srv: Running, scenario: str, csv: Path, calls: int, stats: Path) -> list[str]:
    """A sipp UAC command line for one of our scenarios against ``srv``."""
    return [
        "sipp",
        f"127.0.0.1:{srv.port}",
        "-sf",
        str(SIPP_DIR / scenario),
        "-inf",
        str(csv),
        "-i",
        "127.0.0.1",
        "-p",
        str(free_port()),  # sipp's default local port is 5060
        "-m",
        str(calls),
        "-r",
        "100",  # calls per second: a few hundred ms per run
        "-rp",
        "1000",
        *SIPP_COMMON,
        "-trace_stat",
        "-stf",
        str(stats),
    ]


async def _store_with_sipp(srv: Running, tmp_path: Path, users: int, calls: int) -> None:
    """store_uac.xml: ``calls`` MESSAGEs round-robin over user1..userN, all answered 202."""
    csv = await _users_csv(tmp_path / "users.csv", users)
    stats = tmp_path / "store_stats.csv"
    code, output = await _run(*_sipp_uac(srv, "store_uac.xml", csv, calls, stats), cwd=tmp_path)
    assert code == 0, output  # sipp exits non-zero when any call failed
    final = _sipp_stats(stats)
    assert (final["SuccessfulCall(C)"], final["FailedCall(C)"]) == (str(calls), "0"), final


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _wait_bound(port: int, timeout: float = 5.0) -> None:
    """Wait until something (the sipp UAS) holds UDP 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on UDP {port}")
        await asyncio.sleep(0.02)


@needs_sipp
async def test_sipp_store_50_messages_to_10_users_all_stored(
    server: ServerFactory, tmp_path: Path
) -> None:
    srv = await server("server.mode=silo")
    await _store_with_sipp(srv, tmp_path, users=10, calls=50)
    for i in range(1, 11):
        rows = await srv.store.list(f"user{i}", "127.0.0.1")
        assert len(rows) == 5, (i, rows)  # SEQUENTIAL: user1..user10 five times over
        for row in rows:
            assert row.body.startswith(b"Offline message ")
            assert f" for user{i} from sipp".encode() in row.body  # field0 reached the body
            assert 90 <= len(row.body) <= 110  # the scenario's ~100-byte body
            assert row.ctype == "text/plain"
    assert srv.stats()["stored_messages"] == 50


@needs_sipp
async def test_sipp_register_dumps_every_stored_message_to_the_sipp_uas(
    server: ServerFactory, tmp_path: Path
) -> None:
    srv = await server()  # registrar mode: the users are offline, so MESSAGEs are stored
    users, calls = 10, 40
    await _store_with_sipp(srv, tmp_path, users, calls)
    uas_port = free_port()
    contacts = await _users_csv(tmp_path / "contacts.csv", users, "127.0.0.1", str(uas_port))
    uas_stats = tmp_path / "uas_stats.csv"
    uas = [
        "sipp",
        "-sf",
        str(SIPP_DIR / "message_uas.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        str(uas_port),
        "-m",
        str(calls),  # exits once every stored message was answered
        "-d",
        "300",  # linger after each 200 for retransmissions (T1 is 50 ms here)
        *SIPP_COMMON,
        "-trace_stat",
        "-stf",
        str(uas_stats),
    ]
    async with _spawn(*uas, cwd=tmp_path) as uas_process:
        await _wait_bound(uas_port)
        register = _sipp_uac(
            srv, "register_uac.xml", contacts, users, tmp_path / "register_stats.csv"
        )
        code, output = await _run(*register, cwd=tmp_path)
        assert code == 0, output
        code, output = await _finish(uas_process, timeout=20)
    assert code == 0, output
    final = _sipp_stats(uas_stats)
    assert (final["SuccessfulCall(C)"], final["FailedCall(C)"]) == (str(calls), "0"), final

    async def silo_empty() -> bool:
        counts = [await srv.store.count(f"user{i}", "127.0.0.1") for i in range(1, users + 1)]
        return sum(counts) == 0

    await _eventually(silo_empty)
    stats = srv.stats()
    assert (stats["dumped_messages"], stats["failed_messages"]) == (calls, 0), stats


@needs_sipsak
async def test_sipsak_message_from_a_file_is_stored(server: ServerFactory, tmp_path: Path) -> None:
    srv = await server("server.mode=silo")
    request = DATA / "sipsak_message.txt"
    code, output = await _run(
        "sipsak", "-vv", "-f", str(request), "-s", f"sip:bob@127.0.0.1:{srv.port}", cwd=tmp_path
    )
    assert code == 0, output
    assert "SIP/2.0 202 Accepted" in output, output
    [row] = await srv.store.list("bob", "127.0.0.1")
    assert row.src_addr == "sip:alice@127.0.0.1"
    assert row.body == request.read_bytes().split(b"\r\n\r\n", 1)[1]


@needs_sipsak
async def test_sipsak_options_is_answered_200(server: ServerFactory, tmp_path: Path) -> None:
    srv = await server()
    code, output = await _run("sipsak", "-vv", "-s", f"sip:127.0.0.1:{srv.port}", cwd=tmp_path)
    assert code == 0, output
    assert "SIP/2.0 200 OK" in output, output
    assert srv.stats()["replies_2xx"] == 1

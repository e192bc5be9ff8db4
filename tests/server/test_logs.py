"""What ``msilo serve`` writes to its log, read from a real process tree: debug lines per
request and response, whole messages with ``sip_trace``, journald priorities, and the
names the processes show in ps."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from msilo.log import journal_stream, setup_logging
from tests.server.conftest import Instance, wait_for
from tests.service.sipua import UserAgent


def _lines(instance: Instance, pattern: str) -> list[str]:
    return [line for line in instance.log().splitlines() if re.search(pattern, line)]


async def test_debug_gives_one_line_per_request_and_response_and_sip_trace_whole_messages(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(
        f"sqlite:///{tmp_path}/m.db",
        "server.workers=1", 'server.log_level="debug"', "server.sip_trace=true",
    )  # fmt: skip
    await srv.wait_ready(1)
    ua = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
    try:
        reply = await ua.message("sip:bob@127.0.0.1", "hello bob")
    finally:
        ua.close()
    assert reply.status == 202
    call_id = re.escape(reply.call_id or "")
    peer = f"peer=udp:127.0.0.1:{ua.port}"
    got = await wait_for(
        lambda: _lines(srv, f"event=response_out .*call_id={call_id}"),
        lambda lines: len(lines) == 1, 10, "the response line", srv,
    )  # fmt: skip
    [request] = _lines(srv, f"event=request_in .*call_id={call_id}")
    assert " DEBUG msilo.trace " in request and "proc=worker0" in request
    assert "method=MESSAGE" in request and peer in request
    [response] = got
    assert "status=202 method=MESSAGE" in response and peer in response
    assert "proc=worker0" in response
    assert re.search(r"duration_ms=\d+\.\d", response)
    # sip_trace: the whole request and the whole response, each on one line.
    [inbound] = _lines(srv, f"event=sip_in {peer} .*{call_id}")
    assert '"MESSAGE sip:bob@127.0.0.1 SIP/2.0\\r\\n' in inbound
    assert inbound.endswith('\\r\\n\\r\\nhello bob"')
    [outbound] = _lines(srv, f"event=sip_out {peer} .*{call_id}")
    assert 'message="SIP/2.0 202 Accepted\\r\\n' in outbound


async def test_info_level_adds_no_traffic_lines(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=1")
    await srv.wait_ready(1)
    ua = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
    try:
        assert (await ua.message("sip:bob@127.0.0.1", "hello")).status == 202
    finally:
        ua.close()
    await wait_for(lambda: _lines(srv, "event=stored"), bool, 10, "the store line", srv)
    assert _lines(srv, "event=(request_in|response_out|sip_in|sip_out)") == []


async def test_under_systemd_lines_carry_the_journal_priority(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=1", env={"JOURNAL_STREAM": "{log}"})
    await srv.wait_ready(1)
    lines = srv.log().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>") and "event=serving" in line for line in lines)


def test_journal_priority_only_when_journal_stream_names_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "err").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journal_stream(stream)  # stderr redirected elsewhere: no prefix
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not journal_stream(io.StringIO())


async def test_processes_are_named_in_ps(serve: Callable[..., Instance], tmp_path: Path) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=2")
    health = await srv.wait_ready(2)

    def title(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()

    assert title(srv.pid) == "msilo: supervisor"
    assert sorted(title(w["pid"]) for w in health["workers"]) == [
        "msilo: worker 0",
        "msilo: worker 1",
    ]
    assert title(health["leader"]["process"]["pid"]) == "msilo: leader"


def test_library_warnings_are_one_line_in_msilo_format_once_per_state_change(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """asyncpg's pool logs the same warning with a traceback on every retry; msilo keeps
    the first, as one line, until the database state changes."""
    root, library = logging.getLogger(), logging.getLogger("asyncpg.pool")
    ours = logging.getLogger("msilo")
    # setup_logging rewires the process's loggers: put everything back for the next tests
    # (caplog listens on the root logger and needs msilo's records to propagate).
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    try:
        setup_logging("info", process="worker3")
        for _ in range(10):
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except OSError:
                library.warning("Failed to restore the pool connection floor", exc_info=True)
        logging.getLogger("msilo.store").error("event=db_up what=store")
        library.warning("Failed to restore the pool connection floor", exc_info=True)
        logging.getLogger("asyncio").debug("not shown: libraries log from WARNING up")
        err = capfd.readouterr().err
    finally:
        root.handlers[:], _, ours.handlers[:], _, ours.propagate = saved
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
    lines = err.splitlines()
    assert "Traceback" not in err
    floor = [line for line in lines if "pool connection floor" in line]
    assert len(floor) == 2, lines  # once, then once again after event=db_up
    assert re.match(
        r"\S+ \S+ WARNING asyncpg\.pool pid=\d+ proc=worker3 event=library logger=asyncpg\.pool"
        r' message="Failed to restore the pool connection floor"'
        r' error="ConnectionRefusedError: \[Errno 111\] Connect call failed"$',
        floor[0],
    ), floor[0]
    assert "not shown" not in err

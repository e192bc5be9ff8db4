"""Real SIP tools against msilo's transport and transaction layers: sipsak and sipp."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from .conftest import MiniServer, free_port_pair

SCENARIO = Path(__file__).parent.parent / "data" / "sipp_message_uac.xml"

pytestmark = pytest.mark.sipp


async def _run(*argv: str, cwd: Path, timeout: float = 20.0) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.skipif(shutil.which("sipsak") is None, reason="sipsak not installed")
async def test_sipsak_options_is_answered_200(server: MiniServer, tmp_path: Path) -> None:
    code, output = await _run(
        "sipsak", "-vv", "-s", f"sip:test@127.0.0.1:{server.port}", cwd=tmp_path
    )
    assert code == 0, output
    assert "SIP/2.0 200 OK" in output
    request, transport, _ = server.seen[0]
    assert (request.method, transport) == ("OPTIONS", "UDP")


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
async def test_sipp_message_over_udp_is_answered_200(server: MiniServer, tmp_path: Path) -> None:
    udp, tcp = free_port_pair()  # a free local port for sipp (its default is 5060)
    local_port = udp.getsockname()[1]
    udp.close()
    tcp.close()
    code, output = await _run(
        "sipp",
        f"127.0.0.1:{server.port}",
        "-sf",
        str(SCENARIO),
        "-m",
        "1",
        "-i",
        "127.0.0.1",
        "-p",
        str(local_port),
        "-s",
        "bob",
        "-nostdin",
        "-timeout",
        "10",
        "-timeout_error",
        cwd=tmp_path,
    )
    assert code == 0, output
    assert "Successful call" in output
    request, transport, addr = server.seen[0]
    assert (request.method, transport, addr[1]) == ("MESSAGE", "UDP", local_port)
    assert request.body.strip() == b"hello from sipp"

"""[limits] on TCP: the connection cap and the idle timeout, on a running worker."""

from __future__ import annotations

import asyncio

from tests.service.conftest import ServerFactory


def _message(port: int, n: int) -> bytes:
    body = b"over tcp"
    return (
        f"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKl{n}"
        f"\r\nFrom: <sip:alice@127.0.0.1>;tag=l{n}\r\nTo: <sip:bob@127.0.0.1>"
        f"\r\nCall-ID: l{n}@x\r\n"
        f"CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except (TimeoutError, ConnectionError):
        return False


async def test_connections_over_the_cap_are_refused(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.max_connections=2")
    conns = [await asyncio.open_connection(*srv.address) for _ in range(3)]
    try:
        assert await _closed_by_server(conns[2][0], 2.0)  # the third one
        reader, writer = conns[0]
        writer.write(_message(writer.get_extra_info("sockname")[1], 1))
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert reply.startswith(b"SIP/2.0 202")
    finally:
        for _, writer in conns:
            writer.close()


async def test_idle_connections_are_closed(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.idle_timeout=1")
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        assert await _closed_by_server(reader, 4.0)
    finally:
        writer.close()

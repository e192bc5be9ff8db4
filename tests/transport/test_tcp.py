"""SIP over real TCP connections: framing, big bodies, keep-alives, errors, reuse."""

from __future__ import annotations

import asyncio

from msilo.sip.build import build_request
from msilo.transport import Target

from .conftest import MiniServer, parse_request, parse_response, read_message, start_server


def _message(body: bytes, *, call_id: str = "tcp-1@127.0.0.1") -> bytes:
    return build_request(
        "MESSAGE",
        "sip:bob@127.0.0.1",
        from_="sip:alice@127.0.0.1",
        to="sip:bob@127.0.0.1",
        sent_by=("127.0.0.1", 5999),
        transport="TCP",
        call_id=call_id,
        content_type="text/plain",
        body=body,
    ).data


async def _connect(server: MiniServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def test_3kb_message_in_pieces_is_answered_over_the_same_connection(
    server: MiniServer,
) -> None:
    body = bytes(range(32, 127)) * 32  # ~3 KB
    data = _message(body)
    reader, writer = await _connect(server)
    try:
        for i in range(0, len(data), 700):
            writer.write(data[i : i + 700])
            await writer.drain()
            await asyncio.sleep(0.005)
        response = parse_response(await read_message(reader))
    finally:
        writer.close()
    assert response.status == 200 and response.call_id == "tcp-1@127.0.0.1"
    request, transport, _ = server.seen[0]
    assert transport == "TCP" and request.body == body


async def test_pipelined_messages_and_keepalive_ping(server: MiniServer) -> None:
    reader, writer = await _connect(server)
    try:
        writer.write(
            _message(b"one", call_id="p-1") + b"\r\n\r\n" + _message(b"two", call_id="p-2")
        )
        first = parse_response(await read_message(reader))
        pong = await asyncio.wait_for(reader.readexactly(2), 3)
        second = parse_response(await read_message(reader))
    finally:
        writer.close()
    assert (first.call_id, pong, second.call_id) == ("p-1", b"\r\n", "p-2")


async def test_missing_content_length_gets_400_and_the_connection_closes(
    server: MiniServer,
) -> None:
    data = _message(b"").replace(b"Content-Length: 0\r\n", b"")
    reader, writer = await _connect(server)
    try:
        writer.write(data)
        answer = await read_message(reader)
        rest = await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()
    assert parse_response(answer).status == 400
    assert rest == b""  # EOF: closed by the server


async def test_oversize_message_gets_513_and_the_connection_closes() -> None:
    server = await start_server(max_message=4096)
    try:
        reader, writer = await _connect(server)
        writer.write(_message(b"x" * 5000))
        answer = parse_response(await read_message(reader))
        assert answer.status == 513
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    finally:
        await server.transports.close()


async def test_idle_connection_is_closed() -> None:
    server = await start_server(idle_timeout=0.2)
    try:
        reader, writer = await _connect(server)
        writer.write(_message(b"hi"))
        await read_message(reader)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        await asyncio.sleep(0.01)
        assert len(server.transports.pool) == 0
    finally:
        await server.transports.close()


async def test_request_to_a_registered_peer_reuses_its_inbound_connection(
    server: MiniServer,
) -> None:
    reader, writer = await _connect(server)
    try:
        writer.write(_message(b"register-ish"))
        await read_message(reader)
        peer = writer.get_extra_info("sockname")
        txn = server.layer.request(
            "OPTIONS",
            f"sip:alice@127.0.0.1:{peer[1]};transport=tcp",
            Target("127.0.0.1", peer[1], "TCP", True),
            from_="sip:msilo@127.0.0.1",
            to="sip:alice@127.0.0.1",
        )
        request = parse_request(await read_message(reader))
        assert request.method == "OPTIONS" and request.via is not None
        assert request.via.transport == "TCP"
        answer = f"SIP/2.0 200 OK\r\nVia: {request.via.raw}\r\n".encode()
        for name in ("from", "to", "call-id", "cseq"):
            answer += f"{name}: {request.get_header(name)}\r\n".encode()
        writer.write(answer + b"Content-Length: 0\r\n\r\n")
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        writer.close()
    assert result.status == 200 and not result.local


async def test_big_request_to_a_udp_target_goes_over_tcp_and_reuses_one_connection(
    server: MiniServer,
) -> None:
    target_server = await start_server()
    try:
        target = Target("127.0.0.1", target_server.port, "UDP")
        txns = [
            server.layer.request(
                "MESSAGE",
                f"sip:bob@127.0.0.1:{target_server.port}",
                target,
                from_="sip:msilo@127.0.0.1",
                to="sip:bob@127.0.0.1",
                body=b"y" * 2000,
                content_type="text/plain",
            )
            for _ in range(3)
        ]
        results = await asyncio.wait_for(asyncio.gather(*(t.wait() for t in txns)), 5)
        assert [r.status for r in results] == [200, 200, 200]
        assert [t for _, t, _ in target_server.seen] == ["TCP", "TCP", "TCP"]
        assert len({addr for _, _, addr in target_server.seen}) == 1  # one connection
        assert all(t.request.transport == "TCP" for t in txns)
    finally:
        target_server.layer.close()
        await target_server.transports.close()


async def test_connect_refused_completes_with_503(server: MiniServer) -> None:
    import socket

    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    txn = server.layer.request(
        "MESSAGE",
        "sip:bob@127.0.0.1",
        Target("127.0.0.1", dead_port, "TCP", True),
        from_="sip:msilo@127.0.0.1",
        to="sip:bob@127.0.0.1",
    )
    result = await asyncio.wait_for(txn.wait(), 5)
    assert result.status == 503 and result.local


async def test_good_message_before_a_bad_one_in_one_segment_is_still_answered(
    server: MiniServer,
) -> None:
    bad = _message(b"", call_id="bad").replace(b"Content-Length: 0\r\n", b"")
    reader, writer = await _connect(server)
    try:
        writer.write(_message(b"ok", call_id="good") + bad)
        first = parse_response(await read_message(reader))
        second = parse_response(await read_message(reader))
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()
    assert (first.call_id, first.status) == ("good", 200)
    assert (second.call_id, second.status) == ("bad", 400)

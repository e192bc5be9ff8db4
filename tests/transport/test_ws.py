"""SIP over WebSocket (RFC 7118) on real sockets: handshake rules, framing, keep-alives."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from msilo.errors import TransportError
from msilo.sip.build import build_request
from msilo.sip.message import SipRequest
from msilo.transaction import ServerTransaction, TransactionLayer
from msilo.transport import Target, Transports
from tests.service.sipua import free_port

from .conftest import PARSE, parse_request, parse_response


@dataclass
class WsServer:
    transports: Transports
    layer: TransactionLayer
    port: int
    seen: list[tuple[SipRequest, str, Any]]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sip"


async def start_ws(**settings: Any) -> WsServer:
    options: dict[str, Any] = {"ws_path": "/sip", "ws_ping": 30.0, **settings}
    transports = Transports(**options)
    seen: list[tuple[SipRequest, str, Any]] = []

    def handler(request: SipRequest, txn: ServerTransaction) -> None:
        seen.append((request, txn.source.transport, txn.source.addr))
        txn.respond(200, "OK")

    layer = TransactionLayer(handler, transports.send, sent_by=transports.sent_by, parse=PARSE)
    transports.on_message = layer.receive
    port = free_port()
    await transports.listen_ws("127.0.0.1", port)
    return WsServer(transports, layer, port, seen)


@pytest.fixture
async def ws_server() -> AsyncIterator[WsServer]:
    srv = await start_ws()
    try:
        yield srv
    finally:
        srv.layer.close()
        await srv.transports.close()


def _options(n: int = 1, body: bytes = b"") -> bytes:
    return build_request(
        "MESSAGE",
        "sip:bob@127.0.0.1",
        from_="sip:alice@127.0.0.1",
        to="sip:bob@127.0.0.1",
        sent_by=("df7jal23ls0d.invalid", 0),
        transport="WS",
        call_id=f"ws-{n}@x",
        content_type="text/plain",
        body=body or b"hello",
    ).data


async def _client(url: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("subprotocols", ["sip"])
    return await connect(url, ping_interval=None, open_timeout=5, **kwargs)


async def _recv(ws: ClientConnection) -> bytes:
    frame = await asyncio.wait_for(ws.recv(), 5)
    return frame.encode() if isinstance(frame, str) else frame


async def test_request_in_a_frame_is_answered_in_a_frame(ws_server: WsServer) -> None:
    ws = await _client(ws_server.url)
    try:
        assert ws.subprotocol == "sip"
        await ws.send(_options().decode())  # a text frame
        response = parse_response(await _recv(ws))
        await ws.send(_options(2))  # a binary frame
        second = parse_response(await _recv(ws))
    finally:
        await ws.close()
    assert response.status == 200 and response.call_id == "ws-1@x"
    assert second.status == 200 and second.call_id == "ws-2@x"
    request, transport, _ = ws_server.seen[0]
    assert transport == "WS" and request.body == b"hello"


async def test_fragmented_message_is_put_together(ws_server: WsServer) -> None:
    data = _options(3, body=b"x" * 3000)
    ws = await _client(ws_server.url)
    try:
        await ws.send([data[:1000], data[1000:2000], data[2000:]])
        response = parse_response(await _recv(ws))
    finally:
        await ws.close()
    assert response.status == 200 and ws_server.seen[0][0].body == b"x" * 3000


async def test_request_to_the_client_goes_over_its_connection_with_via_ws(
    ws_server: WsServer,
) -> None:
    ws = await _client(ws_server.url)
    try:
        await ws.send(_options(4))
        await _recv(ws)
        _, _, peer = ws_server.seen[0]
        data = build_request(
            "MESSAGE",
            "sip:x@df7jal23ls0d.invalid;transport=ws",
            from_="sip:msilo@127.0.0.1",
            to="sip:x@127.0.0.1",
            sent_by=ws_server.transports.sent_by("WS", peer[0]),
            transport="WS",
            body=b"stored",
            content_type="text/plain",
        ).data
        ws_server.transports.send(data, Target(peer[0], peer[1], "WS", True), _no_error)
        request = parse_request(await _recv(ws))
    finally:
        await ws.close()
    assert request.body == b"stored"
    assert request.via is not None
    assert request.via.transport == "WS" and request.via.port == ws_server.port


async def test_frames_are_text_unless_the_message_is_not_utf8(ws_server: WsServer) -> None:
    ws = await _client(ws_server.url)
    try:
        await ws.send(_options(8))
        await _recv(ws)
        _, _, peer = ws_server.seen[0]
        target = Target(peer[0], peer[1], "WS", True)
        for body in ("caf\u00e9".encode(), b"\xff\xfe binary"):
            data = build_request(
                "MESSAGE", "sip:x@a.invalid;transport=ws", from_="sip:m@127.0.0.1",
                to="sip:x@127.0.0.1", sent_by=("127.0.0.1", ws_server.port), transport="WS",
                body=body, content_type="application/octet-stream",
            ).data  # fmt: skip
            ws_server.transports.send(data, target, _no_error)
        text = await asyncio.wait_for(ws.recv(), 5)
        binary = await asyncio.wait_for(ws.recv(), 5)
    finally:
        await ws.close()
    assert isinstance(text, str) and text.endswith("caf\u00e9")
    assert isinstance(binary, bytes) and binary.endswith(b"\xff\xfe binary")


async def test_a_handshake_must_arrive_within_the_message_timeout() -> None:
    srv = await start_ws(message_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(b"GET /sip HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 2.0
        writer.close()
    finally:
        srv.layer.close()
        await srv.transports.close()


def _no_error(exc: BaseException) -> None:
    raise AssertionError(f"unexpected send error {exc!r}")


async def test_send_without_a_connection_fails_at_once(ws_server: WsServer) -> None:
    ws = await _client(ws_server.url)
    await ws.send(_options(5))
    await _recv(ws)
    _, _, peer = ws_server.seen[0]
    await ws.close()
    for _ in range(100):
        if not ws_server.transports.ws_pools["WS"].get(peer[0], peer[1]):
            break
        await asyncio.sleep(0.02)
    with pytest.raises(TransportError, match="no WS connection"):
        ws_server.transports.send(b"x", Target(peer[0], peer[1], "WS", True), _no_error)


async def test_handshake_without_the_sip_subprotocol_is_refused(ws_server: WsServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_server.url, open_timeout=5)
    assert info.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_server.url, subprotocols=["msrp"], open_timeout=5)  # type: ignore[list-item]
    assert info.value.response.status_code == 400
    assert ws_server.transports.ws_pools["WS"].refused == 2


async def test_upgrade_on_another_path_is_refused(ws_server: WsServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        await _client(f"ws://127.0.0.1:{ws_server.port}/other")
    assert info.value.response.status_code == 404
    ws = await _client(ws_server.url + "?token=1")  # a query is not part of the path
    await ws.close()


async def test_origin_allow_list() -> None:
    srv = await start_ws(ws_origins=("https://app.example.com",))
    try:
        with pytest.raises(InvalidStatus) as info:
            await _client(srv.url, origin="https://evil.example.net")  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
        ok = await _client(srv.url, origin="https://app.example.com")  # type: ignore[arg-type]
        await ok.close()
        # No Origin at all: not a browser, so not a cross-site page.
        plain = await _client(srv.url)
        await plain.close()
    finally:
        srv.layer.close()
        await srv.transports.close()


async def test_connection_limit_answers_503() -> None:
    srv = await start_ws(max_connections=1)
    try:
        first = await _client(srv.url)
        with pytest.raises(InvalidStatus) as info:
            await _client(srv.url)
        assert info.value.response.status_code == 503
        await first.close()
    finally:
        srv.layer.close()
        await srv.transports.close()


async def test_crlf_keepalive_is_answered(ws_server: WsServer) -> None:
    ws = await _client(ws_server.url)
    try:
        await ws.send("\r\n\r\n")
        assert await _recv(ws) == b"\r\n"
        await ws.send("\r\n")  # a pong from the client: nothing comes back
        await ws.send(_options(6))
        assert parse_response(await _recv(ws)).status == 200
    finally:
        await ws.close()


async def test_oversize_message_closes_with_1009(caplog: pytest.LogCaptureFixture) -> None:
    srv = await start_ws(max_message=2048)
    try:
        ws = await _client(srv.url)
        await ws.send(_options(7, body=b"y" * 4000))
        with pytest.raises(ConnectionClosed):
            await _recv(ws)
        assert ws.close_code in (1009, 1006)
        fragmented = await _client(srv.url)
        await fragmented.send([b"z" * 1500, b"z" * 1500])
        with pytest.raises(ConnectionClosed):
            await _recv(fragmented)
        assert fragmented.close_code == 1009
        assert [r.call_id for r, _, _ in srv.seen] == []
        # The peer caused it: an info line, not an error one (it could send thousands).
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        srv.layer.close()
        await srv.transports.close()


async def test_idle_connection_is_closed() -> None:
    # Pings every 0.1 s, answered by the client: pongs are not SIP activity.
    srv = await start_ws(idle_timeout=0.6, ws_ping=0.1)
    try:
        ws = await _client(srv.url)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert len(srv.transports.ws_pools["WS"]) == 0
    finally:
        srv.layer.close()
        await srv.transports.close()


# -- WebSocket pings, with a hand-made client that decides whether to answer ------------


async def _raw_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /sip HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101") and b"sip" in head.lower()
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), timeout)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    payload = await reader.readexactly(length) if length else b""
    return first & 0x0F, payload


def _masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + body


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> int | None:
    """Read to the end; the close code the server sent, if it sent a close frame."""
    code = None
    while True:
        try:
            opcode, payload = await _read_frame(reader, timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return code
        if opcode == 0x8 and len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]


async def test_broken_fragmentation_is_refused() -> None:
    srv = await start_ws(message_timeout=0.5)
    try:
        # A continuation frame with no message started: protocol error (RFC 6455 §5.4).
        reader, writer = await _raw_handshake(srv.port)
        writer.write(_masked(0x0, b"orphan"))
        assert await _closed_by_server(reader, 3) == 1002
        writer.close()
        # A new message inside a fragmented one: protocol error too.
        reader, writer = await _raw_handshake(srv.port)
        writer.write(_masked(0x1, b"MESSAGE sip:a", fin=False) + _masked(0x1, b"again"))
        assert await _closed_by_server(reader, 3) == 1002
        writer.close()
        # A fragmented message that is never finished: cut at limits.message_timeout.
        reader, writer = await _raw_handshake(srv.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(_masked(0x1, b"MESSAGE sip:a", fin=False))
        await _closed_by_server(reader, 3)
        assert loop.time() - started < 2.0
        assert srv.transports.ws_pools["WS"].message_timeouts == 1
        writer.close()
        assert srv.seen == []
    finally:
        srv.layer.close()
        await srv.transports.close()


async def test_pings_are_sent_and_a_silent_client_is_dropped() -> None:
    srv = await start_ws(ws_ping=0.3)
    try:
        # A client that answers every ping stays connected well past the timeout.
        reader, writer = await _raw_handshake(srv.port)
        pings = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:
            opcode, payload = await _read_frame(reader, 2)
            assert opcode == 0x9  # ping
            pings += 1
            writer.write(_masked(0xA, payload))
        assert pings >= 2
        assert len(srv.transports.ws_pools["WS"]) == 1
        writer.close()

        # One that stops answering is dropped after the ping and as long again.
        reader, writer = await _raw_handshake(srv.port)
        opcode, _ = await _read_frame(reader, 2)
        assert opcode == 0x9
        started = loop.time()
        while not reader.at_eof():  # a close frame, then the end of the stream
            await asyncio.wait_for(reader.read(4096), 3)
        assert loop.time() - started < 2.0
        for _ in range(50):
            if len(srv.transports.ws_pools["WS"]) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(srv.transports.ws_pools["WS"]) == 0
        assert srv.transports.ws_pools["WS"].ping_timeouts == 1
        writer.close()
    finally:
        srv.layer.close()
        await srv.transports.close()


async def test_send_over_ws_without_a_ws_listener_fails_at_once() -> None:
    transports = Transports()  # no ws: listener, so no WebSocket connection can exist
    try:
        with pytest.raises(TransportError, match="no WSS connection"):
            transports.send(b"x", Target("127.0.0.1", 40000, "WSS", True), _no_error)
    finally:
        await transports.close()


async def test_a_frame_trickling_in_is_cut_off_by_the_unanswered_ping() -> None:
    # A peer in the middle of a frame cannot answer a ping (control frames go between
    # frames, RFC 6455 §5.5): bytes trickling in hold a connection 2 x ws_ping at most.
    srv = await start_ws(ws_ping=0.3)
    try:
        reader, writer = await _raw_handshake(srv.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(bytes([0x81, 0x80 | 126]) + struct.pack("!H", 1000) + os.urandom(4))
        for _ in range(100):  # 10 s of trickling if nothing stops it
            if reader.at_eof() or writer.is_closing():
                break
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
            if len(srv.transports.ws_pools["WS"]) == 0:
                break
        assert len(srv.transports.ws_pools["WS"]) == 0
        assert loop.time() - started < 2.0
        assert srv.transports.ws_pools["WS"].ping_timeouts == 1
        writer.close()
    finally:
        srv.layer.close()
        await srv.transports.close()

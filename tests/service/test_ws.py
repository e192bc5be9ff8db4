"""SIP over WebSocket (RFC 7118) through the whole server, on SQLite and PostgreSQL.

The phones are what a browser's JsSIP does: a ``websockets`` client offering the
``sip`` subprotocol, an ``.invalid`` Via host and Contact (RFC 7118 §5.2), so the
only way to reach them is the connection they opened.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from msilo.sip.message import SipRequest, SipResponse
from msilo.sip.parser import parse_message
from tests.service.conftest import Running, ServerFactory
from tests.service.sipua import free_port
from tests.service.test_tls import certificate

__all__ = ["certificate"]  # the fixture, shared with the TLS tests

_seq = itertools.count(1)


class WsPhone:
    """A browser-like SIP phone on one WebSocket connection."""

    def __init__(self, user: str, ws: ClientConnection, transport: str = "WS") -> None:
        self.user = user
        self.ws = ws
        self.transport = transport
        self.host = f"{uuid.uuid4().hex[:12]}.invalid"  # what JsSIP puts in Via and Contact
        self.instance = f"urn:uuid:{uuid.uuid4()}"

    @classmethod
    async def connect(cls, user: str, url: str, **kwargs: Any) -> WsPhone:
        ws = await connect(url, subprotocols=["sip"], ping_interval=None, open_timeout=5, **kwargs)  # type: ignore[list-item]
        return cls(user, ws, "WSS" if url.startswith("wss:") else "WS")

    async def read(self, timeout: float = 5.0) -> SipRequest | SipResponse:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        return parse_message(frame.encode() if isinstance(frame, str) else frame)

    async def response(self) -> SipResponse:
        message = await self.read()
        while isinstance(message, SipResponse) and message.status < 200:
            message = await self.read()
        assert isinstance(message, SipResponse), message
        return message

    async def send(self, method: str, uri: str, headers: list[str], body: bytes = b"") -> None:
        n = next(_seq)
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{self.transport} {self.host};branch=z9hG4bKws{n}{self.user}",
            "Max-Forwards: 69",
            f"From: <sip:{self.user}@127.0.0.1>;tag=ws{n}",
            f"Call-ID: ws-{self.user}-{n}-{self.host}",
            f"CSeq: {n} {method}",
            *headers,
            f"Content-Length: {len(body)}",
        ]
        await self.ws.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def register(self, expires: int = 600) -> SipResponse:
        contact = (
            f'<sip:{self.user}x@{self.host};transport=ws>;+sip.instance="<{self.instance}>"'
            ";reg-id=1;expires=" + str(expires)
        )
        await self.send(
            "REGISTER",
            "sip:127.0.0.1",
            [
                f"To: <sip:{self.user}@127.0.0.1>",
                f"Contact: {contact}",
                "Supported: path, outbound",
            ],
        )
        return await self.response()

    async def message(self, to: str, text: str) -> None:
        await self.send(
            "MESSAGE", f"sip:{to}@127.0.0.1",
            [f"To: <sip:{to}@127.0.0.1>", "Content-Type: text/plain"], text.encode(),
        )  # fmt: skip

    async def answer(self, request: SipRequest, status: int = 200, reason: str = "OK") -> None:
        lines = [f"SIP/2.0 {status} {reason}"]
        for name, value in request.headers:
            if name in ("via", "from", "call-id", "cseq"):
                lines.append(f"{name}: {value}")
            elif name == "to":
                lines.append(f"to: {value};tag=browser")
        await self.ws.send("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n")

    async def close(self) -> None:
        await self.ws.close()


async def _ws_server(server: ServerFactory, *overrides: str) -> tuple[Running, str]:
    udp, ws = free_port(), free_port()
    srv = await server(f'server.listen=["udp:127.0.0.1:{udp}", "ws:127.0.0.1:{ws}"]', *overrides)
    srv.address = ("127.0.0.1", udp)
    return srv, f"ws://127.0.0.1:{ws}/"


async def _stored(srv: Running, user: str, count: int) -> None:
    for _ in range(100):
        if await srv.store.count(user, "127.0.0.1") == count:
            return
        await asyncio.sleep(0.05)
    assert await srv.store.count(user, "127.0.0.1") == count


async def test_register_over_ws_stores_the_connection(server: ServerFactory) -> None:
    srv, url = await _ws_server(server)
    bob = await WsPhone.connect("bob", url)
    try:
        ok = await bob.register()
        assert ok.status == 200
        assert any(bob.host in value for name, value in ok.headers if name == "contact")
        bindings = await srv.store.lookup_bindings("bob", "127.0.0.1", now=int(time.time()))
        assert [b.transport for b in bindings] == ["ws"]
        # Reached over the connection it came from (RFC 7118 §5.2), never by its Contact.
        assert bindings[0].received == f"ws:127.0.0.1:{bob.ws.local_address[1]}"
    finally:
        await bob.close()


async def test_stored_while_offline_then_dumped_over_the_registration_connection(
    server: ServerFactory,
) -> None:
    srv, url = await _ws_server(server)
    alice = await WsPhone.connect("alice", url)
    bob: WsPhone | None = None
    try:
        await alice.message("bob", "while you were out")
        assert (await alice.response()).status == 202
        await _stored(srv, "bob", 1)
        bob = await WsPhone.connect("bob", url)
        assert (await bob.register()).status == 200
        dumped = await bob.read()
        assert isinstance(dumped, SipRequest) and dumped.method == "MESSAGE"
        assert dumped.body.endswith(b"while you were out")
        assert dumped.via is not None and dumped.via.transport == "WS"
        assert bob.host in dumped.uri  # the request-URI is the registered Contact
        await bob.answer(dumped)
        await _stored(srv, "bob", 0)
    finally:
        await alice.close()
        if bob is not None:
            await bob.close()


async def test_relay_between_two_ws_users(server: ServerFactory) -> None:
    srv, url = await _ws_server(server)
    alice = await WsPhone.connect("alice", url)
    bob = await WsPhone.connect("bob", url)
    try:
        assert (await bob.register()).status == 200
        await alice.message("bob", "hi bob")
        incoming = await bob.read()
        assert isinstance(incoming, SipRequest) and incoming.body == b"hi bob"
        await bob.answer(incoming)
        assert (await alice.response()).status == 200
        assert await srv.store.count("bob", "127.0.0.1") == 0
    finally:
        await alice.close()
        await bob.close()


async def test_ws_and_udp_users_reach_each_other(server: ServerFactory) -> None:
    srv, url = await _ws_server(server)
    udp_alice = await srv.agent("alice", domain="127.0.0.1")
    assert (await udp_alice.register()).status == 200
    bob = await WsPhone.connect("bob", url)
    try:
        assert (await bob.register()).status == 200
        # UDP -> WS
        relayed = asyncio.ensure_future(udp_alice.message("sip:bob@127.0.0.1", "from udp"))
        incoming = await bob.read()
        assert isinstance(incoming, SipRequest) and incoming.body == b"from udp"
        await bob.answer(incoming)
        assert (await relayed).status == 200
        # WS -> UDP
        await bob.message("alice", "from ws")
        assert (await bob.response()).status == 200
        got = await udp_alice.wait_requests(1)
        assert got[0].request.body == b"from ws"
    finally:
        await bob.close()


async def test_closed_connection_makes_the_binding_unreachable_at_once(
    server: ServerFactory,
) -> None:
    srv, url = await _ws_server(server)
    bob = await WsPhone.connect("bob", url)
    assert (await bob.register()).status == 200
    await bob.close()  # the tab is closed; the binding has 600 s left
    pools = srv.worker.transports.ws_pools  # type: ignore[union-attr]
    for _ in range(100):
        if len(pools["WS"]) == 0:
            break
        await asyncio.sleep(0.02)
    udp_alice = await srv.agent("alice", domain="127.0.0.1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await udp_alice.message("sip:bob@127.0.0.1", "are you there")
    elapsed = loop.time() - started
    assert reply.status == 202  # stored for him, not lost
    assert elapsed < 1.5  # no Timer F wait (3.2 s with the test timers)
    await _stored(srv, "bob", 1)
    # The tab opens again: a new connection, a new REGISTER, the dump goes over it.
    again = await WsPhone.connect("bob", url)
    try:
        again.instance = bob.instance  # the same device (JsSIP keeps its instance id)
        assert (await again.register()).status == 200
        dumped = await again.read()
        assert isinstance(dumped, SipRequest) and dumped.body.endswith(b"are you there")
        await again.answer(dumped)
        await _stored(srv, "bob", 0)
    finally:
        await again.close()


async def test_handshakes_refused_by_the_server(server: ServerFactory) -> None:
    _, url = await _ws_server(server, 'server.ws_origins=["https://app.example.com"]')
    with pytest.raises(InvalidStatus) as info:  # no sip subprotocol (RFC 7118 §4.1)
        await connect(url, open_timeout=5)
    assert info.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as info:  # a page from another site
        await WsPhone.connect("eve", url, origin="https://evil.example.net")
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as info:  # not the configured path
        await WsPhone.connect("eve", url + "admin")
    assert info.value.response.status_code == 404
    good = await WsPhone.connect("alice", url, origin="https://app.example.com")
    try:
        assert (await good.register()).status == 200
    finally:
        await good.close()


async def test_wss_register_and_dump(server: ServerFactory, certificate: tuple[str, str]) -> None:
    cert, key = certificate
    udp, wss = free_port(), free_port()
    srv = await server(
        f'server.listen=["udp:127.0.0.1:{udp}", "wss:127.0.0.1:{wss}"]',
        f'tls.certificate="{cert}"', f'tls.private_key="{key}"',
    )  # fmt: skip
    srv.address = ("127.0.0.1", udp)
    udp_alice = await srv.agent("alice", domain="127.0.0.1")
    assert (await udp_alice.message("sip:bob@127.0.0.1", "secure")).status == 202
    context = ssl.create_default_context(cafile=cert)
    bob = await WsPhone.connect("bob", f"wss://127.0.0.1:{wss}/", ssl=context)
    try:
        assert (await bob.register()).status == 200
        dumped = await bob.read()
        assert isinstance(dumped, SipRequest) and dumped.body.endswith(b"secure")
        assert dumped.via is not None and dumped.via.transport == "WSS"
        await bob.answer(dumped)
        await _stored(srv, "bob", 0)
    finally:
        await bob.close()


async def test_a_ws_listener_alone_serves_browsers(server: ServerFactory) -> None:
    # The README's command: `server.listen=["ws:127.0.0.1:8080"]`, no UDP or TCP at all.
    port = free_port()
    srv = await server(f'server.listen=["ws:127.0.0.1:{port}"]', 'server.ws_path="/sip"')
    url = f"ws://127.0.0.1:{port}/sip"
    alice = await WsPhone.connect("alice", url)
    bob: WsPhone | None = None
    try:
        await alice.message("bob", "ws only")
        assert (await alice.response()).status == 202
        bob = await WsPhone.connect("bob", url)
        assert (await bob.register()).status == 200
        dumped = await bob.read()
        assert isinstance(dumped, SipRequest) and dumped.body.endswith(b"ws only")
        assert dumped.via is not None and dumped.via.port == port
        await bob.answer(dumped)
        await _stored(srv, "bob", 0)
    finally:
        await alice.close()
        if bob is not None:
            await bob.close()

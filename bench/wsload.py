"""What the SIP-over-WebSocket benchmarks share: msilo with a ``ws:`` listener, and a
WebSocket SIP client of our own (picows, the library msilo's listener uses: Cython
framing, so the load generator costs little of the two CPUs it shares with msilo).

The client is what a browser's JsSIP sends (RFC 7118): the ``sip`` subprotocol, a Via
and Contact on an ``.invalid`` host, so msilo can only answer over the connection.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.e2e.servers import HOST
from bench.streamserver import (
    StreamMsilo,
    connections_per_pid,
    cpu_seconds,
    raise_nofile,
    rss_kib,
)

__all__ = [
    "SipWs",
    "WsMsilo",
    "connect",
    "connections_per_pid",
    "cpu_seconds",
    "header",
    "message",
    "raise_nofile",
    "register",
    "rss_kib",
    "status_of",
]

SIP_PROTOCOL = {"Sec-WebSocket-Protocol": "sip"}  # RFC 7118 §4.1: required by msilo
BODY = "from a ws client: lorem ipsum dolor sit amet, consectetur adipiscing elit."


class WsMsilo(StreamMsilo):
    """``msilo serve`` (registrar mode, PostgreSQL) with a UDP and a ``ws:`` listener."""

    scheme = "ws"

    @property
    def ws_port(self) -> int:
        return self.stream_port

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.stream_port}/"


class SipWs(WSListener):  # type: ignore[misc]
    """One client connection; each SIP message received goes to ``on_message``."""

    def __init__(self, on_message: Callable[[bytes, float], None] | None = None) -> None:
        self.on_message = on_message
        self.transport: WSTransport | None = None
        self.host = f"{uuid.uuid4().hex[:12]}.invalid"  # RFC 7118 §5.2, as JsSIP does
        self.waiter: asyncio.Future[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT or frame.msg_type is WSMsgType.BINARY:
            data = frame.get_payload_as_bytes()
            if self.on_message is not None:
                self.on_message(data, time.monotonic())
            if self.waiter is not None and not self.waiter.done() and data[8:9] != b"1":
                self.waiter.set_result(data)
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.disconnect()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, data)

    async def request(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send one request and wait for its final response (one at a time)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.send(data)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def connect(
    url: str,
    on_message: Callable[[bytes, float], None] | None = None,
    *,
    timeout: float = 10.0,
) -> SipWs:
    """A connected client (the handshake done, ``sip`` agreed)."""
    _, listener = await ws_connect(
        lambda: SipWs(on_message),
        url,
        extra_headers=SIP_PROTOCOL,
        websocket_handshake_timeout=timeout,
        read_buffer_init_size=1024,  # the bench holds 10,000 of these
    )
    assert isinstance(listener, SipWs)
    return listener


def register(conn: SipWs, user: str, n: int, expires: int = 600) -> bytes:
    """A REGISTER like JsSIP's: outbound contact on the connection's ``.invalid`` host."""
    host = conn.host
    return (
        f"REGISTER sip:{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/WS {host};branch=z9hG4bKr{n}x{host[:8]}\r\n"
        "Max-Forwards: 69\r\n"
        f"From: <sip:{user}@{HOST}>;tag=r{n}\r\n"
        f"To: <sip:{user}@{HOST}>\r\n"
        f"Call-ID: reg-{user}-{host}\r\n"
        f"CSeq: {n} REGISTER\r\n"
        f'Contact: <sip:{user}x@{host};transport=ws>;+sip.instance="<urn:uuid:{uuid.uuid4()}>"'
        f";reg-id=1;expires={expires}\r\n"
        "Supported: path, outbound\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def message(conn: SipWs, to: str, n: int, call_id: str) -> bytes:
    """A ~100-byte text/plain MESSAGE to ``to`` (the sipp store scenario's size)."""
    body = f"Offline message {n} for {to} {BODY}".encode()
    host = conn.host
    return (
        f"MESSAGE sip:{to}@{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/WS {host};branch=z9hG4bKm{call_id}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:wsload@{HOST}>;tag=m{n}\r\n"
        f"To: <sip:{to}@{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 MESSAGE\r\n"
        "User-Agent: bench wsload\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def status_of(response: bytes) -> int:
    """The status code of a response, 0 for a request."""
    if not response.startswith(b"SIP/2.0 "):
        return 0
    return int(response[8:11])


def header(response: bytes, name: bytes) -> bytes:
    """The value of the first header ``name`` (as msilo writes it: ``Name: value``)."""
    start = response.find(b"\r\n" + name + b": ")
    if start < 0:
        return b""
    start += len(name) + 4
    return response[start : response.find(b"\r\n", start)]

"""Real sockets on 127.0.0.1, on uvloop: a minimal SIP server and client helpers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from msilo.errors import ParseError
from msilo.sip import parser
from msilo.sip.message import SipRequest, SipResponse
from msilo.transaction import ServerTransaction, TransactionLayer
from msilo.transport import Transports

PROBE = (
    b"OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-p\r\n"
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: p\r\nCSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test here runs on uvloop, like the server."""
    return {"uvloop": uvloop.new_event_loop}


def _best_parser() -> Callable[[bytes], SipRequest | SipResponse]:
    try:
        parser.parse_message(PROBE)
    except ParseError:  # the C extension is still the placeholder
        return parser.parse_message_py
    return parser.parse_message


PARSE = _best_parser()


def parse(data: bytes) -> SipRequest | SipResponse:
    return PARSE(data)


def parse_response(data: bytes) -> SipResponse:
    message = PARSE(data)
    assert isinstance(message, SipResponse), data
    return message


def parse_request(data: bytes) -> SipRequest:
    message = PARSE(data)
    assert isinstance(message, SipRequest), data
    return message


@dataclass
class MiniServer:
    """msilo's transport + transaction layers with a handler that answers 200."""

    transports: Transports
    layer: TransactionLayer
    port: int
    seen: list[tuple[SipRequest, str, Any]] = field(default_factory=list)

    @property
    def udp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def free_port_pair() -> tuple[socket.socket, socket.socket]:
    """Bound-but-unused UDP+TCP sockets on one free port (keeps it reserved for the caller)."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise RuntimeError("no free port pair")


async def start_server(
    *,
    idle_timeout: float = 300.0,
    max_message: int = 65535,
    reuse_port: bool = True,
    port: int | None = None,
) -> MiniServer:
    transports = Transports(max_message=max_message, idle_timeout=idle_timeout)
    seen: list[tuple[SipRequest, str, Any]] = []

    def handler(request: SipRequest, txn: ServerTransaction) -> None:
        seen.append((request, txn.source.transport, txn.source.addr))
        txn.respond(200, "OK")

    layer = TransactionLayer(handler, transports.send, sent_by=transports.sent_by, parse=PARSE)
    transports.on_message = layer.receive
    if port is None:
        udp, tcp = free_port_pair()
        port = udp.getsockname()[1]
        udp.close()
        tcp.close()
    await transports.listen_udp("127.0.0.1", port, reuse_port=reuse_port)
    await transports.listen_tcp("127.0.0.1", port, reuse_port=reuse_port)
    await transports.open_client_udp("127.0.0.1", 0)
    return MiniServer(transports, layer, port, seen)


@pytest.fixture
async def server() -> AsyncIterator[MiniServer]:
    srv = await start_server()
    try:
        yield srv
    finally:
        srv.layer.close()
        await srv.transports.close()


class UdpPeer(asyncio.DatagramProtocol):
    """A bare UDP socket for the test side: collects what arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def receive(self, timeout: float = 3.0) -> tuple[bytes, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_peer(port: int = 0) -> UdpPeer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=("127.0.0.1", port))
    return peer


async def read_message(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Read one Content-Length framed message from a stream."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            length = int(value.strip())
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return head + body

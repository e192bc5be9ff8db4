"""Protocol edges a running server must answer as RFC 4475 and RFC 3261 say (real sockets)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.service.conftest import ServerFactory
from tests.service.sipua import UserAgent

TORTURE = Path(__file__).resolve().parent.parent / "data" / "torture"


def _from_here(data: bytes, port: int) -> bytes:
    """The torture message with its Via pointing back at us (the RFC's 192.0.2.x hosts)."""
    return re.sub(
        rb"Via: SIP/2\.0/UDP [^;\r]+;", f"Via: SIP/2.0/UDP 127.0.0.1:{port};rport;".encode(), data
    )


async def _answer(ua: UserAgent, data: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes over UDP; the first datagram that comes back."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    original = ua._datagram

    def seen(raw: bytes, addr: tuple[str, int]) -> None:
        if not got.done():
            got.set_result(raw)

    ua._datagram = seen  # type: ignore[method-assign]
    try:
        ua.send_raw(data)
        return await asyncio.wait_for(got, timeout)
    finally:
        ua._datagram = original  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("name", "status_line"),
    [
        ("invalid/lwsruri", b"SIP/2.0 400 Bad Request"),
        ("invalid/lwsstart", b"SIP/2.0 400 Bad Request"),
        ("invalid/insuf", b"SIP/2.0 400 Missing To, From, Call-ID"),
        ("valid/unksm2", b"SIP/2.0 400 Bad Request"),  # a To that is no SIP URI: not 416
    ],
)
async def test_rfc4475_messages_get_400(
    server: ServerFactory, name: str, status_line: bytes
) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    data = _from_here((TORTURE / f"{name}.dat").read_bytes(), ua.port)
    reply = await _answer(ua, data)
    assert reply.split(b"\r\n", 1)[0] == status_line


@pytest.mark.parametrize("header", ["Call-ID", "From", "To", "CSeq"])
async def test_a_message_missing_a_mandatory_header_gets_400_naming_it(
    server: ServerFactory, header: str
) -> None:
    srv = await server("server.mode=silo")
    ua = await srv.agent("alice")
    data, _ = ua.build("MESSAGE", "sip:bob@127.0.0.1", body=b"hi")
    data = re.sub(rf"\r\n{header}: [^\r]*".encode(), b"", data)
    reply = await _answer(ua, data)
    assert reply.split(b"\r\n", 1)[0] == f"SIP/2.0 400 Missing {header}".encode()
    assert await srv.store.count("bob", "127.0.0.1") == 0


async def test_a_register_followed_by_garbage_gets_its_200_before_the_close(
    server: ServerFactory,
) -> None:
    srv = await server()
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        port = writer.get_extra_info("sockname")[1]
        register = (
            f"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKg1"
            f"\r\nFrom: <sip:alice@127.0.0.1>;tag=g1\r\nTo: <sip:alice@127.0.0.1>\r\n"
            f"Call-ID: garbage@x\r\nCSeq: 1 REGISTER\r\n"
            f"Contact: <sip:alice@127.0.0.1:{port};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        writer.write(register + b"\x16\x03\x01 this is not SIP at all\r\n\r\n")  # one segment
        rest = await asyncio.wait_for(reader.read(), 10)  # everything until the server closes
        assert rest.startswith(b"SIP/2.0 200 OK\r\n")
        assert b"Contact: <sip:alice@127.0.0.1:" in rest
    finally:
        writer.close()
    bindings = await srv.store.lookup_bindings("alice", "127.0.0.1", now=0)
    assert len(bindings) == 1


@pytest.mark.parametrize("mode", ["registrar", "silo"])
async def test_a_register_whose_to_is_no_sip_uri_gets_400_in_every_mode(
    server: ServerFactory, mode: str
) -> None:
    srv = await server(f"server.mode={mode}", 'server.domains=["example.com"]')
    ua = await srv.agent("alice")
    data = _from_here((TORTURE / "valid" / "unksm2.dat").read_bytes(), ua.port)
    reply = await _answer(ua, data)
    assert reply.split(b"\r\n", 1)[0] == b"SIP/2.0 400 Bad Request"

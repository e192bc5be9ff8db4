"""SIP over TLS: REGISTER, MESSAGE, dump and relay over one TLS connection, with a test
certificate made here by openssl."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from msilo.errors import ConfigError
from msilo.sip.message import SipRequest, SipResponse
from msilo.sip.parser import parse_message
from tests.service.conftest import Running, ServerFactory
from tests.service.sipua import free_port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


class TlsPhone:
    """A SIP phone that keeps one TLS connection to the server."""

    def __init__(self, user: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.user = user
        self.reader = reader
        self.writer = writer
        self.port = writer.get_extra_info("sockname")[1]
        self.n = 0

    @classmethod
    async def connect(cls, user: str, port: int, cafile: str) -> TlsPhone:
        context = ssl.create_default_context(cafile=cafile)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        return cls(user, reader, writer)

    async def read(self) -> SipRequest | SipResponse:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        return parse_message(head + body)

    def send(self, method: str, uri: str, headers: list[str], body: bytes = b"") -> None:
        self.n += 1
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/TLS 127.0.0.1:{self.port};branch=z9hG4bKtls{self.n}{self.user}",
            f"From: <sip:{self.user}@127.0.0.1>;tag=tls{self.n}",
            f"Call-ID: tls-{self.user}-{self.n}@x",
            f"CSeq: {self.n} {method}",
            *headers,
            f"Content-Length: {len(body)}",
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def answer(self, request: SipRequest, status: int = 200, reason: str = "OK") -> None:
        lines = [f"SIP/2.0 {status} {reason}"]
        for name, value in request.headers:
            if name in ("via", "from", "call-id", "cseq"):
                lines.append(f"{name}: {value}")
            elif name == "to":
                lines.append(f"to: {value};tag=phone")
        self.writer.write(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())

    async def register(self) -> SipResponse:
        contact = f"<sip:{self.user}@127.0.0.1:{self.port};transport=tls>"
        self.send("REGISTER", "sip:127.0.0.1", [f"To: <sip:{self.user}@127.0.0.1>",
                                                f"Contact: {contact}", "Expires: 600"])  # fmt: skip
        reply = await self.read()
        assert isinstance(reply, SipResponse)
        return reply

    def close(self) -> None:
        self.writer.close()


async def _tls_server(server: ServerFactory, certificate: tuple[str, str]) -> tuple[Running, int]:
    cert, key = certificate
    udp, tls = free_port(), free_port()
    srv = await server(
        f'server.listen=["udp:127.0.0.1:{udp}", "tls:127.0.0.1:{tls}"]',
        f'tls.certificate="{cert}"', f'tls.private_key="{key}"',
    )  # fmt: skip
    srv.address = ("127.0.0.1", udp)
    return srv, tls


async def test_message_over_tls_is_stored_and_dumped_over_the_same_connection(
    server: ServerFactory, certificate: tuple[str, str]
) -> None:
    srv, tls_port = await _tls_server(server, certificate)
    alice = await TlsPhone.connect("alice", tls_port, certificate[0])
    alice.send("MESSAGE", "sip:bob@127.0.0.1", ["To: <sip:bob@127.0.0.1>",
                                                "Content-Type: text/plain"], b"secret")  # fmt: skip
    stored = await alice.read()
    assert isinstance(stored, SipResponse) and stored.status == 202
    bob = await TlsPhone.connect("bob", tls_port, certificate[0])
    try:
        registered = await bob.register()
        assert registered.status == 200
        dumped = await bob.read()  # over the connection bob registered on (NAT-safe)
        assert isinstance(dumped, SipRequest) and dumped.body.endswith(b"secret")
        assert dumped.via is not None and dumped.via.transport == "TLS"
        bob.answer(dumped)
        for _ in range(50):
            if await srv.store.count("bob", "127.0.0.1") == 0:
                break
            await asyncio.sleep(0.05)
        assert await srv.store.count("bob", "127.0.0.1") == 0
        # bob is online now: a MESSAGE is relayed to him over his TLS connection.
        udp_alice = await srv.agent("alice")
        relayed = asyncio.ensure_future(udp_alice.message("sip:bob@127.0.0.1", "live"))
        incoming = await bob.read()
        assert isinstance(incoming, SipRequest) and incoming.body == b"live"
        bob.answer(incoming)
        assert (await relayed).status == 200
    finally:
        alice.close()
        bob.close()


async def test_missing_certificate_file_is_a_clear_start_up_error(
    server: ServerFactory, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"tls\.certificate: cannot read"):
        await server(
            f'server.listen=["tls:127.0.0.1:{free_port()}"]',
            f'tls.certificate="{tmp_path}/none.pem"', f'tls.private_key="{tmp_path}/none.key"',
        )  # fmt: skip


async def test_a_tls_message_trickling_in_is_cut_off_at_the_deadline(
    server: ServerFactory, certificate: tuple[str, str]
) -> None:
    # limits.message_timeout holds for TLS too: the handshake done, bytes trickling in
    # do not extend it.
    cert, key = certificate
    udp, tls = free_port(), free_port()
    await server(
        f'server.listen=["udp:127.0.0.1:{udp}", "tls:127.0.0.1:{tls}"]',
        f'tls.certificate="{cert}"', f'tls.private_key="{key}"', "limits.message_timeout=1",
    )  # fmt: skip
    slow = await TlsPhone.connect("slow", tls, cert)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for byte in b"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5061":
            slow.writer.write(bytes([byte]))
            await slow.writer.drain()
            await asyncio.sleep(0.2)
            if slow.reader.at_eof():
                break
        closed = await asyncio.wait_for(slow.reader.read(1), 3)
    except (ConnectionError, ssl.SSLError):
        closed = b""
    finally:
        slow.close()
    assert closed == b""
    assert loop.time() - started < 3.5

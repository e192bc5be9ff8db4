"""A device's TCP or WebSocket connection is reachable from every worker (issue 17).

The real ``msilo serve`` with two workers: each accepts its own share of connections
(``SO_REUSEPORT``), so a MESSAGE for bob often reaches the worker that does not hold
bob's connection.  That worker hands the request to the one that does
(:mod:`msilo.transport.handoff`): every MESSAGE is relayed live (200, nothing stored)
and bob gets each once.  When bob's connection is gone the branch fails at once and
the message is stored (202) without waiting for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from msilo.sip.message import SipRequest, SipResponse
from msilo.sip.parser import parse_message
from tests.server.conftest import Instance, sql, wait_for
from tests.service.sipua import free_port

pytestmark = pytest.mark.pg

_seq = itertools.count(1)
ROUNDS = 4  # of ALICES connections each: all on bob's worker 4 times running is 2**-32
ALICES = 8
# Under relay_timeout (5 s, what a branch that never answers costs) and Timer F (32 s).
PROMPT = 3.0


class Phone:
    """A SIP phone on one TCP or WebSocket connection, as a browser's JsSIP is on WS."""

    def __init__(self, user: str, transport: str) -> None:
        self.user = user
        self.transport = transport
        self.host = f"{uuid.uuid4().hex[:12]}.invalid"  # reachable only over its connection
        self.instance = f"urn:uuid:{uuid.uuid4()}"
        self._ws: ClientConnection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, user: str, transport: str, port: int) -> Phone:
        phone = cls(user, transport)
        if transport == "WS":
            phone._ws = await connect(
                f"ws://127.0.0.1:{port}/",
                subprotocols=["sip"],  # type: ignore[list-item]
                ping_interval=None,
                open_timeout=5,
            )
        else:
            phone._reader, phone._writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 5
            )
        return phone

    async def write(self, data: bytes) -> None:
        if self._ws is not None:
            await self._ws.send(data.decode())
        else:
            assert self._writer is not None
            self._writer.write(data)
            await self._writer.drain()

    async def read(self, timeout: float = 10.0) -> SipRequest | SipResponse:
        if self._ws is not None:
            frame = await asyncio.wait_for(self._ws.recv(), timeout)
            return parse_message(frame.encode() if isinstance(frame, str) else frame)
        assert self._reader is not None
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value)
        body = await asyncio.wait_for(self._reader.readexactly(length), timeout)
        return parse_message(head + body)

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
            f"Via: SIP/2.0/{self.transport} {self.host};branch=z9hG4bKx{n}{self.user}",
            "Max-Forwards: 69",
            f"From: <sip:{self.user}@127.0.0.1>;tag=x{n}",
            f"Call-ID: x-{self.user}-{n}-{self.host}",
            f"CSeq: {n} {method}",
            *headers,
            f"Content-Length: {len(body)}",
        ]
        await self.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def register(self) -> SipResponse:
        contact = (
            f"<sip:{self.user}x@{self.host};transport={self.transport.lower()}>"
            f';+sip.instance="<{self.instance}>";reg-id=1;expires=600'
        )
        headers = [f"To: <sip:{self.user}@127.0.0.1>", f"Contact: {contact}", "Allow: MESSAGE"]
        await self.send("REGISTER", "sip:127.0.0.1", headers)
        return await self.response()

    async def message(self, to: str, text: str) -> SipResponse:
        headers = [f"To: <sip:{to}@127.0.0.1>", "Content-Type: text/plain"]
        await self.send("MESSAGE", f"sip:{to}@127.0.0.1", headers, text.encode())
        return await self.response()

    async def answer_messages(self, got: list[bytes]) -> None:
        """Answer every MESSAGE 200 and keep its body, until the connection closes."""
        while True:
            try:
                request = await self.read(timeout=60)
            except (OSError, EOFError, ConnectionClosed, TimeoutError):
                return  # the test closed the connection
            if not isinstance(request, SipRequest) or request.method != "MESSAGE":
                continue
            got.append(request.body)
            lines = ["SIP/2.0 200 OK"]
            for name, value in request.headers:
                if name in ("via", "from", "call-id", "cseq"):
                    lines.append(f"{name}: {value}")
                elif name == "to":
                    lines.append(f"to: {value};tag=bob")
            await self.write(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        elif self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


async def _start(serve: Callable[..., Instance], pg_url: str) -> tuple[Instance, int]:
    sip, ws = free_port(), free_port()
    # The later --set replaces the fixture's listen (UDP and TCP on a port of its own).
    listen = f'["udp:127.0.0.1:{sip}","tcp:127.0.0.1:{sip}","ws:127.0.0.1:{ws}"]'
    srv = serve(pg_url, "server.workers=2", f"server.listen={listen}")
    srv.port, srv.address = sip, ("127.0.0.1", sip)
    await srv.wait_ready(2)
    return srv, ws


async def _gather(calls: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*calls), 30)


@pytest.mark.parametrize("transport", ["TCP", "WS"])
async def test_a_device_connected_to_one_worker_gets_messages_handled_by_any(
    serve: Callable[..., Instance], pg_url: str, transport: str
) -> None:
    srv, ws_port = await _start(serve, pg_url)
    port = ws_port if transport == "WS" else srv.port
    bob = await Phone.open("bob", transport, port)
    got: list[bytes] = []
    answering: asyncio.Future[None] | None = None
    alices: list[Phone] = []
    sent: list[bytes] = []
    try:
        assert (await bob.register()).status == 200
        answering = asyncio.ensure_future(bob.answer_messages(got))
        for round_ in range(ROUNDS):
            # New connections from new ports: the kernel hashes them over both workers.
            batch = [await Phone.open(f"alice{i}", transport, port) for i in range(ALICES)]
            alices += batch
            texts = [f"round {round_} from {a.user}" for a in batch]
            replies = await _gather(
                [a.message("bob", t) for a, t in zip(batch, texts, strict=True)]
            )
            assert [r.status for r in replies] == [200] * ALICES  # relayed live, not stored
            sent += [t.encode() for t in texts]
            if srv.get("/stats")["requests_handed_off"] > 0:
                break
        stats = srv.get("/stats")
        assert stats["requests_handed_off"] > 0, "every alice reached bob's worker"
        assert stats["stored_messages"] == 0 and stats["relayed_messages"] == len(sent)
        assert sorted(got) == sorted(sent)  # each once
        assert await sql(pg_url, "SELECT count(*) FROM silo") == 0

        # Bob's connection closes: the binding is unreachable at once from either worker.
        await bob.close()
        await asyncio.wait_for(answering, 10)
        await asyncio.sleep(0.2)  # the workers see the connection's end
        loop = asyncio.get_running_loop()
        for alice in alices[:ALICES]:  # on both workers (the hashing above)
            started = loop.time()
            reply = await alice.message("bob", f"stored for bob by {alice.user}")
            assert reply.status == 202, reply.status
            assert loop.time() - started < PROMPT  # a failed branch, not a timer
        stats = await wait_for(
            lambda: srv.get("/stats"),
            lambda s: s["stored_messages"] == ALICES,
            10,
            "stored",
            srv,
        )
        assert await sql(pg_url, "SELECT count(*) FROM silo") == ALICES
        assert stats["failed_messages"] == 0
    finally:
        if answering is not None:
            answering.cancel()
        for alice in alices:
            await alice.close()
        await bob.close()

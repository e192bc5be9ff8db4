"""A small SIP user agent for service tests: real UDP or TCP sockets on 127.0.0.1.

It sends requests and awaits their final responses (retransmitting over UDP like
a real UA would not: tests want to see exactly one request unless they resend),
and it receives requests (dumps, relays, notifications) and answers them with a
status the test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from msilo.sip.message import SipRequest, SipResponse
from msilo.sip.parser import parse_message

_seq = itertools.count(1)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed to servers that bind them later come from below the kernel's ephemeral range:
# an outgoing connection opened between the pick and the bind (a database pool, a client)
# then cannot take the port (CI once lost a run to that).
_PICK_RANGE = (10000, max(10001, min(_ephemeral_low(), 32768)))


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, outside the ephemeral range."""
    while True:
        port = random.randrange(*_PICK_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@dataclass
class Received:
    """A request the UA received, and the raw bytes."""

    request: SipRequest
    raw: bytes


@dataclass
class UserAgent:
    """A UDP SIP UA bound to 127.0.0.1 (``port`` 0 = ephemeral)."""

    server: tuple[str, int]
    user: str = "alice"
    domain: str = "example.com"
    answer: Callable[[SipRequest], tuple[int, str] | None] = lambda req: (200, "OK")
    received: list[Received] = field(default_factory=list)
    port: int = 0
    bind_host: str = "127.0.0.1"
    # A socket bound elsewhere (e.g. inside a network namespace) to use instead of binding.
    sock: socket.socket | None = None
    # Where each received request came from, in order (what a NAT let through).
    sources: list[tuple[str, int]] = field(default_factory=list)

    async def start(self) -> UserAgent:
        loop = asyncio.get_running_loop()
        self._responses: dict[str, asyncio.Future[SipResponse]] = {}
        self._got_request = asyncio.Event()
        if self.sock is not None:
            self.sock.setblocking(False)
            self.bind_host, self.port = self.sock.getsockname()[:2]
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=self.sock
            )
        else:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.bind_host, self.port)
            )
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        self.transport.close()

    @property
    def uri(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{self.bind_host}:{self.port}"

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data)
        if message.is_request:
            assert isinstance(message, SipRequest)
            self.received.append(Received(message, data))
            self.sources.append((addr[0], addr[1]))
            self._got_request.set()
            answer = self.answer(message)
            if answer is not None:
                self.transport.sendto(_response_for(data, message, *answer), addr)
            return
        assert isinstance(message, SipResponse)
        if message.status < 200:
            return
        branch = message.via.branch if message.via else None
        future = self._responses.get(branch or "")
        if future is not None and not future.done():
            future.set_result(message)

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are to the server."""
        self.transport.sendto(data, self.server)

    async def request(
        self,
        method: str,
        uri: str,
        *,
        headers: list[str] | None = None,
        body: bytes = b"",
        content_type: str | None = "text/plain",
        call_id: str | None = None,
        cseq: int | None = None,
        from_uri: str | None = None,
        to_uri: str | None = None,
        branch: str | None = None,
        from_tag: str | None = None,
        timeout: float = 5.0,
    ) -> SipResponse:
        """Send a request and await its final response."""
        data, branch = self.build(
            method,
            uri,
            headers=headers,
            body=body,
            content_type=content_type,
            call_id=call_id,
            cseq=cseq,
            from_uri=from_uri,
            to_uri=to_uri,
            branch=branch,
            from_tag=from_tag,
        )
        return await self.send_and_wait(data, branch, timeout)

    async def send_and_wait(self, data: bytes, branch: str, timeout: float = 5.0) -> SipResponse:
        """Send prepared bytes and await the final response for ``branch``."""
        future: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()
        self._responses[branch] = future
        self.send_raw(data)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._responses.pop(branch, None)

    def build(
        self,
        method: str,
        uri: str,
        *,
        headers: list[str] | None = None,
        body: bytes = b"",
        content_type: str | None = "text/plain",
        call_id: str | None = None,
        cseq: int | None = None,
        from_uri: str | None = None,
        to_uri: str | None = None,
        branch: str | None = None,
        from_tag: str | None = None,
    ) -> tuple[bytes, str]:
        """A request as bytes, and its branch."""
        n = next(_seq)
        branch = branch or f"z9hG4bKua{n}x{self.port}"
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.bind_host}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <{from_uri or self.uri}>;tag={from_tag or f'ua{n}'}",
            f"To: <{to_uri or uri}>",
            f"Call-ID: {call_id or f'call{n}-{self.port}@127.0.0.1'}",
            f"CSeq: {cseq or n} {method}",
            *(headers or []),
        ]
        if body and content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, branch

    async def register(
        self,
        expires: int = 3600,
        *,
        headers: list[str] | None = None,
        contact: str | None = None,
        timeout: float = 5.0,
    ) -> SipResponse:
        """REGISTER our contact for our AoR."""
        contact_value = contact if contact is not None else f"<{self.contact}>"
        return await self.request(
            "REGISTER", f"sip:{self.domain}", to_uri=self.uri, content_type=None,
            headers=[f"Contact: {contact_value}", f"Expires: {expires}", *(headers or [])],
            call_id=f"reg-{self.user}-{self.port}@127.0.0.1", timeout=timeout,
        )  # fmt: skip

    async def message(self, to: str, text: str, **kwargs: object) -> SipResponse:
        """Send a text/plain MESSAGE."""
        return await self.request("MESSAGE", to, body=text.encode(), **kwargs)  # type: ignore[arg-type]

    async def wait_requests(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until ``count`` requests arrived in total."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"got {len(self.received)} requests, wanted {count}")
            self._got_request.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._got_request.wait(), remaining)
        return self.received


def _response_for(data: bytes, request: SipRequest, status: int, reason: str) -> bytes:
    lines = [f"SIP/2.0 {status} {reason}"]
    for name, value in request.headers:
        if name in ("via", "from", "call-id", "cseq"):
            lines.append(f"{name}: {value}")
        elif name == "to":
            lines.append(f"to: {value}" + ("" if "tag=" in value else ";tag=uas1"))
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, ua: UserAgent) -> None:
        self.ua = ua

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.ua._datagram(data, addr)

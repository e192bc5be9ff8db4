"""SIP over UDP: one datagram is one message (RFC 3261 §18).

The protocol calls the injected ``on_message`` synchronously for every
datagram — no task per datagram; whatever needs to wait is the upper layer's
business.  Bytes that fail to parse are answered 400 when they look like a
request with enough headers to answer, and dropped otherwise; nothing a peer
sends can stop the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, cast

from msilo.errors import MessageTooLarge, SipError
from msilo.sip.message import Via
from msilo.transport.base import UDP, Address, MessageCallback, Source, answer_error
from msilo.transport.base import udp_response_address as _response_address

log = logging.getLogger("msilo.transport")

# Shortest datagram worth parsing: "A sip:a SIP/2.0\r\n\r\n" is already absurd.
_MIN_MESSAGE: Final = 16


class UdpEndpoint(asyncio.DatagramProtocol):
    """A UDP socket speaking SIP: receives messages and sends requests and responses."""

    def __init__(self, on_message: MessageCallback, *, max_message: int = 65535) -> None:
        self._on_message = on_message
        self._max_message = max_message
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("", 0)
        self.received = 0
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: trust the protocol contract.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local = transport.get_extra_info("sockname")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += 1
        # CRLF keep-alives (RFC 5626 §4.4.1 allows STUN, many UAs send CRLFs) and
        # STUN (first byte 0x00/0x01) are not SIP: ignore them cheaply.
        if len(data) < _MIN_MESSAGE or data[0] < 0x20:
            self.dropped += 1
            return
        if len(data) > self._max_message:
            # D13: oversize is answered 513 (when answerable), never silently dropped.
            self.dropped += 1
            answer_error(
                self, data, addr, MessageTooLarge(f"{len(data)} bytes > {self._max_message}")
            )
            return
        try:
            self._on_message(data, Source(UDP, addr, self))
        except SipError as exc:
            self.dropped += 1
            answer_error(self, data, addr, exc)
        except Exception:
            # A bug upstream must not take the socket down with it.
            self.dropped += 1
            log.exception("event=message_failed transport=UDP peer=%s:%s", addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the transaction's timers handle it.
        log.debug("event=udp_error error=%r", exc)

    def reply(self, data: bytes, addr: Address, via: Via | None) -> None:
        """Send a response (RFC 3261 §18.2.2, RFC 3581 §4)."""
        self.sendto(data, _response_address(addr, via))

    def sendto(self, data: bytes, addr: Address) -> None:
        """Send one datagram; raises OSError when the endpoint is closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise OSError("UDP endpoint is closed")
        transport.sendto(data, addr)

    def close(self) -> None:
        """Close the socket."""
        if self.transport is not None:
            self.transport.close()

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
import socket
import struct
from typing import Any, Final, cast

from msilo.errors import MessageTooLarge, SipError
from msilo.sip.message import Via
from msilo.transport.base import UDP, Address, MessageCallback, Source, answer_error
from msilo.transport.base import udp_response_address as _response_address

log = logging.getLogger("msilo.transport")

# Shortest datagram worth parsing: "A sip:a SIP/2.0\r\n\r\n" is already absurd.
_MIN_MESSAGE: Final = 16
# Linux SO_MEMINFO (4.6+): its first u32 is the bytes the receive queue holds now.
_SO_MEMINFO: Final = 55
# A queued datagram costs the kernel its payload rounded up to a power of two (with the
# skb's shared info) plus the sk_buff itself: 1,280 bytes for 200-600, 2,304 for 700-1,700.
_SKB_SHARED: Final = 320
_SKB_HEAD: Final = 256


def queued_size(length: float) -> int:
    """Receive-buffer bytes one queued datagram of ``length`` bytes takes (Linux)."""
    return (1 << (int(length) + _SKB_SHARED - 1).bit_length()) + _SKB_HEAD


class UdpEndpoint(asyncio.DatagramProtocol):
    """A UDP socket speaking SIP: receives messages and sends requests and responses."""

    def __init__(self, on_message: MessageCallback, *, max_message: int = 65535) -> None:
        self._on_message = on_message
        self._max_message = max_message
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("", 0)
        self.received = 0
        self.dropped = 0
        self._probe: Any = None  # the socket, for SO_MEMINFO (None: not available)
        self._mean_length = 512.0  # of datagrams received lately (backlog in datagrams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: trust the protocol contract.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local = transport.get_extra_info("sockname")
        self._probe = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += 1
        self._mean_length += (len(data) - self._mean_length) * 0.02
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

    def backlog(self) -> int:
        """Datagrams waiting in the socket's receive queue, not yet read (an estimate from
        the queue's bytes; 0 where the kernel does not tell).  Past capacity this is where
        requests wait: the socket buffer holds seconds of traffic, and no timer of ours
        sees it (overload control counts it, RFC 6357 §3.2)."""
        probe = self._probe
        if probe is None:
            return 0
        try:
            raw = probe.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4)
        except (OSError, AttributeError):
            self._probe = None  # not Linux, or not this kernel: say nothing again
            return 0
        (queued,) = struct.unpack("=I", raw)
        return int(queued // queued_size(self._mean_length))

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

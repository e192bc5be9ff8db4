"""What every transport shares: addresses, targets, the reply handle, the callback types.

The transport hands each received message up as ``on_message(data, source)``;
``source`` says where it came from and carries the way back
(:meth:`Source.reply`).  Requests we originate go out through a
:data:`SendFunction`, which reports failures that happen later (DNS, TCP
connect) through its ``on_error`` callback.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol

from msilo.errors import SipError, TransportError
from msilo.sip.message import SipURI, Via

log = logging.getLogger("msilo.transport")

Address = tuple[Any, ...]  # (host, port) or an IPv6 (host, port, flowinfo, scope_id)

UDP: Final = "UDP"
TCP: Final = "TCP"
TLS: Final = "TLS"
RELIABLE: Final = frozenset({"TCP", "TLS", "WS", "WSS", "SCTP"})

# RFC 3261 §18.1.1: a request larger than 1300 bytes (path MTU unknown) goes
# over a congestion-controlled transport.
UDP_SIZE_LIMIT: Final = 1300

DEFAULT_PORTS: Final = {"sip": 5060, "sips": 5061}


class Channel(Protocol):
    """The way back to a peer: a UDP socket or a TCP connection."""

    def reply(self, data: bytes, addr: Address, via: Via | None) -> None: ...


class Source:
    """Where a received message came from, and how to answer it."""

    __slots__ = ("addr", "channel", "transport")

    def __init__(self, transport: str, addr: Address, channel: Channel) -> None:
        self.transport = transport
        self.addr = addr
        self.channel = channel

    @property
    def reliable(self) -> bool:
        """True for stream transports (no retransmissions, Timers J/K are zero)."""
        return self.transport in RELIABLE

    @property
    def ip(self) -> str:
        return str(self.addr[0])

    @property
    def port(self) -> int:
        return int(self.addr[1])

    def reply(self, data: bytes, via: Via | None = None) -> None:
        """Send a response to this source following RFC 3261 §18.2.2 / RFC 3581 §4."""
        self.channel.reply(data, self.addr, via)

    def __repr__(self) -> str:
        return f"Source({self.transport} {self.addr[0]}:{self.addr[1]})"


class Target(NamedTuple):
    """Where to send a request: the next hop's address and transport."""

    host: str
    port: int = 5060
    transport: str = UDP
    # The URI named its transport (``;transport=udp``): never switch it (§18.1.1).
    explicit: bool = False
    # A host name without a port: locate it with SRV records first (RFC 3263 §4.2).
    srv: bool = False

    @classmethod
    def from_uri(cls, uri: SipURI) -> Target:
        """The next hop for a parsed SIP URI (RFC 3263: SRV, then A/AAAA; no NAPTR).

        ``maddr`` overrides the host (RFC 3261 §19.1.1); sips means TLS.
        """
        params = uri.params
        transport = params.get("transport")
        host = (params.get("maddr") or uri.host).strip("[]")
        port = uri.port or DEFAULT_PORTS.get(uri.scheme, 5060)
        srv = uri.port is None and not is_ip(host)
        if transport:
            return cls(host, port, transport.upper(), True, srv)
        return cls(host, port, "TLS" if uri.scheme == "sips" else UDP, False, srv)


ErrorCallback = Callable[[BaseException], None]
SendFunction = Callable[[bytes, Target, ErrorCallback], None]
MessageCallback = Callable[[bytes, Source], None]


def select_transport(target: Target, size: int) -> str:
    """The transport a request of ``size`` bytes really uses towards ``target``.

    RFC 3261 §18.1.1: over 1300 bytes, UDP becomes TCP.  We take the target as
    allowing TCP unless its URI said ``transport=udp`` explicitly: nothing else
    tells us TCP is refused, and a failed TCP connect completes the client
    transaction with 503 like any transport error (§17.1.4).
    """
    if target.transport == UDP and size > UDP_SIZE_LIMIT and not target.explicit:
        return TCP
    return target.transport


@functools.lru_cache(maxsize=4096)  # every request we send asks this of its target
def is_ip(host: str) -> bool:
    """True for an IPv4 or IPv6 literal (brackets allowed)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def udp_response_address(addr: Address, via: Via | None) -> Address:
    """Destination of a UDP response, RFC 3261 §18.2.2 with RFC 3581 §4.

    The server records the source IP as ``received`` (§18.2.1), so the answer
    goes to the source IP; to the source port when the top Via asked for
    ``rport``, else to the sent-by port (5060 when absent).  ``maddr`` is not
    honoured.
    """
    if via is None or "rport" in via.params:
        return addr
    port = via.port or 5060
    if port == addr[1]:
        return addr
    return (addr[0], port, *addr[2:])


def answer_error(channel: Channel, data: bytes, addr: Address, exc: SipError) -> bool:
    """Answer bytes that could not be handled with ``exc``'s status; False when dropped."""
    from msilo.sip.build import build_error_response

    response = build_error_response(data, exc.status, exc.reason)
    if response is None:
        log.debug("event=dropped reason=%r peer=%s:%s", exc.detail, addr[0], addr[1])
        return False
    log.debug(
        "event=rejected status=%d reason=%r peer=%s:%s", exc.status, exc.detail, addr[0], addr[1]
    )
    # A malformed request's Via cannot be trusted: answer where it came from.
    channel.reply(response, addr, None)
    return True


__all__ = [
    "RELIABLE",
    "TCP",
    "UDP",
    "UDP_SIZE_LIMIT",
    "Address",
    "Channel",
    "ErrorCallback",
    "MessageCallback",
    "SendFunction",
    "Source",
    "Target",
    "TransportError",
    "is_ip",
    "select_transport",
    "udp_response_address",
]

"""HEP v3 (the Homer Encapsulation Protocol) export of the SIP messages a worker sees.

HEP v3 is what Homer, heplify-server and ``sngrep -L`` read: each captured message
travels in one UDP datagram made of a 6-byte header (``HEP3`` and the total length)
and TLV chunks (vendor id, type id, length including the chunk's own 6 bytes, value),
every integer in network byte order.  msilo sends the generic chunks (vendor 0)
a capture server needs to rebuild the exchange: addresses, ports, time, transport,
protocol type SIP, capture agent id, the Call-ID as correlation id, and the message.

Capture must never slow or break SIP: the socket is non-blocking and a datagram that
cannot be sent is dropped (and counted), never retried.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct

from msilo.errors import ConfigError

log = logging.getLogger("msilo.hep")

# Generic chunk types (vendor id 0x0000) of the HEP v3 specification.
IP_FAMILY = 0x0001  # uint8: 2 = IPv4, 10 = IPv6
IP_PROTO = 0x0002  # uint8: 17 = UDP, 6 = TCP
IPV4_SRC = 0x0003
IPV4_DST = 0x0004
IPV6_SRC = 0x0005
IPV6_DST = 0x0006
SRC_PORT = 0x0007  # uint16
DST_PORT = 0x0008  # uint16
TIME_SEC = 0x0009  # uint32, seconds since the epoch
TIME_USEC = 0x000A  # uint32, microseconds added to TIME_SEC
PROTO_TYPE = 0x000B  # uint8: 1 = SIP
CAPTURE_ID = 0x000C  # uint32, the capture agent
PAYLOAD = 0x000F  # the captured message
CORRELATION_ID = 0x0011  # string: the Call-ID, so a capture server can group a dialog

FAMILY_IPV4 = 2
FAMILY_IPV6 = 10
PROTO_UDP = 17
PROTO_TCP = 6
PROTO_SIP = 1
MAX_DATAGRAM = 65507  # IPv4 UDP payload limit; a larger capture is dropped
MAX_PAYLOAD = MAX_DATAGRAM - 512  # room for the header and every other chunk

_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.I | re.M)
_HEP_URL = re.compile(r"^udp:(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(\d{1,5})$")


def _chunk(kind: int, value: bytes) -> bytes:
    return struct.pack("!HHH", 0, kind, 6 + len(value)) + value


def encode(
    payload: bytes,
    *,
    transport: str,
    src: tuple[str, int],
    dst: tuple[str, int],
    timestamp: float,
    capture_id: int,
    correlation: bytes | None = None,
) -> bytes:
    """One HEP v3 packet for a SIP message that went from ``src`` to ``dst``.

    Raises ValueError for a message too big for one datagram (lengths are 16-bit).
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a {len(payload)}-byte message does not fit in one HEP datagram")
    source = _ip(src[0])
    target = _ip(dst[0])
    if source.version != target.version:
        # An IPv4 peer seen on a dual-stack socket: both ends must share a family.
        source = _mapped(source)
        target = _mapped(target)
    v6 = source.version == 6
    seconds = int(timestamp)
    micros = round((timestamp - seconds) * 1_000_000) % 1_000_000
    # TLS is TCP underneath (RFC 3261 §26.2.1): capture servers know TCP and UDP.
    proto = PROTO_UDP if transport.upper() == "UDP" else PROTO_TCP
    parts = [
        _chunk(IP_FAMILY, bytes([FAMILY_IPV6 if v6 else FAMILY_IPV4])),
        _chunk(IP_PROTO, bytes([proto])),
        _chunk(IPV6_SRC if v6 else IPV4_SRC, source.packed),
        _chunk(IPV6_DST if v6 else IPV4_DST, target.packed),
        _chunk(SRC_PORT, struct.pack("!H", src[1] & 0xFFFF)),
        _chunk(DST_PORT, struct.pack("!H", dst[1] & 0xFFFF)),
        _chunk(TIME_SEC, struct.pack("!I", seconds & 0xFFFFFFFF)),
        _chunk(TIME_USEC, struct.pack("!I", micros)),
        _chunk(PROTO_TYPE, bytes([PROTO_SIP])),
        _chunk(CAPTURE_ID, struct.pack("!I", capture_id & 0xFFFFFFFF)),
    ]
    if correlation is None:
        match = _CALL_ID.search(payload)
        correlation = match.group(1).strip() if match else None
    if correlation:
        parts.append(_chunk(CORRELATION_ID, correlation))
    parts.append(_chunk(PAYLOAD, payload))
    body = b"".join(parts)
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # A next hop named by a host name (resolved later by the transport): unknown here.
        return ipaddress.IPv4Address(0)


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if address.version == 6:
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


def parse_hep_url(key: str, value: str) -> tuple[str, int]:
    """``udp:HOST:PORT`` -> (host, port); ConfigError naming ``key`` otherwise."""
    match = _HEP_URL.match(value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(f'{key}: must be udp:HOST:PORT, or "" for off (got {value!r})')
    return match.group(1).strip("[]"), int(match.group(2))


class HepSender:
    """Sends one HEP v3 datagram per captured message to a capture server."""

    def __init__(self, url: str, capture_id: int) -> None:
        host, port = parse_hep_url("server.hep", url)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as exc:
            raise ConfigError(f"server.hep: cannot resolve {host!r} ({exc.strerror})") from None
        self.address: tuple[str, int] = (str(info[4][0]), int(info[4][1]))
        self.capture_id = capture_id
        self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0
        self.dropped = 0

    def capture(
        self,
        payload: bytes,
        transport: str,
        src: tuple[str, int],
        dst: tuple[str, int],
        timestamp: float,
    ) -> None:
        """Send one message; never raises (a capture is best effort)."""
        try:
            packet = encode(
                payload, transport=transport, src=src, dst=dst, timestamp=timestamp,
                capture_id=self.capture_id,
            )  # fmt: skip
            if len(packet) > MAX_DATAGRAM:
                raise ValueError("capture larger than a UDP datagram")
            self.sock.sendto(packet, self.address)
        except (OSError, ValueError) as exc:
            self.dropped += 1
            if self.dropped == 1:
                # Once: a capture server that is down must not flood the log.
                log.warning("event=hep_dropped address=%s error=%s", self.address, exc)
            return
        self.sent += 1

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

"""Binding sockets: shared listening ports (SO_REUSEPORT) and the per-process client port.

Every worker binds its own listening sockets with ``SO_REUSEPORT`` so several
processes share one port and the kernel spreads datagrams and connections
between them.  Requests we send over UDP leave from the listening socket too (a
device behind NAT only hears the address and port it registered to); their
responses, which may land on any worker, are handed to the sender
(:mod:`msilo.transport.handoff`).  A private client socket (no SO_REUSEPORT) is
left only for an address family we do not listen on over UDP, and for the
leader when no worker can send for it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Sequence
from typing import Final

DEFAULT_BACKLOG: Final = 1024
# Big kernel buffers absorb bursts while the loop is busy (the kernel caps them
# at net.core.rmem_max / wmem_max).
SOCKET_BUFFER: Final = 4 * 1024 * 1024


@functools.lru_cache(maxsize=4096)  # asked for every UDP request we send (Via, then send)
def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal (brackets allowed), AF_INET otherwise."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return socket.AF_INET
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _new_socket(
    host: str, kind: socket.SocketKind, *, reuse_port: bool, reuse_addr: bool = True
) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, kind)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - not Linux/BSD
                raise OSError("SO_REUSEPORT is not available on this platform")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One address family per socket: "::" then means IPv6 only, and an
            # IPv4 listener is configured separately.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _set_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        # Limits vary by host; the default buffer is still usable.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def bind_udp(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (shareable with SO_REUSEPORT)."""
    return _bind_udp(host, port, reuse_port=reuse_port, reuse_addr=True)


def _bind_udp(host: str, port: int, *, reuse_port: bool, reuse_addr: bool) -> socket.socket:
    sock = _new_socket(host, socket.SOCK_DGRAM, reuse_port=reuse_port, reuse_addr=reuse_addr)
    try:
        _set_buffers(sock)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_tcp(
    host: str, port: int, *, reuse_port: bool = True, backlog: int = DEFAULT_BACKLOG
) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (shareable with SO_REUSEPORT)."""
    sock = _new_socket(host, socket.SOCK_STREAM, reuse_port=reuse_port)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def bind_client_udp(host: str, port: int = 0) -> socket.socket:
    """This process's own UDP socket for the requests it sends (no SO_REUSEPORT).

    Port 0 takes an ephemeral port; a configured port must be free, since two
    processes sharing it would steal each other's responses.  So neither
    SO_REUSEPORT nor SO_REUSEADDR: on Linux the latter alone lets UDP sockets
    share a port.
    """
    return _bind_udp(host, port, reuse_port=False, reuse_addr=False)


def local_ip(family: socket.AddressFamily = socket.AF_INET) -> str:
    """The address this host would use to reach the outside (for Via when bound to *).

    Connecting a UDP socket sends nothing; it only makes the kernel pick a route.
    Falls back to loopback on a host without a route.
    """
    probe = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"  # RFC 3849 / 5737
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((probe, 9))
            return str(sock.getsockname()[0])
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


@functools.lru_cache(maxsize=4096)  # asked once per destination, not per request
def route_source(host: str) -> str | None:
    """The source address the kernel picks towards the IP literal ``host`` (None: no route)."""
    family = family_of(host)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host.strip("[]"), 9))  # sends nothing: only picks a route
        except OSError:
            return None
        return str(sock.getsockname()[0])


def pick_local(bound: Sequence[str], host: str) -> int:
    """Which of the listening addresses ``bound`` (one family) to send to ``host`` from.

    One address: it.  Several: the one the kernel would pick as source towards ``host``
    (the address a device on that route reached us at), else a wildcard, else the first.
    ``host`` must be an IP literal for the route lookup; a host name takes the first.
    """
    if len(bound) == 1:
        return 0
    if ipaddress_or_none(host) is not None:
        source = route_source(host.strip("[]"))
        for index, address in enumerate(bound):
            if address.strip("[]") == source:
                return index
    for index, address in enumerate(bound):
        if is_wildcard(address):
            return index
    return 0


def ipaddress_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address, or None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_wildcard(host: str) -> bool:
    """True for 0.0.0.0, :: and the empty host."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


def check_unused(transport: str, host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when another socket already serves ``host:port``.

    Our listeners share their port with SO_REUSEPORT, and the kernel lets any process of
    the same user join that group: a second server started on the same address would
    silently take part of the first one's traffic.  A probe bound *without*
    SO_REUSEPORT fails when anybody holds the address (or an overlapping wildcard).  For
    TCP it keeps SO_REUSEADDR, so connections in TIME_WAIT from a previous run do not
    count; only a listener does.  UDP gets neither option (with SO_REUSEADDR Linux lets
    UDP sockets share a port).
    """
    kind = socket.SOCK_DGRAM if transport.lower() == "udp" else socket.SOCK_STREAM
    probe = _new_socket(host, kind, reuse_port=False, reuse_addr=kind == socket.SOCK_STREAM)
    try:
        probe.bind((host.strip("[]"), port))
    finally:
        probe.close()

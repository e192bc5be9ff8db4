"""SIP transports: socket binding, UDP endpoints, framed TCP connections, WebSocket
(:mod:`msilo.transport.ws`, imported by its first listener), sending."""

from msilo.transport.base import (
    TCP,
    UDP,
    Source,
    Target,
    select_transport,
    udp_response_address,
)
from msilo.transport.manager import Transports
from msilo.transport.sockets import bind_client_udp, bind_tcp, bind_udp
from msilo.transport.tcp import ConnectionPool, TcpConnection
from msilo.transport.udp import UdpEndpoint

__all__ = [
    "TCP",
    "UDP",
    "ConnectionPool",
    "Source",
    "Target",
    "TcpConnection",
    "Transports",
    "UdpEndpoint",
    "bind_client_udp",
    "bind_tcp",
    "bind_udp",
    "select_transport",
    "udp_response_address",
]

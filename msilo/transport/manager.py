"""One process's SIP sockets: listeners, the hand-off, TCP and WebSocket connections, sending.

:class:`Transports` is what the server wires up: it binds the listeners, hands
every received message to ``on_message`` (the transaction layer's
``receive``), and offers :meth:`Transports.send` and :meth:`Transports.sent_by`
for the requests the process originates.

UDP requests leave from a listening socket of the destination's family (the one
the kernel routes from when there are several), and our Via names it, so a device
behind NAT hears us at the address and port it registered to.  A process without
a listener of that family (the leader, a worker that stopped listening while it
drains) asks a worker to send for it through the hand-off
(:mod:`msilo.transport.handoff`); failing that, or for a family we do not listen on
over UDP at all, it sends from its own client socket.

A TCP, TLS or WebSocket connection a device opened belongs to the worker that
accepted it.  A request for a peer this process has no connection to is first
offered to the other workers (:meth:`Handoff.ask`); the one holding a connection
the peer opened writes it there.  When none does, the request goes as it would
without them: over TCP/TLS a new connection is opened, over WebSocket (a browser
cannot be connected to) the send fails.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from msilo.errors import TransportError
from msilo.transport.base import (
    TCP,
    TLS,
    UDP,
    Address,
    ErrorCallback,
    MessageCallback,
    Source,
    Target,
    is_ip,
)
from msilo.transport.dns import Resolver
from msilo.transport.handoff import Handoff
from msilo.transport.sockets import (
    bind_client_udp,
    bind_tcp,
    bind_udp,
    family_of,
    is_wildcard,
    local_ip,
    pick_local,
)
from msilo.transport.spread import spread_by_content
from msilo.transport.tcp import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MESSAGE_TIMEOUT,
    BufferBudget,
    ConnectionPool,
    TcpConnection,
)
from msilo.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from msilo.transport.ws import WsConnection, WsPool

log = logging.getLogger("msilo.transport")
WS_TRANSPORTS = ("WS", "WSS")
HANDED_OFF = frozenset({TCP, TLS, *WS_TRANSPORTS})  # connections may be another worker's


class Transports:
    """Listening sockets, the hand-off, client sockets and the TCP pool of one process.

    ``advertise`` is the host put in our Via when a socket is bound to a
    wildcard address (otherwise the bound address is used; failing both, the
    address of the default route).
    """

    def __init__(
        self,
        on_message: MessageCallback | None = None,
        *,
        max_message: int = 65535,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = 0,
        advertise: str | None = None,
        resolver: Resolver | None = None,
        message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        ws_path: str = "/",
        ws_origins: tuple[str, ...] = (),
        ws_ping: float = 30.0,
    ) -> None:
        self._on_message = on_message
        self.resolver = resolver or Resolver()
        self.max_message = max_message
        self.advertise = advertise
        self.pool = ConnectionPool(
            self._dispatch,
            max_message=max_message,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            message_timeout=message_timeout,
            # One budget for TCP and TLS: the cap is on what the process holds.
            budget=BufferBudget(max_buffered),
        )
        self.tls_pool: ConnectionPool | None = None  # set up by configure_tls()
        # SIP over WebSocket (RFC 7118), plain and over TLS: one pool each, made by the
        # first listener (picows is imported only then).
        self._ws_settings: dict[str, Any] = {
            "max_message": max_message,
            "idle_timeout": idle_timeout,
            "max_connections": max_connections,
            "message_timeout": message_timeout,
            "path": ws_path,
            "origins": ws_origins,
            "ping": ws_ping,
        }
        self.ws_pools: dict[str, WsPool] = {}
        self.ws_servers: dict[str, list[asyncio.Server]] = {kind: [] for kind in WS_TRANSPORTS}
        self._tls_server: ssl.SSLContext | None = None
        self.udp_listeners: list[UdpEndpoint] = []
        self.tcp_servers: list[asyncio.Server] = []
        self.tls_servers: list[asyncio.Server] = []
        self._client_udp: dict[int, UdpEndpoint] = {}  # by address family
        # The UDP listeners requests leave from, by family (emptied by stop_listening()).
        self._senders: dict[int, list[UdpEndpoint]] = {}
        # The deployment's shared UDP listening addresses, by family: what a process
        # without a listener of its own names in Via and asks a worker to send from.
        self._shared: dict[int, list[Address]] = {}
        self.handoff: Handoff | None = None
        self._handed_off: Callable[[], None] | None = None  # counts a request handed off
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def on_message(self) -> MessageCallback | None:
        """The callback every received message goes to (set before traffic arrives)."""
        return self._on_message

    @on_message.setter
    def on_message(self, callback: MessageCallback) -> None:
        self._on_message = callback

    def _dispatch(self, data: bytes, source: Source) -> None:
        callback = self._on_message
        if callback is None:
            log.debug("event=dropped reason=no_handler peer=%r", source)
            return
        callback(data, source)

    # -- binding ------------------------------------------------------------------

    async def listen_udp(
        self, host: str, port: int, *, reuse_port: bool = True, spread: int = 1
    ) -> UdpEndpoint:
        """Bind a UDP listener (SO_REUSEPORT: shared with the other workers).

        ``spread`` > 1: the number of workers sharing the port; datagrams are then
        spread over them by content rather than by peer address (msilo.transport.spread).
        """
        sock = bind_udp(host, port, reuse_port=reuse_port)
        if reuse_port and spread > 1:
            spread_by_content(sock, spread)
        endpoint = await self._endpoint(sock)
        self.udp_listeners.append(endpoint)
        self._senders.setdefault(family_of(host), []).append(endpoint)
        log.info("event=listening transport=UDP address=%s:%s", *endpoint.local[:2])
        return endpoint

    def stop_listening(self) -> None:
        """Close the UDP listeners (leave the shared port); sending goes on through the
        hand-off while transactions drain."""
        self._senders.clear()
        for endpoint in self.udp_listeners:
            endpoint.close()
        if self.handoff is not None:
            self.handoff.stop_sending()

    def use_handoff(
        self,
        handoff: Handoff,
        shared: list[Address],
        handed_off: Callable[[], None] | None = None,
    ) -> None:
        """Send through ``handoff`` when this process has no listener of a family, or
        no connection to a TCP/TLS/WebSocket peer.

        ``shared`` are the deployment's UDP listening addresses (host, port) as
        configured: what our Via names and the worker sends from.  ``handed_off()`` is
        called for each request another worker wrote on its connection for us.
        """
        self.handoff = handoff
        self._handed_off = handed_off
        self._shared = {}
        for host, port in shared:
            self._shared.setdefault(family_of(host), []).append((host.strip("[]"), int(port)))

    def send_from_listener(self, data: bytes, dest: Address, local: Address) -> None:
        """Send ``data`` from the listener bound to ``local`` (the leader asked us to).

        Raises OSError when we no longer listen (the leader's Timer E resends).
        """
        family = family_of(str(dest[0]))
        listeners = self._senders.get(family)
        if not listeners:
            raise OSError(f"no UDP listener for {dest[0]}")
        for endpoint in listeners:
            if endpoint.local[0] == local[0] and endpoint.local[1] == local[1]:
                endpoint.sendto(data, dest)
                return
        listeners[pick_local([str(e.local[0]) for e in listeners], str(dest[0]))].sendto(data, dest)

    def write_held(self, transport: str, peer: Address, data: bytes) -> bool:
        """Write ``data`` on the ``transport`` connection ``peer`` opened to us (another
        process asked, :meth:`Handoff.ask`); False when we hold none or it is closed.

        Only connections the peer opened: one we dialled, the asker can dial too.
        """
        host, port = str(peer[0]), int(peer[1])
        conn: TcpConnection | WsConnection | None
        if transport == TCP:
            conn = self.pool.get(host, port)
        elif transport == TLS:
            conn = self.tls_pool.get(host, port) if self.tls_pool is not None else None
        else:
            pool = self.ws_pools.get(transport)
            conn = pool.get(host, port) if pool is not None else None
        if conn is None or (isinstance(conn, TcpConnection) and conn.outbound):
            return False
        try:
            conn.write(data)
        except OSError as exc:
            log.debug("event=write_held_failed transport=%s error=%r", transport, exc)
            return False
        return True

    async def listen_tcp(self, host: str, port: int, *, reuse_port: bool = True) -> asyncio.Server:
        """Bind a TCP listener (SO_REUSEPORT: shared with the other workers)."""
        loop = asyncio.get_running_loop()
        sock = bind_tcp(host, port, reuse_port=reuse_port)
        server = await loop.create_server(self.pool.protocol_factory(), sock=sock)
        self.tcp_servers.append(server)
        log.info("event=listening transport=TCP address=%s:%s", *sock.getsockname()[:2])
        return server

    def configure_tls(self, server: ssl.SSLContext | None, client: ssl.SSLContext | None) -> None:
        """Enable TLS: ``server`` for ``tls:`` listeners, ``client`` for connections we open."""
        self._tls_server = server
        self.tls_pool = ConnectionPool(
            self._dispatch,
            max_message=self.max_message,
            idle_timeout=self.pool.idle_timeout,
            max_connections=self.pool.max_connections,
            message_timeout=self.pool.message_timeout,
            budget=self.pool.budget,
            transport=TLS,
            client_ssl=client,
        )

    async def listen_tls(self, host: str, port: int, *, reuse_port: bool = True) -> asyncio.Server:
        """Bind a TLS listener (needs :meth:`configure_tls` with a server context first)."""
        if self.tls_pool is None or self._tls_server is None:
            raise TransportError("TLS is not configured (tls.certificate / tls.private_key)")
        loop = asyncio.get_running_loop()
        sock = bind_tcp(host, port, reuse_port=reuse_port)
        server = await loop.create_server(
            self.tls_pool.protocol_factory(), sock=sock, ssl=self._tls_server
        )
        self.tls_servers.append(server)
        log.info("event=listening transport=TLS address=%s:%s", *sock.getsockname()[:2])
        return server

    async def listen_ws(
        self, host: str, port: int, *, secure: bool = False, reuse_port: bool = True
    ) -> asyncio.Server:
        """Bind a SIP-over-WebSocket listener (``secure``: WSS, with the TLS context)."""
        if secure and self._tls_server is None:
            raise TransportError("TLS is not configured (tls.certificate / tls.private_key)")
        from msilo.transport.ws import WsPool

        kind = "WSS" if secure else "WS"
        pool = self.ws_pools.get(kind)
        if pool is None:
            pool = self.ws_pools[kind] = WsPool(self._dispatch, transport=kind, **self._ws_settings)
        sock = bind_tcp(host, port, reuse_port=reuse_port)
        try:
            server = await pool.serve(sock, self._tls_server if secure else None)
        except BaseException:
            sock.close()
            raise
        self.ws_servers[kind].append(server)
        log.info("event=listening transport=%s address=%s:%s", kind, *sock.getsockname()[:2])
        return server

    async def open_client_udp(self, host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
        """Bind this process's own UDP socket for the requests it sends (one per family)."""
        endpoint = await self._endpoint(bind_client_udp(host, port))
        self._client_udp[family_of(host)] = endpoint
        log.info("event=client_socket transport=UDP address=%s:%s", *endpoint.local[:2])
        return endpoint

    async def _endpoint(self, sock: socket.socket) -> UdpEndpoint:
        loop = asyncio.get_running_loop()
        try:
            _, endpoint = await loop.create_datagram_endpoint(
                lambda: UdpEndpoint(self._dispatch, max_message=self.max_message), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return endpoint

    # -- our address ----------------------------------------------------------------

    def sent_by(self, transport: str, host: str = "") -> tuple[str, int]:
        """Host and port for the Via of a request we send over ``transport`` to ``host``.

        UDP: the address the request leaves from, the listener chosen for ``host``
        (RFC 3261 §18.1.1: sent-by names where we listen; responses come back there,
        §18.2.2); TCP: the first TCP listener (responses come back on the same
        connection anyway).
        """
        if transport == UDP:
            local = self._udp_local(host) if host else None
            if local is None:
                local = self._udp_local("0.0.0.0") or self._udp_local("::")
            if local is not None:
                return self._host_for(local[0]), int(local[1])
        else:
            if transport in self.ws_servers:
                servers = self.ws_servers[transport]
            else:
                servers = self.tls_servers if transport == TLS else self.tcp_servers
            if servers:
                bound = servers[0].sockets[0].getsockname()
                return self._host_for(bound[0]), int(bound[1])
        host = self.advertise or local_ip()
        return host, 5060

    def _host_for(self, bound: str) -> str:
        if self.advertise:
            return self.advertise
        if is_wildcard(bound):
            return local_ip(socket.AF_INET6 if ":" in bound else socket.AF_INET)
        return bound

    def _udp_local(self, host: str) -> Address | None:
        """The local address a UDP request to ``host`` leaves from (see the module docstring)."""
        family = family_of(host)
        listeners = self._senders.get(family)
        if listeners:
            if len(listeners) == 1:
                return listeners[0].local
            local: Address = listeners[pick_local([str(e.local[0]) for e in listeners], host)].local
            return local
        shared = self._shared.get(family)
        if shared:
            return shared[pick_local([a[0] for a in shared], host)]
        endpoint = self._client_udp.get(family)
        return endpoint.local if endpoint is not None else None

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes, target: Target, on_error: ErrorCallback) -> None:
        """Send a request to ``target``; the transaction layer's send function.

        Raises :class:`TransportError` or OSError when sending cannot start;
        later failures (DNS, TCP connect) go to ``on_error``.  Host names are
        located with SRV, then A/AAAA (:mod:`msilo.transport.dns`); over TCP/TLS a
        refused connection moves on to the next address found.
        """
        host = target.host.strip("[]")
        if not is_ip(host):
            task = asyncio.get_running_loop().create_task(
                self._resolve_and_send(data, target, on_error)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._send_to_ip(data, target._replace(host=host), on_error)

    def _send_to_ip(
        self, data: bytes, target: Target, on_error: ErrorCallback, server_name: str | None = None
    ) -> None:
        if target.transport == UDP:
            self._send_udp(data, (target.host, target.port))
        elif not self._hand_off(data, target, on_error, server_name):
            self._send_here(data, target, on_error, server_name)

    def _hand_off(
        self, data: bytes, target: Target, on_error: ErrorCallback, server_name: str | None
    ) -> bool:
        """Offer a request for a peer we have no connection to to the other workers;
        True when they were asked (the answer sends it here, or fails it, later)."""
        handoff = self.handoff
        transport = target.transport
        if handoff is None or transport not in HANDED_OFF or self._connected(target):
            return False

        def answered(held: bool) -> None:
            if held:
                if self._handed_off is not None:
                    self._handed_off()
                return
            # Nobody holds one: as without the hand-off (TCP and TLS open a connection,
            # WebSocket fails: a browser cannot be connected to, RFC 7118 §5.2).
            try:
                self._send_here(data, target, on_error, server_name)
            except (OSError, TransportError) as exc:
                on_error(exc)

        return handoff.ask(transport, (target.host, target.port), data, answered)

    def _connected(self, target: Target) -> bool:
        """True when this process has (or is opening) a connection to ``target``."""
        host, port = target.host, target.port
        if target.transport == TCP:
            return self.pool.get(host, port) is not None or self.pool.connecting(host, port)
        if target.transport == TLS:
            pool = self.tls_pool
            return pool is None or pool.get(host, port) is not None or pool.connecting(host, port)
        ws = self.ws_pools.get(target.transport)
        return ws is not None and ws.get(host, port) is not None

    def _send_here(
        self, data: bytes, target: Target, on_error: ErrorCallback, server_name: str | None
    ) -> None:
        host = target.host
        if target.transport == TCP:
            self.pool.send(data, host, target.port, on_error)
        elif target.transport == TLS and self.tls_pool is not None:
            self.tls_pool.send(data, host, target.port, on_error, server_name=server_name)
        elif target.transport in WS_TRANSPORTS:
            # Only over the connection the client opened (RFC 7118 §5.2).
            pool = self.ws_pools.get(target.transport)
            if pool is None:
                raise TransportError(f"no {target.transport} connection from {host}:{target.port}")
            pool.send(data, host, target.port, on_error)
        else:
            raise TransportError(f"transport {target.transport} is not supported")

    def _send_udp(self, data: bytes, dest: Address) -> None:
        host = str(dest[0])
        family = family_of(host)
        listeners = self._senders.get(family)
        if listeners:
            one = len(listeners) == 1
            index = 0 if one else pick_local([str(e.local[0]) for e in listeners], host)
            listeners[index].sendto(data, dest)
            return
        shared = self._shared.get(family)
        if (
            shared
            and self.handoff is not None
            and self.handoff.relay(data, dest, shared[pick_local([a[0] for a in shared], host)])
        ):
            return
        endpoint = self._client_udp.get(family)
        if endpoint is None:
            raise TransportError(f"no UDP socket for {host}")
        endpoint.sendto(data, dest)

    async def _resolve_and_send(self, data: bytes, target: Target, on_error: ErrorCallback) -> None:
        try:
            addresses = await self.resolver.locate(target)
        except TransportError as exc:
            on_error(exc)
            return
        self._send_to_first(data, target, addresses, on_error)

    def _send_to_first(
        self, data: bytes, target: Target, addresses: list[tuple[str, int]], on_error: ErrorCallback
    ) -> None:
        """Send to ``addresses[0]``; a connection that fails moves on to the next."""
        ip, port = addresses[0]
        rest = addresses[1:]

        def failed(exc: BaseException) -> None:
            if rest and target.transport != UDP:
                log.info(
                    "event=next_address host=%s failed=%s:%d error=%s", target.host, ip, port, exc
                )
                self._send_to_first(data, target, rest, on_error)
            else:
                on_error(exc)

        try:
            # The certificate must name the host we were asked for (RFC 5922 §4), not the
            # SRV target or the address.
            self._send_to_ip(
                data, target._replace(host=ip, port=port, srv=False), failed, target.host
            )
        except (OSError, TransportError) as exc:
            failed(exc)

    # -- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        """Close every socket and connection."""
        ws_servers = [server for servers in self.ws_servers.values() for server in servers]
        for server in (*self.tcp_servers, *self.tls_servers, *ws_servers):
            server.close()
        for endpoint in (*self.udp_listeners, *self._client_udp.values()):
            endpoint.close()
        if self.handoff is not None:
            self.handoff.close()
        for task in list(self._tasks):
            task.cancel()
        await self.pool.close()
        if self.tls_pool is not None:
            await self.tls_pool.close()
        for pool in self.ws_pools.values():
            await pool.close()
        for server in (*self.tcp_servers, *self.tls_servers, *ws_servers):
            await server.wait_closed()
        for servers in self.ws_servers.values():
            servers.clear()
        self.tcp_servers.clear()
        self.tls_servers.clear()
        self.udp_listeners.clear()
        self._senders.clear()
        self._client_udp.clear()

"""SIP over TCP: framed connections and the pool that reuses them.

Each connection frames its stream with :class:`StreamFramer` and hands every
message up, like UDP.  A message must arrive whole within ``message_timeout``
of its first byte (of the connection's opening, for the first message of an
inbound connection): bytes trickling in do not extend it, so a slow client
cannot hold a connection slot for longer (Kamailio's ``tcp_msg_read_timeout``).
The bytes held for incomplete messages are capped per connection (the largest
message) and per process (:class:`BufferBudget`): a connection that would
push the process over its budget is closed.  A framing error (no Content-Length, oversize) loses the
stream's boundaries, so the connection is answered 400/513 and closed; a
message that frames but fails to parse is answered and the connection kept.
Responses go back over the connection the request came on (RFC 3261
§18.2.2).  The pool indexes every live connection — inbound ones too — by
peer address, so a request to a client that registered over TCP reuses its
connection, and outgoing connections are shared per destination.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Final, cast

from msilo.errors import SipError, TransportError
from msilo.lograte import LogRate
from msilo.sip.framing import PING, PONG, KeepAlive, StreamFramer
from msilo.sip.message import Via
from msilo.transport.base import TCP, Address, ErrorCallback, MessageCallback, Source
from msilo.transport.base import answer_error as _answer_error

log = logging.getLogger("msilo.transport")
# Refusals are caused by the peer, at its will: a line a second each, not one a packet.
rated = LogRate(log)

DEFAULT_IDLE_TIMEOUT: Final = 300.0  # s without a byte in either direction → close
DEFAULT_MESSAGE_TIMEOUT: Final = 20.0  # s from a message's first byte to its last → else close
DEFAULT_MAX_BUFFERED: Final = 64 * 1024 * 1024  # bytes of incomplete messages per process
CONNECT_TIMEOUT: Final = 10.0  # below Timer F, so a dead peer fails the transaction as 503
# Close a peer that stops reading rather than buffer for it without bound.
MAX_WRITE_BUFFER: Final = 4 * 1024 * 1024


def _key(addr: Address) -> tuple[str, int]:
    return (str(addr[0]), int(addr[1]))


class BufferBudget:
    """Bytes of incomplete messages held by every connection of a process (TCP and TLS).

    Without it 1,000 connections that each announce a 60 KB body and stop one byte
    short hold 60 MB until they time out.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED) -> None:
        self.limit = limit  # 0 = no limit
        self.held = 0

    def over(self) -> bool:
        """True when the connections hold more than the limit."""
        return bool(self.limit) and self.held > self.limit


class TcpConnection(asyncio.Protocol):
    """One SIP-over-TCP connection, inbound or outbound."""

    def __init__(self, pool: ConnectionPool, *, outbound: bool = False) -> None:
        self._pool = pool
        self._framer = StreamFramer(max_message=pool.max_message)
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("", 0)
        self.dialled: tuple[str, int] | None = None  # the address we connected to, if outbound
        self.last_activity = time.monotonic()
        self.messages = 0
        self._deadline: asyncio.TimerHandle | None = None  # the current message's, if any
        self._held = 0  # bytes of this connection counted in the pool's budget
        self._awaiting = 0  # requests handed up whose final response is not written yet
        self._closing = False  # framing failed: close once those responses are out

    @property
    def is_open(self) -> bool:
        """True while bytes can be written."""
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: trust the protocol contract.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        if self._pool._register(self) and not self.outbound:
            # An inbound connection owes us its first message within the timeout: a
            # connection that never sends one would otherwise hold its slot until idle.
            self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._pool.budget.held -= self._held
        self._held = 0
        self._pool._unregister(self)

    def _arm_deadline(self) -> None:
        timeout = self._pool.message_timeout
        if timeout > 0 and self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(timeout, self._message_timed_out)

    def _message_timed_out(self) -> None:
        self._deadline = None
        log.debug(
            "event=message_timeout peer=%s:%s buffered=%d",
            self.peer[0],
            self.peer[1],
            self._framer.buffered,
        )
        self._pool.message_timeouts += 1
        # abort, not close: a peer this slow may not read either, and the slot must free now.
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        framer = self._framer
        try:
            items = framer.feed(data)
        except SipError as exc:
            self._framing_failed(exc)
            return
        if self._track(items):
            return
        on_message = self._pool.on_message
        for item in items:
            if item is PING:
                # RFC 5626 §3.5.1: answer a double-CRLF ping with a single CRLF pong.
                self.write(PONG)
                continue
            assert isinstance(item, bytes)
            self.messages += 1
            request = not item.startswith(b"SIP/")
            if request:
                self._awaiting += 1
            try:
                on_message(item, Source(self._pool.transport, self.peer, self))
            except SipError as exc:
                if not _answer_error(self, item, self.peer, exc) and request:
                    self._awaiting -= 1
            except Exception:
                if request:
                    self._awaiting -= 1
                log.exception(
                    "event=message_failed transport=%s peer=%s:%s",
                    self._pool.transport,
                    self.peer[0],
                    self.peer[1],
                )
        if framer.error is not None:  # the messages before the bad one were handled
            self._framing_failed(framer.error)

    def _track(self, items: list[bytes | KeepAlive]) -> bool:
        """Restart the message deadline and count the bytes held; True when closed for
        holding too much."""
        if self._deadline is not None and any(item is not PING for item in items):
            self._deadline.cancel()  # a whole message arrived: the deadline was met
            self._deadline = None
        held = self._framer.buffered
        if held and self._deadline is None:
            self._arm_deadline()  # the first bytes of the next message start its clock
        budget = self._pool.budget
        budget.held += held - self._held
        self._held = held
        if held and budget.over():
            rated.log(
                logging.WARNING,
                "buffer_limit",
                "peer=%s:%s held=%d limit=%d action=close",
                self.peer[0],
                self.peer[1],
                budget.held,
                budget.limit,
            )
            if self.transport is not None:
                self.transport.abort()
            return True
        return False

    def _framing_failed(self, exc: SipError) -> None:
        rated.log(
            logging.INFO,
            "framing_error",
            "status=%d detail=%r peer=%s:%s",
            exc.status,
            exc.detail,
            self.peer[0],
            self.peer[1],
        )
        self._awaiting += 1  # the error answer below is one more response to write
        if not _answer_error(self, self._framer.pending_head(), self.peer, exc):
            self._awaiting -= 1
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._awaiting <= 0 or self.transport is None:
            self.close()
            return
        # Requests framed before the garbage are being handled: their answers still go
        # out on this connection (the client is waiting on it), then it closes.  Nothing
        # more is read; a handler that never answers cannot hold it past the deadline.
        self._closing = True
        self.transport.pause_reading()
        timeout = self._pool.message_timeout or DEFAULT_MESSAGE_TIMEOUT
        self._deadline = asyncio.get_running_loop().call_later(timeout, self.close)

    def reply(self, data: bytes, addr: Address, via: Via | None) -> None:
        """Send a response over this connection, or a new one if it closed (§18.2.2)."""
        if self.is_open:
            self.write(data)
            if self._awaiting and not data.startswith(b"SIP/2.0 1"):  # a final response
                self._awaiting -= 1
                if self._closing and not self._awaiting:
                    self.close()
            return
        # §18.2.2: the connection is gone: connect to the source IP (the received
        # parameter) and the sent-by port.
        port = via.port if via is not None and via.port else 5060
        self._pool.send(data, str(addr[0]), port, _log_reply_error)

    def write(self, data: bytes) -> None:
        """Write bytes; raises OSError when the connection is closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise OSError(f"{self._pool.transport} connection is closed")
        self.last_activity = time.monotonic()
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("event=slow_peer peer=%s:%s", self.peer[0], self.peer[1])
            transport.abort()

    def close(self) -> None:
        """Close after flushing what is buffered."""
        if self.transport is not None:
            self.transport.close()


def _log_reply_error(exc: BaseException) -> None:
    log.info("event=response_send_failed transport=TCP error=%r", exc)


class ConnectionPool:
    """Every live SIP TCP (or TLS) connection of this process, by peer address.

    A TLS pool is the same thing over ``ssl``: ``transport="TLS"`` and the
    client context used for the connections it opens (RFC 3261 §26.2.1).
    """

    def __init__(
        self,
        on_message: MessageCallback,
        *,
        max_message: int = 65535,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = 0,
        connect_timeout: float = CONNECT_TIMEOUT,
        transport: str = TCP,
        client_ssl: ssl.SSLContext | None = None,
        message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
        budget: BufferBudget | None = None,
    ) -> None:
        self.on_message = on_message
        self.transport = transport
        self.client_ssl = client_ssl
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections  # 0 = no limit
        self.connect_timeout = connect_timeout
        self.message_timeout = message_timeout  # 0 = no deadline
        self.budget = budget or BufferBudget()  # shared with the TLS pool by the caller
        self.message_timeouts = 0  # connections closed for a message that took too long
        self._by_peer: dict[tuple[str, int], TcpConnection] = {}
        self._connecting: dict[tuple[str, int], list[tuple[bytes, ErrorCallback]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._by_peer)

    def get(self, host: str, port: int) -> TcpConnection | None:
        """The open connection to ``host:port``, if any."""
        conn = self._by_peer.get((host, port))
        return conn if conn is not None and conn.is_open else None

    def connecting(self, host: str, port: int) -> bool:
        """True while a connection to ``host:port`` is being opened."""
        return (host, port) in self._connecting

    def protocol_factory(self) -> Callable[[], TcpConnection]:
        """Factory for ``loop.create_server``."""
        return lambda: TcpConnection(self)

    def _register(self, conn: TcpConnection) -> bool:
        if self._closed or (self.max_connections and len(self._by_peer) >= self.max_connections):
            rated.log(
                logging.WARNING,
                "connection_refused",
                "reason=limit peer=%s:%s",
                conn.peer[0],
                conn.peer[1],
            )
            assert conn.transport is not None
            conn.transport.abort()
            return False
        self._by_peer[_key(conn.peer)] = conn
        if self._sweeper is None and self.idle_timeout > 0:
            self._arm_sweeper()
        return True

    def _unregister(self, conn: TcpConnection) -> None:
        for key in (_key(conn.peer), conn.dialled):
            if key is not None and self._by_peer.get(key) is conn:
                del self._by_peer[key]

    def _arm_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self.idle_timeout / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle_timeout
        for conn in list(self._by_peer.values()):
            if conn.last_activity < cutoff:
                log.debug("event=idle_close peer=%s:%s", conn.peer[0], conn.peer[1])
                conn.close()
        if self._by_peer and not self._closed:
            self._arm_sweeper()

    def send(
        self,
        data: bytes,
        host: str,
        port: int,
        on_error: ErrorCallback,
        *,
        server_name: str | None = None,
    ) -> None:
        """Send over the connection to ``host:port`` (an IP), opening one if needed.

        Over TLS the peer's certificate must name ``server_name`` (the host name the
        address was looked up for, RFC 5922), else ``host``.  Connection failures are
        reported to ``on_error`` as :class:`TransportError`.
        """
        key = (host, port)
        conn = self._by_peer.get(key)
        if conn is not None and conn.is_open:
            conn.write(data)
            return
        if self._closed:
            raise TransportError("transport is shutting down")
        waiting = self._connecting.get(key)
        if waiting is not None:
            waiting.append((data, on_error))
            return
        self._connecting[key] = [(data, on_error)]
        task = asyncio.get_running_loop().create_task(self._connect(key, server_name or host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: tuple[str, int], server_name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: TcpConnection(self, outbound=True),
                    key[0],
                    key[1],
                    ssl=self.client_ssl,
                    server_hostname=server_name if self.client_ssl is not None else None,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            waiting = self._connecting.pop(key, [])
            error = TransportError(f"cannot connect to {key[0]}:{key[1]}: {exc!r}")
            for _, on_error in waiting:
                on_error(error)
            return
        waiting = self._connecting.pop(key, [])
        # Index it under the address we dialled too (what later sends look up),
        # unless a live connection from that peer got there first.
        conn.dialled = key
        current = self._by_peer.get(key)
        if current is None or not current.is_open:
            self._by_peer[key] = conn
        for data, on_error in waiting:
            try:
                conn.write(data)
            except OSError as exc:
                on_error(TransportError(str(exc)))

    async def close(self) -> None:
        """Close every connection and stop connecting."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._by_peer.values()):
            conn.close()
        self._by_peer.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

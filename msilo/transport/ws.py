"""SIP over WebSocket (RFC 7118): ``ws:`` and ``wss:`` listeners, built on picows.

The handshake and the framing are picows's (a Cython WebSocket library); this
module decides which handshakes to accept and carries SIP over the frames:

* RFC 7118 §4.1: the client must offer the ``sip`` subprotocol, and the 101
  names it; a handshake without it is refused (400).  Upgrades on paths other
  than ``server.ws_path`` are refused (404), and when ``server.ws_origins`` is set
  so is a browser page from any other origin (403: cross-site WebSocket hijacking,
  a page on another site riding the user's session).  A worker at
  ``limits.max_connections`` answers 503.
* RFC 7118 §5.1: each text or binary WebSocket message carries exactly one SIP
  message, so no Content-Length framing; a fragmented message is put together
  (at most ``limits.max_message_size`` bytes, within ``limits.message_timeout``).
* WebSocket is a reliable transport (RFC 7118 §5): the transaction layer runs
  no retransmission timers for it (``RELIABLE`` in :mod:`msilo.transport.base`).
* A browser cannot accept connections and names an ``.invalid`` host in its
  Contact and Via (RFC 7118 §5.2): requests to it go over the connection it
  opened, found by its peer address, and fail at once when that connection is
  gone (:meth:`WsPool.send`), so a relay to a closed tab is stored at once
  instead of waiting for Timer F.
* Keep-alive: a double-CRLF ping in a frame is answered with a CRLF pong
  (RFC 5626 §4.4.1, which JsSIP and SIP.js send); a WebSocket ping goes out after
  ``limits.ws_ping`` seconds without a frame from the peer, and a peer that does
  not answer it within as long again is dropped (checked every quarter of that by one
  timer per pool, so the times are up to 25 % late).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Final

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from msilo.errors import SipError, TransportError
from msilo.lograte import LogRate
from msilo.sip.framing import PONG
from msilo.sip.message import Via
from msilo.transport.base import Address, ErrorCallback, MessageCallback, Source
from msilo.transport.base import answer_error as _answer_error
from msilo.transport.tcp import DEFAULT_IDLE_TIMEOUT, DEFAULT_MESSAGE_TIMEOUT, MAX_WRITE_BUFFER

log = logging.getLogger("msilo.transport")
rated = LogRate(log)

WS: Final = "WS"
WSS: Final = "WSS"
SUBPROTOCOL: Final = "sip"  # RFC 7118 §4.1, registered in §8.1
DEFAULT_PING: Final = 30.0
_DOUBLE_CRLF: Final = b"\r\n\r\n"


class _LibraryLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """What picows logs: per-connection chatter at debug; the protocol errors a peer
    causes at will (bad frames, oversize) rated at info, never an error line each."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if kwargs.get("exc_info"):  # a bug (ours or picows's): keep it loud
            self.logger.log(level, msg, *args, **kwargs)
            return
        if level >= logging.WARNING:
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = str(msg)
            rated.log(logging.INFO, "ws_protocol", "detail=%r", text)
            return
        self.logger.log(min(level, logging.DEBUG), msg, *args, **kwargs)


# A LoggerAdapter also keeps picows from making a Logger object per connection.
_library_log = _LibraryLog(logging.getLogger("msilo.transport.ws"), {})


def _key(addr: Address) -> tuple[str, int]:
    return (str(addr[0]), int(addr[1]))


def offers_sip(request: WSUpgradeRequest) -> bool:
    """True when the handshake's Sec-WebSocket-Protocol lists ``sip`` (RFC 7118 §4.1)."""
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        if any(token.strip().lower() == SUBPROTOCOL for token in value.split(",")):
            return True
    return False


class WsConnection(WSListener):
    """One SIP-over-WebSocket connection (always inbound: we never dial a browser)."""

    # Thousands of idle browsers per worker: no __dict__ each.
    __slots__ = (
        "_deadline",
        "_parts",
        "_pool",
        "_size",
        "last_activity",
        "last_heard",
        "messages",
        "peer",
        "ping_sent",
        "transport",
    )

    def __init__(self, pool: WsPool) -> None:
        self._pool = pool
        self.transport: WSTransport | None = None
        self.peer: Address = ("", 0)
        self.last_activity = time.monotonic()  # SIP (and CRLF keep-alive) frames only
        self.last_heard = self.last_activity  # any frame, pongs included
        self.ping_sent = 0.0  # when our unanswered ping went out; 0 = none
        self.messages = 0
        self._parts: list[bytes] = []  # a fragmented message being put together
        self._size = 0
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        """True while frames can be written (picows drops, without an error, what is sent
        after our close frame: a request then would wait for Timer F)."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_disconnected
            and not transport.is_close_frame_sent
        )

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.peer = transport.underlying_transport.get_extra_info("peername")
        self._pool._register(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        self._drop_parts()
        self._pool._unregister(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        self.last_heard = time.monotonic()
        self.ping_sent = 0.0  # any frame shows the peer is alive, as a pong would
        if kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.payload_size > self._pool.max_message:
            # picows reports an oversize frame but may still hand it up: refuse it here.
            self._fail(WSCloseCode.MESSAGE_TOO_BIG, f"frame over {self._pool.max_message}")
            return
        if kind is WSMsgType.PING or kind is WSMsgType.PONG:
            return  # picows answers pings; neither is SIP activity
        self.last_activity = time.monotonic()
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if self._parts:  # RFC 6455 §5.4: a new message inside a fragmented one
                self._fail(WSCloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                return
            if frame.fin:
                self._message(frame.get_payload_as_bytes())
                return
            self._add_part(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CONTINUATION:
            if not self._parts:
                self._fail(WSCloseCode.PROTOCOL_ERROR, "continuation without a message")
                return
            self._add_part(frame.get_payload_as_bytes())
            if frame.fin and self._parts:
                data = b"".join(self._parts)
                self._drop_parts()
                self._message(data)

    def _add_part(self, part: bytes) -> None:
        self._size += len(part)
        if self._size > self._pool.max_message:
            # The message is over the limit before it is whole: nothing to answer 513
            # to yet (no Via), so close as RFC 6455 §7.4.1 says for "too big".
            self._fail(WSCloseCode.MESSAGE_TOO_BIG, f"message over {self._pool.max_message}")
            return
        self._parts.append(part)
        if self._deadline is None and self._pool.message_timeout > 0:
            # The whole-message deadline of TCP: fragments trickling in do not extend it.
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._pool.message_timeout, self._timed_out)

    def _drop_parts(self) -> None:
        self._parts = []
        self._size = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        self._pool.message_timeouts += 1
        log.debug(
            "event=message_timeout transport=%s peer=%s:%s", self._pool.transport, *self.peer[:2]
        )
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def _fail(self, code: WSCloseCode, why: str) -> None:
        rated.log(logging.INFO, "ws_error", "detail=%r peer=%s:%s", why, *self.peer[:2])
        self._drop_parts()
        if self.transport is not None:
            self.transport.send_close(code)
            self.transport.disconnect()

    def _message(self, data: bytes) -> None:
        if data == _DOUBLE_CRLF:
            # RFC 5626 §4.4.1 over a frame, as JsSIP and SIP.js send it: pong with a CRLF.
            self.write(PONG)
            return
        if not data.strip():
            return  # a lone CRLF (a pong) or blank keep-alive: not SIP
        self.messages += 1
        source = Source(self._pool.transport, self.peer, self)
        try:
            self._pool.on_message(data, source)
        except SipError as exc:
            _answer_error(self, data, self.peer, exc)
        except Exception:
            log.exception(
                "event=message_failed transport=%s peer=%s:%s", self._pool.transport, *self.peer[:2]
            )

    def reply(self, data: bytes, addr: Address, via: Via | None) -> None:
        """Send a response over this connection (RFC 7118 §5: the only way back)."""
        try:
            self.write(data)
        except OSError as exc:
            # A browser cannot be connected to: the response is lost, as the tab is.
            log.info("event=response_send_failed transport=%s error=%r", self._pool.transport, exc)

    def write(self, data: bytes) -> None:
        """Send one SIP message in one frame; raises OSError when the connection is closed.

        Text when it is UTF-8 (every SIP message without a binary body), else binary
        (RFC 7118 §5.1 allows both; a text frame must hold valid UTF-8, RFC 6455 §5.6).
        """
        transport = self.transport
        if transport is None or not self.is_open:
            raise OSError(f"{self._pool.transport} connection is closed")
        kind = WSMsgType.TEXT
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                kind = WSMsgType.BINARY
        self.last_activity = time.monotonic()
        transport.send(kind, data)
        if transport.underlying_transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # Close a peer that stops reading rather than buffer for it without bound.
            log.warning(
                "event=slow_peer transport=%s peer=%s:%s", self._pool.transport, *self.peer[:2]
            )
            transport.disconnect(graceful=False)

    def close(self) -> None:
        """Close with a WebSocket close frame."""
        if self.is_open:
            assert self.transport is not None
            self.transport.send_close(WSCloseCode.GOING_AWAY)
            self.transport.disconnect()


class WsPool:
    """Every live SIP WebSocket connection of one listener kind (WS or WSS), by peer address."""

    def __init__(
        self,
        on_message: MessageCallback,
        *,
        transport: str = WS,
        max_message: int = 65535,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = 0,
        message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
        path: str = "/",
        origins: Sequence[str] = (),
        ping: float = DEFAULT_PING,
    ) -> None:
        self.on_message = on_message
        self.transport = transport
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections  # 0 = no limit
        self.message_timeout = message_timeout
        self.path = path
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)  # empty = any
        self.ping = ping  # 0 = no WebSocket pings
        self.message_timeouts = 0
        self.ping_timeouts = 0  # connections dropped for not answering a ping
        self.refused = 0  # handshakes refused (path, origin, subprotocol, limit)
        self._by_peer: dict[tuple[str, int], WsConnection] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._by_peer)

    def get(self, host: str, port: int) -> WsConnection | None:
        """The open connection from ``host:port``, if any."""
        conn = self._by_peer.get((host, port))
        return conn if conn is not None and conn.is_open else None

    def _refuse(
        self, status: int, reason: str, request: WSUpgradeRequest
    ) -> WSUpgradeResponseWithListener:
        self.refused += 1
        rated.log(
            logging.INFO,
            "ws_refused",
            "transport=%s status=%d reason=%r path=%r",
            self.transport,
            status,
            reason,
            request.path.decode("latin-1")[:200],
        )
        body = (reason + "\n").encode()
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_error_response(status, body), None
        )

    def accept(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        """Decide on one handshake: a 101 with ``sip`` and a listener, or a refusal."""
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        if path != self.path:
            return self._refuse(404, f"no WebSocket endpoint at {path}", request)
        origin = request.headers.get("Origin")
        # A browser always sends Origin (RFC 6455 §4.1 item 8); a client that is not a
        # browser may not, and is not the cross-site threat the allow-list is about.
        if self.origins and origin is not None and origin.rstrip("/").lower() not in self.origins:
            return self._refuse(403, "origin not allowed", request)
        if not offers_sip(request):
            return self._refuse(400, "the sip subprotocol is required (RFC 7118)", request)
        if self._closed or (self.max_connections and len(self._by_peer) >= self.max_connections):
            return self._refuse(503, "too many connections", request)
        response = WSUpgradeResponse.create_101_response(
            extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL}
        )
        return WSUpgradeResponseWithListener(response, WsConnection(self))

    async def serve(self, sock: object, server_ssl: ssl.SSLContext | None) -> asyncio.Server:
        """Listen on the bound socket ``sock`` (TLS with ``server_ssl``)."""
        return await ws_create_server(
            self.accept,
            sock=sock,
            ssl=server_ssl,
            use_aiofastnet=False,  # plain loop.create_server: uvloop's, with our socket
            logger_name=_library_log,
            # The HTTP upgrade is the first message of the connection: same deadline.
            websocket_handshake_timeout=self.message_timeout or None,
            # Our pings come from the pool's one timer (_tick): picows's own run a task
            # per connection, ~2 kB each of 10,000 idle browsers.
            enable_auto_ping=False,
            max_frame_size=self.max_message,
            # Resident per connection (16 kB by default): most SIP messages fit in 1 kB,
            # and picows doubles the buffer for a longer one.
            read_buffer_init_size=1024,
        )

    def _register(self, conn: WsConnection) -> None:
        if self._closed:
            conn.close()
            return
        self._by_peer[_key(conn.peer)] = conn
        if self._sweeper is None and (self.idle_timeout > 0 or self.ping > 0):
            self._arm_sweeper()

    def _unregister(self, conn: WsConnection) -> None:
        key = _key(conn.peer)
        if self._by_peer.get(key) is conn:
            del self._by_peer[key]

    def _arm_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(t for t in (self.idle_timeout, self.ping) if t > 0) / 4
        self._sweeper = loop.call_later(max(period, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Close idle connections; ping the quiet ones, drop those that did not answer."""
        self._sweeper = None
        now = time.monotonic()
        idle_cutoff = now - self.idle_timeout if self.idle_timeout > 0 else None
        ping = self.ping
        for conn in list(self._by_peer.values()):
            transport = conn.transport
            if transport is None:
                continue
            if idle_cutoff is not None and conn.last_activity < idle_cutoff:
                log.debug(
                    "event=idle_close transport=%s peer=%s:%s", self.transport, *conn.peer[:2]
                )
                conn.close()
            elif ping <= 0:
                continue
            elif conn.ping_sent and now - conn.ping_sent >= ping:
                log.debug(
                    "event=ping_timeout transport=%s peer=%s:%s", self.transport, *conn.peer[:2]
                )
                self.ping_timeouts += 1
                transport.disconnect(graceful=False)
            elif not conn.ping_sent and now - conn.last_heard >= ping and conn.is_open:
                transport.send_ping()
                conn.ping_sent = now
        if self._by_peer and not self._closed:
            self._arm_sweeper()

    def send(self, data: bytes, host: str, port: int, on_error: ErrorCallback) -> None:
        """Send over the connection from ``host:port``.

        Raises :class:`TransportError` at once when there is none: a WebSocket client
        cannot be connected to (RFC 7118 §5.2), so the request fails now (a 503 in
        the client transaction) rather than at Timer F.
        """
        conn = self.get(host, port)
        if conn is None:
            raise TransportError(f"no {self.transport} connection from {host}:{port}")
        conn.write(data)

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._by_peer.values()):
            conn.close()
        self._by_peer.clear()


__all__ = ["SUBPROTOCOL", "WS", "WSS", "WsConnection", "WsPool", "offers_sip"]

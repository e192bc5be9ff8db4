"""A small HTTP server for the fake push services: HTTP/2 (h2) when TLS negotiates it by
ALPN, HTTP/1.1 (h11) otherwise, on 127.0.0.1 and a free port.

The protocol work is the h2 and h11 libraries'; this file only moves bytes and hands each
complete request to an ``async handler(request) -> (status, headers, body)``.  Stopping
aborts every open connection at once, so a test that leaves a client connected does not wait
for a TLS close_notify that never comes."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11


@dataclass
class Request:
    """One complete request as received."""

    method: str
    target: str  # path and query, as sent (percent-encoded)
    http_version: str  # "2" or "1.1"
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class Response:
    """What a handler answers."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.h11: h11.Connection | None = None
        self.streams: dict[int, Request] = {}
        self.pending: Request | None = None
        self.busy = False  # h11: a request is being answered
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
            self.h2 = h2.connection.H2Connection(config=config)
            self.h2.initiate_connection()
            self._flush()
        else:
            self.h11 = h11.Connection(h11.SERVER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.tasks:
            task.cancel()

    def _flush(self) -> None:
        if self.h2 is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- HTTP/2 -------------------------------------------------------------------------

    def _h2_events(self, data: bytes) -> None:
        assert self.h2 is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = [(str(k), str(v)) for k, v in event.headers or []]
                pseudo = dict(h for h in headers if h[0].startswith(":"))
                self.streams[event.stream_id] = Request(
                    pseudo.get(":method", ""),
                    pseudo.get(":path", ""),
                    "2",
                    [h for h in headers if not h[0].startswith(":")],
                )
            elif isinstance(event, h2.events.DataReceived):
                request = self.streams.get(event.stream_id)
                if request is not None:
                    request.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                request = self.streams.pop(event.stream_id, None)
                if request is not None:
                    self._spawn(self._h2_answer(event.stream_id, request))
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
        self._flush()

    async def _h2_answer(self, stream_id: int, request: Request) -> None:
        response = await self.server.handler(request)
        assert self.h2 is not None
        headers = [(":status", str(response.status))]
        headers += [(k.lower(), v) for k, v in response.headers]
        headers.append(("content-length", str(len(response.body))))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not response.body)
            if response.body:  # fake answers are small: within the initial window
                self.h2.send_data(stream_id, response.body, end_stream=True)
        except h2.exceptions.ProtocolError:  # the client reset the stream meanwhile
            return
        self._flush()

    # ---- HTTP/1.1 -----------------------------------------------------------------------

    def _h11_events(self, data: bytes) -> None:
        assert self.h11 is not None
        self.h11.receive_data(data)
        self._h11_next()

    def _h11_next(self) -> None:
        assert self.h11 is not None
        while not self.busy:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                if self.transport is not None:
                    self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.pending = Request(
                    event.method.decode(),
                    event.target.decode(),
                    "1.1",
                    [(k.decode(), v.decode()) for k, v in event.headers],
                )
            elif isinstance(event, h11.Data) and self.pending is not None:
                self.pending.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and self.pending is not None:
                self.busy = True
                request, self.pending = self.pending, None
                self._spawn(self._h11_answer(request))
            elif isinstance(event, h11.ConnectionClosed):
                if self.transport is not None:
                    self.transport.close()
                return

    async def _h11_answer(self, request: Request) -> None:
        response = await self.server.handler(request)
        assert self.h11 is not None and self.transport is not None
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        out = self.h11.send(h11.Response(status_code=response.status, headers=headers))
        out = (out or b"") + (self.h11.send(h11.Data(data=response.body)) or b"")
        out += self.h11.send(h11.EndOfMessage()) or b""
        if not self.transport.is_closing():
            self.transport.write(out)
        if self.h11.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.h11.start_next_cycle()
        self.busy = False
        self._h11_next()

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self._h2_events(data)
        else:
            self._h11_events(data)


class HttpServer:
    """Serves ``handler`` on 127.0.0.1:<free port>; ``await start()``, ``await stop()``."""

    def __init__(self, handler: Handler, *, cert_file: str = "", key_file: str = "") -> None:
        self.handler = handler
        self.context: ssl.SSLContext | None = None
        if cert_file:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(cert_file, key_file)
            self.context.set_alpn_protocols(["h2", "http/1.1"])
        self.connections: set[_Connection] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        """``https://127.0.0.1:PORT`` (or http)."""
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), sock=sock, ssl=self.context, backlog=128
        )

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
            for task in connection.tasks:
                task.cancel()
        await asyncio.sleep(0)  # let the aborts run connection_lost
        if self._server is not None:
            await self._server.wait_closed()

"""Management HTTP: ``GET /health`` (readiness), ``GET /health/live`` (liveness), ``GET /stats``
(JSON), ``GET /metrics`` (Prometheus).

Three read-only GETs on a loopback port need no web framework: this is a
deliberately tiny HTTP/1.1 responder (one request per connection, bounded
request size, short timeouts) so a slow or hostile client cannot hold it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("msilo.http")

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0


@dataclass(frozen=True)
class ManagementViews:
    """What the endpoint shows; each callable is cheap and never blocks."""

    health: Callable[[], tuple[bool, dict[str, Any]]]
    stats: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]
    # Liveness: answering at all is the proof; the body only says who answered.
    live: Callable[[], dict[str, Any]] | None = None


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _route(views: ManagementViews, method: str, path: str) -> bytes:
    path = path.split("?", 1)[0]
    if method != "GET":
        return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
    if path == "/health/live":
        detail = views.live() if views.live is not None else {"status": "alive"}
        return _response("200 OK", orjson.dumps(detail), "application/json")
    if path == "/health":
        ok, detail = views.health()
        status = "200 OK" if ok else "503 Service Unavailable"
        return _response(status, orjson.dumps(detail), "application/json")
    if path == "/stats":
        return _response("200 OK", orjson.dumps(views.stats()), "application/json")
    if path == "/metrics":
        return _response("200 OK", views.metrics(), "text/plain; version=0.0.4; charset=utf-8")
    hint = b"try /health, /health/live, /stats or /metrics\n"
    return _response("404 Not Found", hint, "text/plain")


async def _serve_one(
    views: ManagementViews, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        if len(head) > MAX_REQUEST:
            raise ValueError("request too large")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            reply = _response("400 Bad Request", b"bad request line\n", "text/plain")
        else:
            reply = _route(views, parts[0], parts[1])
        writer.write(reply)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    except Exception:  # a view must never take the endpoint down
        log.exception("event=http_error")
        writer.write(_response("500 Internal Server Error", b"error\n", "text/plain"))
    finally:
        writer.close()


async def start_management_http(views: ManagementViews, host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port``; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_one(views, reader, writer)

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST)

"""What a worker says about the SIP traffic it sees, when asked to.

Three independent switches, all off by default and free when off (the worker only
wraps its receive and send paths when one is on):

* ``server.log_level = "debug"``: one line per request and per response, in and out
  (``event=request_in method=MESSAGE call_id=… peer=udp:…``, ``event=response_out
  status=202 … duration_ms=…``); the worker is the line's ``proc=``;
* ``server.sip_trace = true``: every message whole, in and out (``event=sip_in`` /
  ``event=sip_out`` with ``message="…"`` escaped onto one line, CRLF as ``\\r\\n``);
* ``server.hep = "udp:HOST:PORT"``: every message as a HEP v3 packet to a capture server
  (Homer, heplify-server, ``sngrep -L``), see :mod:`msilo.server.hep`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from msilo.server.hep import HepSender
from msilo.transport.base import Source, Target

log = logging.getLogger("msilo.trace")

_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.I | re.M)
_CSEQ = re.compile(rb"^cseq[ \t]*:[ \t]*\d+[ \t]+([A-Za-z]+)", re.I | re.M)

Send = Callable[[bytes, Target, Any], None]


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("utf-8", "replace")


def _call_id(data: bytes) -> str:
    match = _CALL_ID.search(data)
    return match.group(1).strip().decode("utf-8", "replace") if match else "-"


def _cseq_method(data: bytes) -> str:
    match = _CSEQ.search(data)
    return match.group(1).decode("ascii") if match else "-"


def _escaped(data: bytes) -> str:
    text = data.decode("utf-8", "backslashreplace")
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t") + '"'


def _local_of(channel: Any) -> tuple[str, int]:
    local = getattr(channel, "local", None)
    if local is None:
        transport = getattr(channel, "transport", None)
        get = getattr(transport, "get_extra_info", None)
        local = get("sockname") if get is not None else None
    if not local:
        return ("0.0.0.0", 0)
    return str(local[0]), int(local[1])


class TracedSource(Source):
    """A :class:`Source` whose replies are traced (debug line, whole message, HEP)."""

    __slots__ = ("received_at", "trace")

    def __init__(self, source: Source, trace: SipTrace, received_at: float) -> None:
        super().__init__(source.transport, source.addr, source.channel)
        self.trace = trace
        self.received_at = received_at

    def reply(self, data: bytes, via: Any = None) -> None:
        """Send the response, then say so."""
        super().reply(data, via)
        self.trace.replied(self, data)


class SipTrace:
    """The worker's traffic tracer; build with :meth:`from_settings` (None when all off)."""

    def __init__(self, *, debug: bool, whole: bool, hep: HepSender | None) -> None:
        self.debug = debug
        self.whole = whole
        self.hep = hep

    @classmethod
    def from_settings(
        cls, *, log_level: str, sip_trace: bool, hep: HepSender | None
    ) -> SipTrace | None:
        """A tracer when any switch is on, else None (nothing is wrapped)."""
        debug = log_level == "debug"
        if not (debug or sip_trace or hep is not None):
            return None
        return cls(debug=debug, whole=sip_trace, hep=hep)

    @staticmethod
    def _peer(transport: str, ip: str, port: int) -> str:
        return f"{transport.lower()}:{ip}:{port}"

    # -- inbound ---------------------------------------------------------------------------

    def received(self, data: bytes, source: Source) -> Source:
        """A message came in: trace it; the returned source traces the replies to it."""
        now = time.time()
        peer = self._peer(source.transport, source.ip, source.port)
        if self.whole:
            log.info("event=sip_in peer=%s bytes=%d message=%s", peer, len(data), _escaped(data))
        if self.hep is not None:
            self.hep.capture(
                data, source.transport, (source.ip, source.port), _local_of(source.channel), now
            )
        if data.startswith(b"SIP/2.0"):
            if self.debug:
                line = _first_line(data).split(" ", 2)
                log.debug(
                    "event=response_in status=%s method=%s call_id=%s peer=%s",
                    line[1] if len(line) > 1 else "-",
                    _cseq_method(data),
                    _call_id(data),
                    peer,
                )
            return source
        return TracedSource(source, self, now)

    def request(self, request: Any, source: Source) -> None:
        """A new request reached the route (retransmissions never do)."""
        if self.debug:
            log.debug(
                "event=request_in method=%s call_id=%s cseq=%s peer=%s ruri=%s",
                request.method,
                request.call_id,
                request.cseq.number if request.cseq is not None else "-",
                self._peer(source.transport, source.ip, source.port),
                request.uri,
            )

    def replied(self, source: TracedSource, data: bytes) -> None:
        """We answered a request that came from ``source``."""
        now = time.time()
        peer = self._peer(source.transport, source.ip, source.port)
        if self.debug:
            line = _first_line(data).split(" ", 2)
            log.debug(
                "event=response_out status=%s method=%s call_id=%s peer=%s duration_ms=%.1f",
                line[1] if len(line) > 1 else "-",
                _cseq_method(data),
                _call_id(data),
                peer,
                (now - source.received_at) * 1000.0,
            )
        if self.whole:
            log.info("event=sip_out peer=%s bytes=%d message=%s", peer, len(data), _escaped(data))
        if self.hep is not None:
            self.hep.capture(
                data, source.transport, _local_of(source.channel), (source.ip, source.port), now
            )

    # -- outbound --------------------------------------------------------------------------

    def wrap_send(self, send: Send, local: Callable[[str], tuple[str, int]]) -> Send:
        """The transaction layer's send function, tracing each request we send."""

        def traced(data: bytes, target: Target, on_error: Any) -> None:
            send(data, target, on_error)
            now = time.time()
            peer = self._peer(target.transport, target.host, target.port)
            if self.debug:
                log.debug(
                    "event=request_out method=%s call_id=%s peer=%s",
                    _first_line(data).split(" ", 1)[0],
                    _call_id(data),
                    peer,
                )
            if self.whole:
                log.info(
                    "event=sip_out peer=%s bytes=%d message=%s", peer, len(data), _escaped(data)
                )
            if self.hep is not None:
                self.hep.capture(
                    data, target.transport, local(target.transport), (target.host, target.port),
                    now,
                )  # fmt: skip

        return traced

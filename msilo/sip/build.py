"""Building SIP messages: responses to parsed requests, and new requests we send.

Responses follow RFC 3261 §8.2.6.2: Via (every value, in order), From, To,
Call-ID and CSeq are copied from the request; a To tag is added to any response
above 100 whose request had none.  Every message we build carries
Content-Length (RFC 3261 §20.14: mandatory on streams, and harmless on UDP).

Strings are encoded as UTF-8 with ``surrogateescape``, the inverse of how the
parsers decode, so bytes that were not UTF-8 go back out unchanged.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from msilo.sip.headers import canonical_name, pretty_name
from msilo.sip.message import SipRequest, Via

MAGIC_COOKIE: Final = "z9hG4bK"  # RFC 3261 §8.1.1.7
DEFAULT_MAX_FORWARDS: Final = 70  # RFC 3261 §8.1.1.6

HeaderLine = str | tuple[str, str]

# Branches need global uniqueness (RFC 3261 §8.1.1.7): a random per-process prefix
# (48 bits) plus a counter is unique without paying for os.urandom on every request.
_PREFIX: Final = secrets.token_hex(6)
_counter = itertools.count(1)

# Headers a response copies from its request (RFC 3261 §8.2.6.2), with the
# spelling we emit (each with the CRLF that ends the line before it).
_COPIED: Final = {
    "via": "\r\nVia: ",
    "from": "\r\nFrom: ",
    "to": "\r\nTo: ",
    "call-id": "\r\nCall-ID: ",
    "cseq": "\r\nCSeq: ",
}
_STATUS_LINES: dict[tuple[int, str], str] = {}

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = "JanFebMarAprMayJunJulAugSepOctNovDec"  # three letters each

# A bare ``rport`` flag in a Via value (RFC 3581 §4 fills in its value).
_BARE_RPORT: Final = re.compile(r";[ \t]*rport(?=[ \t]*(?:;|,|$))", re.IGNORECASE)


# RFC 3261 §19.3: a tag "MUST be globally unique and cryptographically random with at least
# 32 bits of randomness" (a counter would let anyone predict the next one).  64 bits from
# os.urandom, drawn from a buffer refilled 256 tags at a time (one syscall, not one a tag).
_TAG_CHARS: Final = 16
_RANDOM_BYTES: Final = _TAG_CHARS // 2 * 256
_random_hex = ""
_random_pos = 0


def _reset_random() -> None:
    global _random_hex, _random_pos
    _random_hex, _random_pos = "", 0


# A forked child must not hand out its parent's buffered tags again.
os.register_at_fork(after_in_child=_reset_random)


def new_tag() -> str:
    """A fresh From/To tag: 64 random bits in hex (RFC 3261 §19.3)."""
    global _random_hex, _random_pos
    pos = _random_pos
    end = pos + _TAG_CHARS
    if end > len(_random_hex):
        _random_hex = os.urandom(_RANDOM_BYTES).hex()
        pos, end = 0, _TAG_CHARS
    _random_pos = end
    return _random_hex[pos:end]


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie plus a unique token (§8.1.1.7)."""
    return f"{MAGIC_COOKIE}{_PREFIX}{next(_counter):x}"


def new_call_id(host: str = "") -> str:
    """A fresh Call-ID (RFC 3261 §8.1.1.4): random, optionally ``@host``."""
    token = secrets.token_hex(12)
    return f"{token}@{host}" if host else token


def format_date(when: float | datetime | None = None) -> str:
    """RFC 1123 date in GMT with English names, as the SIP Date header wants (§20.17).

    ``Mon, 05 Feb 2024 09:03:01 GMT``; ``when`` is a POSIX time or an aware
    datetime (naive ones are taken as UTC); None means now.
    """
    if when is None:
        ts = time.time()
    elif isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ts = when.timestamp()
    else:
        ts = when
    t = time.gmtime(ts)
    month = _MONTHS[3 * t.tm_mon - 3 : 3 * t.tm_mon]
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {month} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def format_hostport(host: str, port: int | None) -> str:
    """``host:port`` with IPv6 references bracketed (RFC 3261 §25.1 hostport)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def annotate_via(via: Via, source_ip: str, source_port: int) -> str | None:
    """The top Via as the server transport must record it, or None when unchanged.

    RFC 3261 §18.2.1: add ``received`` when sent-by is not the packet's source IP.
    RFC 3581 §4: when ``rport`` has no value, set it to the source port and add
    ``received`` even if it equals sent-by.
    """
    params = via.params
    bare_rport = "rport" in params and params["rport"] is None
    host = via.host.strip("[]")
    if not bare_rport and (host == source_ip or "received" in params):
        return None
    raw = via.raw
    if bare_rport:
        raw = _BARE_RPORT.sub(f";rport={source_port}", raw, count=1)
    if "received" not in params:
        raw = f"{raw};received={source_ip}"
    return raw


def _extra_lines(headers: Iterable[HeaderLine]) -> str:
    """Extra header lines, each preceded by CRLF (so the result follows a header line)."""
    parts = []
    for item in headers:
        if isinstance(item, tuple):
            parts.append(f"\r\n{item[0]}: {item[1]}")
        elif item := item.rstrip("\r\n"):
            parts.append("\r\n" + item)
    return "".join(parts)


def _status_line(status: int, reason: str) -> str:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = f"SIP/2.0 {status} {reason}"
        if len(_STATUS_LINES) < 512:  # reasons come from config/scripts: keep it bounded
            _STATUS_LINES[(status, reason)] = line
    return line


def build_response(
    request: SipRequest,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    headers: Iterable[HeaderLine] = (),
    body: bytes = b"",
    content_type: str | None = None,
    top_via: str | None = None,
) -> bytes:
    """Serialize a response to ``request`` (RFC 3261 §8.2.6).

    ``to_tag`` is used when the request's To has no tag and ``status`` > 100
    (a fresh tag otherwise).  ``headers`` are extra lines (``"Name: value"`` or
    ``(name, value)``).  ``top_via`` replaces the request's top Via value (see
    :func:`annotate_via`).
    """
    # Hot path (one call per request): each piece is appended with its leading
    # CRLF and joined once; measured in bench/bench_build.py.
    out = [_status_line(status, reason)]
    append = out.append
    get = _COPIED.get
    to = request.to
    add_tag = status > 100 and to is not None and to.tag is None
    replace_via = top_via is not None
    for name, value in request.response_headers():
        prefix = get(name)
        if prefix is None:
            continue
        append(prefix)
        if replace_via and top_via is not None and name == "via":
            replace_via = False
            raw = request.via.raw if request.via is not None else ""
            # A comma-joined Via header: only its first value is the top Via.
            if value == raw:  # the usual case: one Via value per header line
                value = top_via
            else:
                value = top_via + value[len(raw) :] if raw and value.startswith(raw) else top_via
        append(value)
        if add_tag and name == "to":
            add_tag = False
            append(";tag=")
            append(to_tag or new_tag())
    if headers:
        append(_extra_lines(headers))
    if content_type is not None:
        append(f"\r\nContent-Type: {content_type}")
    if body:
        append(f"\r\nContent-Length: {len(body)}\r\n\r\n")
        return "".join(out).encode("utf-8", "surrogateescape") + body
    append("\r\nContent-Length: 0\r\n\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A request we built, with what a client transaction needs to match its responses."""

    data: bytes
    method: str
    branch: str
    call_id: str
    from_tag: str
    cseq: int
    transport: str


def _name_addr(value: str) -> str:
    # A bare URI with ';' or '?' would otherwise lend its parameters to the header
    # (RFC 3261 §20.10), so anything not already in name-addr form gets brackets.
    return value if "<" in value else f"<{value}>"


def build_request(
    method: str,
    uri: str,
    *,
    from_: str,
    to: str,
    sent_by: tuple[str, int],
    transport: str = "UDP",
    call_id: str | None = None,
    cseq: int = 1,
    from_tag: str | None = None,
    branch: str | None = None,
    route: str | Sequence[str] = (),
    contact: str | None = None,
    content_type: str | None = None,
    body: bytes = b"",
    date: bool | float | datetime = False,
    headers: Iterable[HeaderLine] = (),
    max_forwards: int = DEFAULT_MAX_FORWARDS,
) -> OutgoingRequest:
    """Serialize a new request (RFC 3261 §8.1.1) from our client socket.

    ``from_``/``to`` are URIs or name-addrs (the From tag is added); ``sent_by``
    is the host and port of the socket we send from, put in our Via with
    ``rport`` (RFC 3581 §3) so answers come back to that socket; ``route``
    is an outbound proxy URI or a list of them.  ``date`` adds a Date header:
    True for now, or the given time.  Fresh branch, tag and Call-ID are made
    unless given.
    """
    method = method.upper()
    transport = transport.upper()
    branch = branch or new_branch()
    from_tag = from_tag or new_tag()
    call_id = call_id or new_call_id()
    lines = [
        f"{method} {uri} SIP/2.0\r\n",
        f"Via: SIP/2.0/{transport} {format_hostport(*sent_by)};branch={branch};rport\r\n",
        f"Max-Forwards: {max_forwards}\r\n",
    ]
    routes = [route] if isinstance(route, str) else route
    lines.extend(f"Route: {_name_addr(r)}\r\n" for r in routes if r)
    lines.append(f"From: {_name_addr(from_)};tag={from_tag}\r\n")
    lines.append(f"To: {_name_addr(to)}\r\n")
    lines.append(f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n")
    if date is not False:
        lines.append(f"Date: {format_date(None if date is True else date)}\r\n")
    if contact is not None:
        lines.append(f"Contact: {_name_addr(contact)}\r\n")
    extra = _extra_lines(headers)
    if extra:
        lines.append(extra[2:] + "\r\n")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    data = "".join(lines).encode("utf-8", "surrogateescape") + body
    return OutgoingRequest(data, method, branch, call_id, from_tag, cseq, transport)


_ERROR_COPIED: Final = ("via", "from", "to", "call-id", "cseq")


def build_error_response(data: bytes, status: int, reason: str) -> bytes | None:
    """Answer raw bytes that failed to parse, or None when they must not be answered.

    RFC 3261 §8.2.6 copies Via, From, To, Call-ID and CSeq.  The answer needs a Via (the
    client matches a response to its request by the top Via's branch, §17.1.3): a
    request without one, a response or an ACK (§17.1.1.3: never answered) is dropped.
    A request missing the others is still answered with what it has, so the sender
    learns what is wrong (RFC 4475 §3.3.1 expects 400).  The scan is deliberately
    forgiving: it only picks header lines out, and takes the start line's first and
    last words (extra spaces are what RFC 4475 §3.1.2.8-9 send).
    """
    text = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0].split()
    if len(start) < 3 or not start[-1].startswith("SIP/") or not start[0].isalpha():
        return None
    if start[0].upper() == "ACK":
        return None
    found: dict[str, list[str]] = {}
    previous: list[str] | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and previous:
            previous[-1] += " " + line.strip()  # RFC 3261 §7.3.1 folded line
            continue
        name, sep, value = line.partition(":")
        previous = None
        if not sep:
            continue
        key = canonical_name(name)
        if key in _ERROR_COPIED:
            previous = found.setdefault(key, [])
            previous.append(value.strip())
    if "via" not in found:
        return None
    out = [f"SIP/2.0 {status} {reason}\r\n"]
    for key in _ERROR_COPIED:
        for value in found.get(key, ()):
            if key == "to" and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={new_tag()}"
            out.append(f"{pretty_name(key)}: {value}\r\n")
    out.append("Content-Length: 0\r\n\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")

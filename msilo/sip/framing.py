"""Stream framing: cut a TCP byte stream into whole SIP messages.

RFC 3261 §18.3: on a stream transport the message boundary is the blank line
after the headers plus ``Content-Length`` bytes of body, and Content-Length
MUST be present.  RFC 5626 §3.5.1 adds CRLF keep-alives: a double CRLF "ping"
between messages, answered with a single CRLF "pong".  RFC 3261 §7.5 lets a
receiver ignore CRLFs before a start line, which covers the pong.

The framer only finds boundaries; it does not parse.  It remembers how far it
has searched for the end of the headers, so feeding a message one byte at a
time costs linear, not quadratic, time.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from msilo.errors import MessageTooLarge, ParseError

DEFAULT_MAX_MESSAGE: Final = 65536
DEFAULT_MAX_HEADER: Final = 16384

_CRLF2: Final = b"\r\n\r\n"

# A header line's name sits right after a CRLF (the first line is the start line,
# and a folded continuation starts with whitespace, so neither can match).
# RFC 3261 §7.3.1: HCOLON = *( SP / HTAB ) ":" SWS; §7.3.3: "l" is the compact form.
_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


class KeepAlive(enum.Enum):
    """Events a framer yields besides messages."""

    PING = "ping"  # RFC 5626 §3.5.1 double-CRLF ping: the caller writes b"\r\n" back


PING: Final = KeepAlive.PING
PONG: Final = b"\r\n"


class StreamFramer:
    """Feed arbitrary chunks of a SIP stream; get back whole messages and keep-alive pings.

    After a framing error the stream is unusable (its boundaries are lost):
    the caller answers with the error's status and closes the connection.
    Messages completed before the error in the same chunk are still returned;
    the error is then in :attr:`error` and raised by the next :meth:`feed`.
    """

    __slots__ = ("_buf", "_error", "_head_end", "_max_header", "_max_message", "_need", "_scanned")

    def __init__(
        self, *, max_message: int = DEFAULT_MAX_MESSAGE, max_header: int = DEFAULT_MAX_HEADER
    ) -> None:
        self._buf = bytearray()
        self._max_message = max_message
        self._max_header = min(max_header, max_message)
        self._scanned = 0  # bytes of the current head already searched for CRLFCRLF
        self._head_end = -1  # index just past the blank line, once found
        self._need = -1  # total size of the current message, once known
        self._error: ParseError | None = None

    @property
    def error(self) -> ParseError | None:
        """The framing error that ended this stream, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole message."""
        return len(self._buf)

    def pending_head(self) -> bytes:
        """The header section of the message being framed (for answering an error with it)."""
        buf = self._buf
        end = self._head_end if self._head_end >= 0 else len(buf)
        return bytes(buf[:end])

    def feed(self, data: bytes) -> list[bytes | KeepAlive]:
        """Add ``data``; return every message (and ``PING``) completed by it, in order.

        Raises :class:`ParseError` (400) for a missing or malformed Content-Length
        and :class:`MessageTooLarge` (513) for a header section or message over the
        limits.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[bytes | KeepAlive] = []
        pos = 0
        try:
            while True:
                if self._need < 0:
                    if self._head_end < 0:
                        pos = self._skip_keepalives(pos, out)
                        if pos < 0:
                            pos = -pos - 1
                            break
                        if not self._find_head(pos):
                            break
                    self._need = self._message_size(pos)
                if len(buf) - pos < self._need:
                    break
                end = pos + self._need
                out.append(bytes(buf[pos:end]))
                pos = end
                self._need = -1
                self._head_end = -1
                self._scanned = 0
        except ParseError as exc:
            self._error = exc
            del buf[:pos]
            if out:
                return out
            raise
        # _scanned/_head_end count from the message start, so they survive the shift.
        if pos:
            del buf[:pos]
        return out

    def _skip_keepalives(self, pos: int, out: list[bytes | KeepAlive]) -> int:
        """Consume CRLF keep-alives at ``pos``; return the new start, or ``-pos-1`` to wait."""
        buf = self._buf
        n = len(buf)
        while pos < n and buf[pos] == 0x0D:  # fast exit for the usual case: no CR here
            if n - pos < 4:
                if buf[pos:n] != _CRLF2[: n - pos]:
                    break  # a lone CR before a start line: let the parser judge it
                return -pos - 1  # could still become a ping: wait for more bytes
            if buf[pos : pos + 4] == _CRLF2:
                out.append(PING)
                pos += 4
            elif buf[pos + 1] == 0x0A:
                pos += 2  # a single CRLF: a pong, or padding before a start line (§7.5)
            else:
                break
        return pos

    def _find_head(self, pos: int) -> bool:
        """Look for the blank line ending the headers; remember how far we looked."""
        buf = self._buf
        start = pos + max(self._scanned - 3, 0)
        idx = buf.find(_CRLF2, start)
        if idx < 0:
            self._scanned = len(buf) - pos
            if self._scanned > self._max_header:
                raise MessageTooLarge(f"header section longer than {self._max_header} bytes")
            return False
        self._head_end = idx + 4 - pos
        if self._head_end > self._max_header:
            raise MessageTooLarge(f"header section longer than {self._max_header} bytes")
        return True

    def _message_size(self, pos: int) -> int:
        """Header size plus Content-Length, validated against the limits."""
        head_end = self._head_end
        # Search the head only (up to and including the CRLF that ends the last header).
        found = _CONTENT_LENGTH.findall(self._buf, pos, pos + head_end - 2)
        if not found:
            raise ParseError("missing Content-Length on a stream transport (RFC 3261 §18.3)")
        values = {v.strip() for v in found}
        if len(values) != 1:
            raise ParseError("conflicting Content-Length headers")
        raw = values.pop()
        if not raw.isdigit():
            raise ParseError(f"invalid Content-Length {raw[:20]!r}")
        if len(raw) > 10 or head_end + int(raw) > self._max_message:
            raise MessageTooLarge(f"message larger than {self._max_message} bytes")
        return head_end + int(raw)

"""SIP messages as the real clients log them, read back for assertions.

baresip (``-s``) prints every message it sends or receives between colour escapes;
linphonec (``-d 6 -l FILE``) logs them through belle-sip. Both dumps are turned into
:class:`TracedMessage` records here, so a test can ask what went over the wire
(Call-IDs, statuses, Contact parameters) without a packet capture.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from msilo.sip.headers import canonical_name


@dataclass(frozen=True)
class TracedMessage:
    """One SIP request or response a client sent (``outgoing``) or received."""

    outgoing: bool
    start_line: str
    headers: tuple[tuple[str, str], ...]  # (canonical lower-case name, value)
    body: str

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (compact forms match too)."""
        wanted = canonical_name(name)
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @property
    def is_request(self) -> bool:
        return not self.start_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        """The request's method, or the CSeq method of a response."""
        if self.is_request:
            return self.start_line.split(" ", 1)[0]
        return (self.header("cseq") or " ").split()[-1]

    @property
    def status(self) -> int:
        """A response's status code (0 for a request)."""
        return 0 if self.is_request else int(self.start_line.split()[1])

    @property
    def call_id(self) -> str:
        return self.header("call-id") or ""

    @property
    def cseq(self) -> int:
        return int((self.header("cseq") or "0").split()[0])

    def expires(self) -> int | None:
        """A REGISTER's requested (or a 2xx's granted) expiry: the Contact's ``expires``
        parameter, else the Expires header (RFC 3261 §10.2.1.1)."""
        contact = self.header("contact") or ""
        found = re.search(r";\s*expires\s*=\s*(\d+)", contact, re.IGNORECASE)
        if found:
            return int(found.group(1))
        value = self.header("expires")
        return int(value) if value is not None and value.strip().isdigit() else None


def parse_message(raw: str, outgoing: bool) -> TracedMessage | None:
    """One logged message (lenient: a client's log, not the wire), or None if it is not SIP."""
    text = raw.replace("\r\n", "\n")
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    start = lines[0].strip()
    if not (start.startswith("SIP/2.0 ") or start.endswith(" SIP/2.0")):
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation (RFC 3261 §7.3.1)
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((canonical_name(name), value.strip()))
    return TracedMessage(outgoing, start, tuple(headers), body.rstrip("\n"))


# baresip: "\x1b[36;1m#\n<TRANSPORT> <src> -> <dst>\n<message>\x1b[;m\n"
_BARESIP_BLOCK = re.compile(r"\x1b\[36;1m#\n(\S+) (\S+) -> (\S+)\n(.*?)\x1b\[;m\n", re.DOTALL)


def baresip_trace(output: str, local: str) -> list[TracedMessage]:
    """The messages in baresip's ``-s`` output; ``local`` is its ``host:port``."""
    found = []
    for match in _BARESIP_BLOCK.finditer(output):
        message = parse_message(match.group(4), outgoing=match.group(2) == local)
        if message is not None:
            found.append(message)
    return found


# belle-sip: "... message sent to [UDP://127.0.0.1:5060], size: [390] bytes\n<message>"
# and "... received [256] new bytes from [UDP://127.0.0.1:5060]:\n<message>"; every log
# record starts with a timestamp, so the next one ends the message.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d{3} ", re.MULTILINE)


def belle_sip_trace(log: str) -> list[TracedMessage]:
    """The messages in a linphonec log file written with ``-d 6``."""
    found = []
    starts = [m.start() for m in _LOG_RECORD.finditer(log)] + [len(log)]
    for begin, end in itertools.pairwise(starts):
        first, _, rest = log[begin:end].partition("\n")
        if "message sent to [" in first:
            outgoing = True
        elif "new bytes from [" in first:
            outgoing = False
        else:
            continue
        message = parse_message(rest, outgoing)
        if message is not None:
            found.append(message)
    return found

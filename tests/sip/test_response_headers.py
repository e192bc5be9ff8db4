"""What a response copies from its request, read without building every header.

``SipMessage.response_headers()`` must be exactly the Via, From, To, Call-ID and CSeq
of ``headers``, in order -- compact forms, folding, several Via lines and unknown
headers included (the RFC 4475 corpus has them all) -- on both parsers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from msilo.sip.message import RESPONSE_COPIED
from tests.sip.conftest import ParserImpl

TORTURE_VALID = sorted((Path(__file__).parent.parent / "data" / "torture" / "valid").glob("*.dat"))
EXTRA = (
    b"MESSAGE sip:bob@example.com SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-1, SIP/2.0/TCP 192.0.2.2;branch=z9hG4bK-2\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.3\r\n ;branch=z9hG4bK-3\r\n"
    b"X-Via: not a via\r\nf: <sip:a@example.com>;tag=1\r\nt: <sip:bob@example.com>\r\n"
    b"i: c1\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nl: 0\r\n\r\n"
)


@pytest.mark.parametrize(
    "data",
    [EXTRA, *(p.read_bytes() for p in TORTURE_VALID)],
    ids=["compact-and-folded", *(p.stem for p in TORTURE_VALID)],
)
def test_response_headers_are_the_copied_ones_of_headers(parser: ParserImpl, data: bytes) -> None:
    message = parser.parse_message(data)
    copied = message.response_headers()  # before anything built the full header list
    assert copied == [(n, v) for n, v in message.headers if n in RESPONSE_COPIED]
    assert copied  # every message here has them

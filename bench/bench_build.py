"""Response building speed: a 202 for a typical ~450-byte MESSAGE (target ≤ 1.5 µs).

Run: ``python -m pytest bench/bench_build.py --benchmark-only`` (add
``--benchmark-json=out.json`` to keep numbers).  The request is parsed once by
each available parser (their output objects differ in kind, so both are
measured); each case also checks that the bytes it built are right.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from msilo.errors import ParseError
from msilo.sip import parser
from msilo.sip.build import annotate_via, build_request, build_response
from msilo.sip.message import SipRequest, SipResponse

BODY = (
    b"Hello Bob, this is a typical instant message body that will be stored by msilo "
    b"until you come back online."
)
MESSAGE = (
    b"MESSAGE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=49583\r\n'
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 1 MESSAGE\r\n"
    b"Date: Mon, 05 Feb 2024 09:03:01 GMT\r\n"
    b"User-Agent: Example UA 1.0\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(BODY)
) + BODY
assert 400 <= len(MESSAGE) <= 500, len(MESSAGE)


def _parsers() -> list[object]:
    found = [pytest.param(parser.parse_message_py, id="py-parsed")]
    c_parse = getattr(parser, "parse_message_c", None)
    try:
        if c_parse is not None:
            c_parse(MESSAGE)
            found.insert(0, pytest.param(c_parse, id="c-parsed"))
    except ParseError:  # placeholder extension: nothing to measure
        pass
    return found


@pytest.fixture(params=_parsers(), scope="module")
def request_(request: pytest.FixtureRequest) -> SipRequest:
    parse: Callable[[bytes], SipRequest | SipResponse] = request.param
    message = parse(MESSAGE)
    assert isinstance(message, SipRequest)
    return message


def _check(data: bytes) -> None:
    response = parser.parse_message_py(data)
    assert isinstance(response, SipResponse) and response.status == 202
    assert response.to is not None and response.to.tag is not None
    assert response.call_id == "a84b4c76e66710@pc33.example.com"


def test_build_202(benchmark: pytest.FixtureRequest, request_: SipRequest) -> None:
    """The hot path: the routing answers a stored MESSAGE (fresh To tag each time)."""
    data = benchmark(build_response, request_, 202, "Accepted")  # type: ignore[operator]
    _check(data)


def test_build_202_in_transaction(benchmark: pytest.FixtureRequest, request_: SipRequest) -> None:
    """As a server transaction sends it: To tag and annotated top Via already computed."""
    assert request_.via is not None
    top = annotate_via(request_.via, "203.0.113.5", 40000)
    data = benchmark(
        build_response,
        request_,
        202,
        "Accepted",  # type: ignore[operator]
        to_tag="5f3a2c",
        top_via=top,
    )
    _check(data)
    assert b"rport=40000;received=203.0.113.5" in data


def test_build_message_request(benchmark: pytest.FixtureRequest) -> None:
    """A stored message going out at dump time (fresh branch, tag, Call-ID, Date)."""
    body = b"x" * 120

    def build() -> bytes:
        return build_request(
            "MESSAGE",
            "sip:bob@192.0.2.20:5062",
            from_="sip:alice@example.com",
            to="sip:bob@example.com",
            sent_by=("192.0.2.1", 40000),
            content_type="text/plain",
            body=body,
            date=1707123781.0,
        ).data

    data = benchmark(build)  # type: ignore[operator]
    assert data.endswith(body)

"""The C parser's one-pass fast paths agree with the twin at their edges.

The C parser scans the usual forms (request line, header names, Via, name-addr
parameters, Content-Type) in one pass and hands anything else to its general
checks; these messages sit on the border between the two, so each is parsed by
both parsers and the outcomes compared (values, or exception class and status).
"""

from __future__ import annotations

from typing import Any

import pytest

from msilo.errors import MsiloError
from msilo.sip import parser as selector

needs_c = pytest.mark.skipif(selector._fastparse is None, reason="msilo._fastparse is not built")

REQUEST_LINE = "MESSAGE sip:bob@example.com SIP/2.0"
VIA = "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK1;rport"
FROM = "From: <sip:alice@example.com>;tag=1"
TO = "To: <sip:bob@example.com>"
REST = ["Call-ID: c1", "CSeq: 1 MESSAGE"]


def message(
    *, first: str = REQUEST_LINE, via: str = VIA, from_: str = FROM, extra: tuple[str, ...] = ()
) -> bytes:
    lines = [first, via, from_, TO, *REST, *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def outcome(data: bytes, parse: Any) -> Any:
    try:
        msg = parse(data)
    except MsiloError as exc:
        return ("error", type(exc).__name__, getattr(exc, "status", None))
    return msg.as_dict()


CASES = {
    # request line
    "lower-case version": message(first="MESSAGE sip:bob@example.com sip/2.0"),
    "version 3.0": message(first="MESSAGE sip:bob@example.com SIP/3.0"),
    "question mark in user": message(first="MESSAGE sip:b?b@example.com SIP/2.0"),
    "headers in uri": message(first="MESSAGE sip:bob@example.com?x=y SIP/2.0"),
    "at before colon": message(first="MESSAGE a@b:c SIP/2.0"),
    "tel uri": message(first="MESSAGE tel:+15551234 SIP/2.0"),
    "bad byte in uri": message(first='MESSAGE sip:b"b@example.com SIP/2.0'),
    "two spaces": message(first="MESSAGE  sip:bob@example.com SIP/2.0"),
    "long uri": message(first="MESSAGE sip:" + "b" * 70 + "@example.com SIP/2.0"),
    # header names
    "upper-case names": message(extra=("CONTENT-LENGTH: 0", "MAX-FORWARDS: 7")),
    "known name as prefix": message(extra=("Via-Extra: 1", "Tox: 2")),
    "space before colon": message(extra=("Max-Forwards \t: 7",)),
    "space inside name": message(extra=("Max Forwards: 7",)),
    "carriage return inside name": message(extra=("Call\rID: x",)),
    "no colon": message(extra=("Max-Forwards 7",)),
    "empty name": message(extra=(": 7",)),
    "compact and unknown one-letter names": message(extra=("l: 0", "Z: 1", "q: 2")),
    "one-letter name not a token": message(extra=("@: 2",)),
    "long unknown name": message(extra=("X-" + "a" * 40 + ": 1",)),
    # Via
    "via spaces around slashes": message(via="Via: SIP / 2.0 / UDP 192.0.2.10;branch=z9hG4bK1"),
    "via lower-case": message(via="Via: sip/2.0/tcp host.example.com;branch=z9hG4bK1"),
    "via ipv6": message(via="Via: SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bK1"),
    "via bad ipv6": message(via="Via: SIP/2.0/UDP [2001:db8::1;x]:5070;branch=z9hG4bK1"),
    "via port spaces": message(via="Via: SIP/2.0/UDP h : 5070 ;branch=z9hG4bK1"),
    "via empty port": message(via="Via: SIP/2.0/UDP h:;branch=z9hG4bK1"),
    "via port then junk": message(via="Via: SIP/2.0/UDP h:5070 x;branch=z9hG4bK1"),
    "via host junk": message(via="Via: SIP/2.0/UDP h@x;branch=z9hG4bK1"),
    "via no params, next via": message(via="Via: SIP/2.0/UDP h1, SIP/2.0/UDP h2"),
    "via params, next via": message(via="Via: SIP/2.0/UDP h1;branch=z9hG4bK1,SIP/2.0/UDP h2"),
    "via flag then next via": message(via="Via: SIP/2.0/UDP h1;rport,SIP/2.0/UDP h2"),
    "via quoted value, next via": message(via='Via: SIP/2.0/UDP h1;x="a,;b",SIP/2.0/UDP h2'),
    "via quoted rport": message(via='Via: SIP/2.0/UDP h1;rport="5060";branch=z9hG4bK1'),
    "via spaces in params": message(via="Via: SIP/2.0/UDP h1 ; branch = z9hG4bK1 ; rport"),
    "via angle value": message(via="Via: SIP/2.0/UDP h1;x=<a,b>;branch=z9hG4bK1"),
    "via empty param": message(via="Via: SIP/2.0/UDP h1;;branch=z9hG4bK1"),
    "via trailing semicolon": message(via="Via: SIP/2.0/UDP h1;branch=z9hG4bK1;"),
    "via empty value": message(via="Via: SIP/2.0/UDP h1;branch="),
    "via unterminated quote": message(via='Via: SIP/2.0/UDP h1;x="abc'),
    "via quote then junk": message(via='Via: SIP/2.0/UDP h1;x="abc"d;branch=z9hG4bK1'),
    "via equals in value": message(via="Via: SIP/2.0/UDP h1;branch=a=b"),
    "via rport 65536": message(via="Via: SIP/2.0/UDP h1;rport=65536;received=192.0.2.1"),
    "via repeated branch": message(via="Via: SIP/2.0/UDP h1;branch=a;BRANCH=b"),
    "via long branch": message(via="Via: SIP/2.0/UDP h1;branch=z9hG4bK" + "x" * 60),
    "via sent-by only": message(via="Via: SIP/2.0/UDP h1"),
    "via missing host": message(via="Via: SIP/2.0/UDP ;branch=z9hG4bK1"),
    # From / To
    "quoted tag": message(from_='From: <sip:alice@example.com>;tag="a b"'),
    "tag with comma": message(from_="From: <sip:alice@example.com>;tag=a,b"),
    "tag with space": message(from_="From: <sip:alice@example.com>;tag=a b"),
    "upper-case tag name": message(from_="From: <sip:alice@example.com>;TAG=9"),
    "control byte in uri": message(from_="From: <sip:ali\x01ce@example.com>;tag=1"),
    "empty uri": message(from_="From: <>;tag=1"),
    "unterminated angle": message(from_="From: <sip:alice@example.com;tag=1"),
    "bad byte before angle end": message(from_="From: <sip:a b@example.com>;tag=1"),
    "display and tag": message(from_='From: "A \\"B\\"" <sip:alice@example.com> ;tag=1'),
    "addr-spec with params": message(from_="From: sip:alice@example.com;tag=1;x=y"),
    "non-ascii uri": message(from_="From: <sip:\xe4lice@example.com>;tag=1"),
    # Content-Type and Contact (checked at parse time, built later)
    "content-type spaces": message(extra=("Content-Type: text / plain ; charset = UTF-8",)),
    "content-type quoted": message(extra=('Content-Type: text/plain;charset="UTF-8"',)),
    "content-type no subtype": message(extra=("Content-Type: text/",)),
    "content-type bad param": message(extra=("Content-Type: text/plain;=x",)),
    "contact quoted instance": message(
        extra=('Contact: <sip:a@h>;+sip.instance="<urn:uuid:1>";reg-id=1;expires=60',)
    ),
    "contact unterminated quote": message(extra=('Contact: <sip:a@h>;+sip.instance="<urn',)),
    # numbers
    "leading zeros": message(extra=("Max-Forwards: 0000000000070", "Content-Length: 00")),
    "ten digit length": message(extra=("Content-Length: 1234567890",)),
    "ten digit cseq": message(extra=()).replace(b"CSeq: 1 ", b"CSeq: 2147483647 "),
    "cseq over the limit": message(extra=()).replace(b"CSeq: 1 ", b"CSeq: 2147483648 "),
    "cseq method other case": message(extra=()).replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 message"),
    "max-forwards 256": message(extra=("Max-Forwards: 256",)),
}


@needs_c
@pytest.mark.parametrize("name", sorted(CASES))
def test_c_and_twin_agree(name: str) -> None:
    data = CASES[name]
    c = outcome(data, selector.parse_message_c)
    py = outcome(data, selector.parse_message_py)
    assert c == py


@needs_c
def test_shared_strings_keep_values_apart() -> None:
    """The C parser's decoded-string cache never hands back another value."""
    hosts = [f"host{n}.example.com" for n in range(600)]
    for round_ in range(2):
        for host in hosts:
            data = message(
                first=f"MESSAGE sip:user{round_}@{host} SIP/2.0",
                via=f"Via: SIP/2.0/UDP {host}:5060;branch=z9hG4bK1",
                from_=f"From: <sip:alice@{host}>;tag=1",
            )
            msg: Any = selector.parse_message_c(data)
            assert msg.via.host == host
            assert msg.from_.uri == f"sip:alice@{host}"
            assert msg.uri == f"sip:user{round_}@{host}"

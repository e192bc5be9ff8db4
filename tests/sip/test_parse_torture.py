"""RFC 4475 torture messages: each is accepted or rejected as the RFC says, by both parsers.

The files under ``tests/data/torture/`` hold the exact bytes (CRLF line ends, NUL, BEL
and DEL inside quoted strings, non-UTF-8 body bytes).  ``valid/`` holds §3.1.1 and the
messages of §3.2/§3.3 that are syntactically well-formed (their trouble is for the
transaction or application layer); ``invalid/`` holds §3.1.2 and the §3.3 messages that
must be refused at parse time.

Deliberate deviations and notes:
* longreq (§3.1.1.7) and mpart01 (§3.1.1.11) are reconstructions: the RFC's exact long
  strings and binary S/MIME part are replaced by strings of the same kind (long
  repeated tokens, every byte value in a binary part), with a matching Content-Length.
* novelsc (§3.3.2: a novel scheme in the Request-URI) gets 416 here: msilo serves only
  sip, sips and tel.
* unksm2 (§3.3.3: unknown schemes in To/From/Contact) parses; normalize_aor refuses the
  non-SIP To URI, and the registrar answers 400 as the RFC expects (not 416, which is
  about the Request-URI): tests/service/test_protocol_edges.py checks the answer.
* scalar02/scalarlg: the CSeq overflow decides (400); an over-large Expires alone is
  clamped to 2**32-1 rather than refused (RFC 4475 allows either).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from msilo.errors import ParseError, UnsupportedURIScheme

TORTURE = Path(__file__).resolve().parent.parent / "data" / "torture"
VALID = sorted((TORTURE / "valid").glob("*.dat"))
INVALID = sorted((TORTURE / "invalid").glob("*.dat"))

# name -> (exception class, status) for the messages that must be refused
EXPECTED_ERRORS: dict[str, tuple[type[ParseError], int]] = {
    "badinv01": (ParseError, 400),  # §3.1.2.1  extraneous ";;,,"
    "clerr": (ParseError, 400),  # §3.1.2.2  Content-Length larger than the message
    "ncl": (ParseError, 400),  # §3.1.2.3  negative Content-Length
    "scalar02": (ParseError, 400),  # §3.1.2.4  overlarge scalars in a request
    "scalarlg": (ParseError, 400),  # §3.1.2.5  overlarge scalars in a response
    "quotbal": (ParseError, 400),  # §3.1.2.6  unterminated quoted display name
    "ltgtruri": (ParseError, 400),  # §3.1.2.7  <> around the Request-URI
    "lwsruri": (ParseError, 400),  # §3.1.2.8  LWS inside the Request-URI
    "lwsstart": (ParseError, 400),  # §3.1.2.9  several SP between request-line elements
    "trws": (ParseError, 400),  # §3.1.2.10 SP at the end of the request line
    "escruri": (ParseError, 400),  # §3.1.2.11 headers in the Request-URI
    "baddate": (ParseError, 400),  # §3.1.2.12 Date not in GMT
    "regbadct": (ParseError, 400),  # §3.1.2.13 URI with "?" outside <>
    "badaspec": (ParseError, 400),  # §3.1.2.14 spaces inside <>
    "baddn": (ParseError, 400),  # §3.1.2.15 non-token display name
    "badvers": (ParseError, 505),  # §3.1.2.16 SIP/7.0
    "mismatch01": (ParseError, 400),  # §3.1.2.17 CSeq method differs from the method
    "mismatch02": (ParseError, 400),  # §3.1.2.18 same, unknown method
    "bigcode": (ParseError, 400),  # §3.1.2.19 4294967301 status code
    "insuf": (ParseError, 400),  # §3.3.1    missing To/From/Call-ID
    "unkscm": (UnsupportedURIScheme, 416),  # §3.3.2 unknown Request-URI scheme
    "novelsc": (UnsupportedURIScheme, 416),  # §3.3.2 (see the module docstring)
    "multi01": (ParseError, 400),  # §3.3.7    several values in single-value headers
    "mcl01": (ParseError, 400),  # §3.3.8    several Content-Length headers
}


def test_every_invalid_message_has_an_expectation():
    assert {p.stem for p in INVALID} == set(EXPECTED_ERRORS)
    assert len(VALID) >= 20


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_torture_message_parses(parser, path):
    data = path.read_bytes()
    msg = parser.parse_message(data)
    assert msg.via is not None and msg.cseq is not None and msg.call_id
    if msg.content_length is not None:
        assert len(msg.body) == msg.content_length


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_torture_message_is_refused(parser, path):
    cls, status = EXPECTED_ERRORS[path.stem]
    with pytest.raises(cls) as info:
        parser.parse_message(path.read_bytes())
    assert info.value.status == status


def _load(parser, name):
    return parser.parse_message((TORTURE / "valid" / f"{name}.dat").read_bytes())


def test_wsinv_short_tortuous_invite(parser):
    msg = _load(parser, "wsinv")
    assert msg.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert (msg.to.uri, msg.to.tag) == ("sip:vivekg@chair-dnrc.example.com", "1918181833n")
    assert msg.from_.display == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert msg.max_forwards == 68
    assert (msg.cseq.number, msg.cseq.method) == (9, "INVITE")
    assert (msg.via.transport, msg.via.host, msg.via.branch) == ("UDP", "192.0.2.2", "390skdjuw")
    assert msg.get_header("subject") == ""
    assert msg.get_header("newfangledheader") == "newfangled value continued newfangled value"
    assert msg.get_header("unknownheaderwithunusualvalue") == ";;,,;;,;"
    assert [v.split(";")[0] for v in msg.get_headers("via")][1:] == [
        "SIP  / 2.0  / TCP     spindle.example.com   ",
    ]
    contact = msg.contacts[0]
    assert contact.display == 'Quoted string ""'
    assert contact.q == 0.33
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert msg.content_type.mime == "application/sdp"
    assert len(msg.body) == 150


def test_intmeth_wide_range_of_characters(parser):
    msg = _load(parser, "intmeth")
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq.method == msg.method
    assert msg.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.params["fromparam''~+*_!.-%"] == '"работающий"'
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.get_header("extensionheader-!.%*+_`'~") == "\ufeff大停電"


def test_escaped_uris(parser):
    msg = _load(parser, "esc01")
    assert parser.normalize_aor(msg.to.uri) == "user@example.com"
    assert parser.normalize_aor(msg.from_.uri) == "I have spaces@example.net"
    assert msg.contacts[0].uri == "sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31"
    null = _load(parser, "escnull")
    assert parser.normalize_aor(null.to.uri) == "null-\x00-null@example.com"
    assert [c.uri for c in null.contacts] == [
        "sip:%00@host5.example.com",
        "sip:%00%00@host5.example.com",
    ]


def test_percent_is_no_escape_outside_uris(parser):
    msg = _load(parser, "esc02")
    assert msg.method == "RE%47IST%45R"
    assert msg.to.display == "%Z%45"
    assert ("c%6fntact", "<sip:alias2@host2.example.com>") in msg.headers
    assert len(msg.contacts) == 2


def test_dblreq_ignores_the_second_message_after_content_length(parser):
    msg = _load(parser, "dblreq")
    assert msg.method == "REGISTER" and msg.content_length == 0 and msg.body == b""


def test_transports_and_unusual_reasons(parser):
    assert _load(parser, "transports").via.transport == "UDP"
    assert _load(parser, "unreason").reason.endswith("простое")
    assert _load(parser, "noreason").reason == ""
    assert _load(parser, "zeromf").max_forwards == 0
    assert _load(parser, "inv2543").via.branch is None


def test_unknown_schemes_in_headers_parse_but_are_no_aor(parser):
    msg = _load(parser, "unksm2")
    assert msg.to.uri == "isbn:2983792873"
    assert msg.contacts[0].uri == "name:John_Smith"
    with pytest.raises(UnsupportedURIScheme):
        parser.normalize_aor(msg.to.uri)


def test_escaped_headers_inside_a_bracketed_contact_are_fine(parser):
    msg = _load(parser, "regescrt")
    uri = parser.parse_uri(msg.contacts[0].uri)
    assert uri.headers == {"Route": "%3Csip:sip.example.com%3E"}


def test_insuf_is_answered_with_the_missing_headers_named(parser):
    # RFC 4475 §3.3.1: 400; the reason phrase names what is missing (both parsers alike).
    with pytest.raises(ParseError) as info:
        parser.parse_message((TORTURE / "invalid" / "insuf.dat").read_bytes())
    assert (info.value.status, info.value.reason) == (400, "Missing To, From, Call-ID")
    assert info.value.detail == "missing To, From, Call-ID headers"

"""parse_uri and normalize_aor on both implementations."""

from __future__ import annotations

import pytest

from msilo.errors import IncompleteURI, InvalidURI, ParseError, UnsupportedURIScheme
from msilo.sip.message import SipURI


def test_full_sip_uri(parser):
    uri = parser.parse_uri(
        "sip:Alice:secret@Example.COM:5070;transport=TCP;lr;Maddr=x?subject=hi&priority=urgent&flag"
    )
    assert type(uri) is SipURI
    assert uri.scheme == "sip"
    assert (uri.user, uri.password) == ("Alice", "secret")
    assert (uri.host, uri.port) == ("Example.COM", 5070)
    assert uri.params == {"transport": "TCP", "lr": None, "maddr": "x"}
    assert uri.headers == {"subject": "hi", "priority": "urgent", "flag": ""}
    assert uri.raw == (
        "sip:Alice:secret@Example.COM:5070;transport=TCP;lr;Maddr=x?subject=hi&priority=urgent&flag"
    )


def test_uri_without_user(parser):
    uri = parser.parse_uri("sips:proxy.example.com")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sips", None, "proxy.example.com", None)
    assert uri.params == {} and uri.headers == {}


@pytest.mark.parametrize(
    "text,host,port",
    [
        ("sip:bob@[2001:db8::1]", "[2001:db8::1]", None),
        ("sip:[::1]:5060;transport=udp", "[::1]", 5060),
        ("sip:bob@[fe80::1%25eth0]:5061", "[fe80::1%25eth0]", 5061),
        ("sip:192.0.2.1:0", "192.0.2.1", 0),
    ],
)
def test_ip_hosts(parser, text, host, port):
    uri = parser.parse_uri(text)
    assert (uri.host, uri.port) == (host, port)


def test_user_part_may_hold_reserved_characters(parser):
    uri = parser.parse_uri("sip:user;par=u%40example.net@example.com")
    assert (uri.user, uri.host) == ("user;par=u%40example.net", "example.com")
    odd = parser.parse_uri("sip:a?b;c:pw@example.com;x=1")
    assert (odd.user, odd.password, odd.host, odd.params) == (
        "a?b;c",
        "pw",
        "example.com",
        {"x": "1"},
    )


def test_tel_uri(parser):
    uri = parser.parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("tel", "+1-201-555-0123", "", None)
    assert uri.params == {"phone-context": "example.com"}


def test_scheme_is_case_insensitive(parser):
    assert parser.parse_uri("SIP:bob@example.com").scheme == "sip"


@pytest.mark.parametrize("text", ["http://example.com", "mailto:bob@example.com", "im:bob@x"])
def test_other_schemes_are_416(parser, text):
    with pytest.raises(UnsupportedURIScheme) as info:
        parser.parse_uri(text)
    assert info.value.status == 416


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bob@example.com",
        "sip:",
        "sip:@example.com",
        "sip:bob@",
        "sip:bob@exa mple.com",
        "sip:bob@host:port",
        "sip:bob@host:70000",
        "sip:bob@[::1",
        "sip:bob@[::1]x",
        "sip:bob@<host>",
        "sip:bob@ho/st",
        "tel:",
        "tel:;x",
        "sip:bob@host;=v",
        "1sip:bob@host",
        "sip:bob@host\r\n",
        "sip:\ud800@host",
    ],
)
def test_malformed_uris_are_invalid(parser, text):
    with pytest.raises(InvalidURI) as info:
        parser.parse_uri(text)
    assert isinstance(info.value, ParseError) and info.value.status == 400


@pytest.mark.parametrize("value", [None, 42, b"sip:bob@example.com"])
def test_non_str_uri_is_invalid(parser, value):
    with pytest.raises(InvalidURI):
        parser.parse_uri(value)


@pytest.mark.parametrize(
    "text,aor",
    [
        ("sip:bob@example.com", "bob@example.com"),
        ("sip:Bob@EXAMPLE.com:5060;transport=tcp?subject=x", "Bob@example.com"),
        ("sips:bob:pw@Example.Com", "bob@example.com"),
        ("sip:%62%6F%62@example.com", "bob@example.com"),
        ("sip:I%20have%20spaces@example.net", "I have spaces@example.net"),
        ("sip:a%2@example.net", "a%2@example.net"),
        ("sip:caf%C3%A9@example.net", "café@example.net"),
        ("sip:x%FF@example.net", "x\udcff@example.net"),
        ("sip:bob@[2001:DB8::1]:5060", "bob@[2001:db8::1]"),
    ],
)
def test_normalize_aor(parser, text, aor):
    assert parser.normalize_aor(text) == aor
    assert parser.normalize_aor(parser.parse_uri(text)) == aor


def test_normalize_aor_without_user_is_484(parser):
    with pytest.raises(IncompleteURI) as info:
        parser.normalize_aor("sip:example.com")
    assert isinstance(info.value, ParseError)
    assert (info.value.status, info.value.reason) == (484, "Address Incomplete")


def test_normalize_aor_of_tel_uri_is_416(parser):
    with pytest.raises(UnsupportedURIScheme):
        parser.normalize_aor("tel:+15551234")


@pytest.mark.parametrize("value", [None, 3, b"sip:a@b"])
def test_normalize_aor_needs_a_str_or_sip_uri(parser, value):
    with pytest.raises(InvalidURI):
        parser.normalize_aor(value)

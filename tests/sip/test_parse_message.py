"""What the SIP parser returns, field by field (each test runs on the C and the Python parser)."""

from __future__ import annotations

import pytest

from msilo.errors import MessageTooLarge, MsiloError, ParseError, UnsupportedURIScheme
from msilo.sip.headers import COMPACT_FORMS
from msilo.sip.message import (
    Contact,
    ContentType,
    CSeq,
    NameAddr,
    SipRequest,
    SipResponse,
    Via,
)


def sip(text: str) -> bytes:
    """A message written with LF line ends, sent with CRLF (the body too)."""
    return text.replace("\n", "\r\n").encode("utf-8")


MESSAGE = """MESSAGE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport
Max-Forwards: 70
From: "Alice, A." <sip:alice@example.com>;tag=49583
To: <sip:bob@example.com>
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 20 MESSAGE
Content-Type: text/plain;charset=UTF-8
Content-Length: 18

Watson, come here."""


def request(
    extra: str = "",
    *,
    method: str = "MESSAGE",
    drop: tuple[str, ...] = (),
    body: str = "",
    first: str | None = None,
) -> bytes:
    """A minimal valid request, with ``extra`` header lines and without ``drop`` ones."""
    lines = [
        first or f"{method} sip:bob@example.com SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1",
        "From: <sip:alice@example.com>;tag=1",
        "To: <sip:bob@example.com>",
        "Call-ID: c1",
        f"CSeq: 1 {method}",
    ]
    lines = [line for line in lines if line.split(":")[0] not in drop]
    if extra:
        lines.extend(extra.strip("\n").split("\n"))
    return sip("\n".join(lines) + "\n\n" + body)


# --- start line ---------------------------------------------------------------------------


def test_request_line_is_split_into_method_uri_and_version(parser):
    msg = parser.parse_message(sip(MESSAGE))
    assert type(msg) is SipRequest
    assert msg.is_request
    assert (msg.method, msg.uri, msg.version) == ("MESSAGE", "sip:bob@example.com", "SIP/2.0")


def test_response_line_gives_status_and_reason(parser):
    data = sip("""SIP/2.0 202 Accepted for delivery
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>;tag=2
Call-ID: c1
CSeq: 1 MESSAGE
Content-Length: 0

""")
    msg = parser.parse_message(data)
    assert type(msg) is SipResponse
    assert not msg.is_request
    assert (msg.version, msg.status, msg.reason) == ("SIP/2.0", 202, "Accepted for delivery")
    assert msg.to.tag == "2"


def test_response_without_reason_phrase_has_empty_reason(parser):
    data = sip("""SIP/2.0 100
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>
Call-ID: c1
CSeq: 1 MESSAGE

""")
    assert parser.parse_message(data).reason == ""


@pytest.mark.parametrize("code", ["99", "700", "2000", "abc", "20x"])
def test_status_codes_outside_1xx_to_6xx_are_rejected(parser, code):
    data = request(first=f"SIP/2.0 {code} Odd")
    with pytest.raises(ParseError):
        parser.parse_message(data)


def test_other_sip_version_is_505(parser):
    with pytest.raises(ParseError) as info:
        parser.parse_message(request(first="MESSAGE sip:bob@example.com SIP/3.0"))
    assert info.value.status == 505


@pytest.mark.parametrize("scheme", ["http", "mailto", "im", "urn"])
def test_unknown_request_uri_scheme_is_416(parser, scheme):
    with pytest.raises(UnsupportedURIScheme) as info:
        parser.parse_message(request(first=f"MESSAGE {scheme}:bob@example.com SIP/2.0"))
    assert info.value.status == 416


@pytest.mark.parametrize("uri", ["sips:bob@example.com", "SIP:bob@example.com", "tel:+15551234"])
def test_sip_sips_and_tel_request_uris_are_accepted(parser, uri):
    assert parser.parse_message(request(first=f"MESSAGE {uri} SIP/2.0")).uri == uri


# --- headers --------------------------------------------------------------------------------


def test_headers_keep_order_with_canonical_lower_case_names(parser):
    msg = parser.parse_message(sip(MESSAGE))
    assert [name for name, _ in msg.headers] == [
        "via",
        "max-forwards",
        "from",
        "to",
        "call-id",
        "cseq",
        "content-type",
        "content-length",
    ]
    assert msg.headers[2] == ("from", '"Alice, A." <sip:alice@example.com>;tag=49583')


_TYPED = {"from", "to", "call-id", "via", "content-type", "content-length", "contact"}


@pytest.mark.parametrize(
    "short,full",
    sorted((short, full) for short, full in COMPACT_FORMS.items() if full not in _TYPED),
)
def test_compact_forms_are_expanded(parser, short, full):
    msg = parser.parse_message(request(f"X-Before: 1\n{short.upper()}: value-of-{short}"))
    assert msg.get_header(full) == f"value-of-{short}"
    assert (full, f"value-of-{short}") in msg.headers


def test_compact_forms_of_typed_headers_fill_the_typed_fields(parser):
    data = sip("""MESSAGE sip:bob@example.com SIP/2.0
v: SIP/2.0/TCP 192.0.2.10;branch=z9hG4bK1
f: <sip:alice@example.com>;tag=1
t: <sip:bob@example.com>
i: c1
CSeq: 1 MESSAGE
m: <sip:alice@192.0.2.10>
c: text/plain
l: 2

hi""")
    msg = parser.parse_message(data)
    assert msg.via.transport == "TCP"
    assert msg.from_.tag == "1" and msg.to.uri == "sip:bob@example.com"
    assert msg.call_id == "c1"
    assert msg.contacts[0].uri == "sip:alice@192.0.2.10"
    assert msg.content_type.mime == "text/plain"
    assert msg.content_length == 2 and msg.body == b"hi"
    assert [n for n, _ in msg.headers][:4] == ["via", "from", "to", "call-id"]


def test_header_names_are_case_insensitive_and_may_have_space_before_colon(parser):
    msg = parser.parse_message(request("sUbJeCt   : hello\nX-Custom-Thing: 1"))
    assert msg.get_header("Subject") == "hello"
    assert msg.get_header("s") == "hello"
    assert ("x-custom-thing", "1") in msg.headers


def test_repeated_headers_are_kept_in_order(parser):
    msg = parser.parse_message(request("Route: <sip:p1.example.com;lr>\nRoute: <sip:p2;lr>"))
    assert msg.get_headers("route") == ["<sip:p1.example.com;lr>", "<sip:p2;lr>"]


def test_folded_lines_are_joined_with_one_space(parser):
    msg = parser.parse_message(request("Subject: first part  \n   second part\n\tthird"))
    assert msg.get_header("subject") == "first part second part third"


def test_folding_inside_a_typed_header(parser):
    data = request("Contact: <sip:a@192.0.2.1>\n ;expires=60\n  , <sip:b@192.0.2.2>")
    msg = parser.parse_message(data)
    assert [c.uri for c in msg.contacts] == ["sip:a@192.0.2.1", "sip:b@192.0.2.2"]
    assert msg.contacts[0].expires == 60


def test_empty_header_value_is_kept(parser):
    assert parser.parse_message(request("Subject:")).get_header("subject") == ""


@pytest.mark.parametrize("line", ["NoColonHere", "Bad Name: x", ": no name", "Bad@Name: x"])
def test_malformed_header_lines_are_400(parser, line):
    with pytest.raises(ParseError) as info:
        parser.parse_message(request(line))
    assert info.value.status == 400


def test_continuation_before_any_header_is_400(parser):
    data = sip("MESSAGE sip:bob@example.com SIP/2.0\n  folded\nCall-ID: x\n\n")
    with pytest.raises(ParseError):
        parser.parse_message(data)


def test_lf_only_line_ends_are_tolerated(parser):
    data = sip(MESSAGE).replace(b"\r\n", b"\n")
    msg = parser.parse_message(data)
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.body == b"Watson, come here."


def test_crlf_before_the_start_line_is_ignored(parser):
    msg = parser.parse_message(b"\r\n\r\n" + sip(MESSAGE))
    assert msg.method == "MESSAGE"


def test_non_utf8_bytes_survive_as_surrogate_escapes(parser):
    msg = parser.parse_message(request("Subject: caf\xe9").replace(b"caf\xc3\xa9", b"caf\xe9"))
    assert msg.get_header("subject") == "caf\udce9"
    assert msg.get_header("subject").encode("utf-8", "surrogateescape") == b"caf\xe9"


# --- Via ------------------------------------------------------------------------------------


def test_top_via_fields(parser):
    via = parser.parse_message(sip(MESSAGE)).via
    assert type(via) is Via
    assert (via.protocol, via.transport, via.host, via.port) == (
        "SIP/2.0",
        "UDP",
        "192.0.2.10",
        5060,
    )
    assert via.branch == "z9hG4bK776asdhds"
    assert via.rport is None and "rport" in via.params and via.params["rport"] is None
    assert via.received is None
    assert via.raw == "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport"


def test_via_received_and_rport_value(parser):
    data = request().replace(
        b"branch=z9hG4bK1", b"branch=z9hG4bK1;received=198.51.100.7;rport=40123;X=Y"
    )
    via = parser.parse_message(data).via
    assert via.received == "198.51.100.7"
    assert via.rport == 40123
    assert via.params == {
        "branch": "z9hG4bK1",
        "received": "198.51.100.7",
        "rport": "40123",
        "x": "Y",
    }


def test_top_via_is_the_first_value_of_the_first_via_header(parser):
    data = sip("""MESSAGE sip:bob@example.com SIP/2.0
Via: SIP/2.0/TLS proxy.example.com;branch=z9hG4bKtop, SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK2
Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK3
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>
Call-ID: c1
CSeq: 1 MESSAGE

""")
    via = parser.parse_message(data).via
    assert (via.transport, via.host, via.branch) == ("TLS", "proxy.example.com", "z9hG4bKtop")
    assert via.raw == "SIP/2.0/TLS proxy.example.com;branch=z9hG4bKtop"


def test_via_with_ipv6_sent_by(parser):
    data = request().replace(b"192.0.2.10;", b"[2001:db8::9]:5070;")
    via = parser.parse_message(data).via
    assert (via.host, via.port) == ("[2001:db8::9]", 5070)


def test_via_with_whitespace_around_slashes_and_colon(parser):
    data = request().replace(
        b"SIP/2.0/UDP 192.0.2.10;", b"SIP / 2.0 / udp   host.example.com : 5080 ;"
    )
    via = parser.parse_message(data).via
    assert (via.protocol, via.transport, via.host, via.port) == (
        "SIP/2.0",
        "UDP",
        "host.example.com",
        5080,
    )


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0 192.0.2.1",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP a:b",
        "SIP/2.0/UDP 192.0.2.1:99999",
        "SIP/2.0/UDP h;;",
        "SIP/2.0/UDP h;branch=",
        "SIP/2.0/UDP [::1",
    ],
)
def test_malformed_top_via_is_400(parser, value):
    data = request().replace(b"SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", value.encode())
    with pytest.raises(ParseError):
        parser.parse_message(data)


# --- From / To --------------------------------------------------------------------------------


def test_from_with_quoted_display_name_holding_a_comma(parser):
    frm = parser.parse_message(sip(MESSAGE)).from_
    assert type(frm) is NameAddr
    assert frm.display == "Alice, A."
    assert frm.uri == "sip:alice@example.com"
    assert frm.tag == "49583"
    assert frm.params == {"tag": "49583"}


def test_display_name_with_escaped_quotes(parser):
    data = request().replace(b"From: <", b'From: "Joe \\"the\\" \\\\ Sixpack" <')
    assert parser.parse_message(data).from_.display == 'Joe "the" \\ Sixpack'


def test_token_display_name(parser):
    data = request().replace(b"From: <", b"From: Alice  Liddell<")
    assert parser.parse_message(data).from_.display == "Alice  Liddell"


def test_addr_spec_without_brackets_takes_params_as_header_params(parser):
    data = request().replace(
        b"From: <sip:alice@example.com>;tag=1", b"From: sip:alice@example.com ; tag = 1 ;x"
    )
    frm = parser.parse_message(data).from_
    assert (frm.display, frm.uri, frm.tag) == (None, "sip:alice@example.com", "1")
    assert frm.params == {"tag": "1", "x": None}


def test_uri_params_inside_brackets_stay_in_the_uri(parser):
    data = request().replace(
        b"To: <sip:bob@example.com>", b"To: <sip:bob@example.com;transport=tcp>;tag=9"
    )
    to = parser.parse_message(data).to
    assert to.uri == "sip:bob@example.com;transport=tcp"
    assert to.params == {"tag": "9"}


@pytest.mark.parametrize(
    "value",
    [
        '"unterminated <sip:a@b>',
        "<sip:a@b",
        "< sip:a@b >",
        "Bell, Alex <sip:a@b>",
        "<sip:a@b> junk",
        "sip:a@b?x=1",
        "<>",
        "<sip:a@b>;tag=1;;",
    ],
)
def test_malformed_from_is_400(parser, value):
    data = request().replace(b"<sip:alice@example.com>;tag=1", value.encode())
    with pytest.raises(ParseError):
        parser.parse_message(data)


# --- Call-ID, CSeq, Max-Forwards, Expires -------------------------------------------------------


def test_call_id_and_cseq(parser):
    msg = parser.parse_message(sip(MESSAGE))
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert type(msg.cseq) is CSeq
    assert (msg.cseq.number, msg.cseq.method) == (20, "MESSAGE")


def test_cseq_with_leading_zeros_and_folding(parser):
    data = request().replace(b"CSeq: 1 MESSAGE", b"CSeq: 0009\r\n  MESSAGE")
    assert parser.parse_message(data).cseq.number == 9


@pytest.mark.parametrize(
    "value", ["1 INVITE", "1", "x MESSAGE", "2147483648 MESSAGE", "-1 MESSAGE"]
)
def test_bad_or_mismatched_cseq_is_400(parser, value):
    data = request().replace(b"CSeq: 1 MESSAGE", f"CSeq: {value}".encode())
    with pytest.raises(ParseError) as info:
        parser.parse_message(data)
    assert info.value.status == 400


def test_max_forwards(parser):
    assert parser.parse_message(sip(MESSAGE)).max_forwards == 70
    assert parser.parse_message(request()).max_forwards is None


@pytest.mark.parametrize("value", ["seventy", "", "-1", "256", "7 0"])
def test_bad_max_forwards_is_400(parser, value):
    with pytest.raises(ParseError) as info:
        parser.parse_message(request(f"Max-Forwards: {value}"))
    assert info.value.status == 400


def test_expires_header_and_clamping(parser):
    assert parser.parse_message(request("Expires: 3600")).expires == 3600
    assert parser.parse_message(request("Expires: 99999999999999")).expires == 2**32 - 1
    assert parser.parse_message(request()).expires is None
    with pytest.raises(ParseError):
        parser.parse_message(request("Expires: soon"))


@pytest.mark.parametrize(
    "header",
    [
        "From: <sip:x@y>;tag=2",
        "To: <sip:x@y>",
        "Call-ID: c2",
        "CSeq: 2 MESSAGE",
        "Max-Forwards: 1\nMax-Forwards: 2",
        "l: 0\nContent-Length: 0",
        "c: a/b\nc: a/b",
        "Expires: 1\nExpires: 1",
    ],
)
def test_single_valued_header_twice_is_400(parser, header):
    with pytest.raises(ParseError):
        parser.parse_message(request(header))


@pytest.mark.parametrize("missing", ["To", "From", "Call-ID", "CSeq", "Via"])
def test_request_without_a_mandatory_header_is_400(parser, missing):
    with pytest.raises(ParseError) as info:
        parser.parse_message(request(drop=(missing,)))
    assert info.value.status == 400


# --- Content-Type, Allow, Contact ----------------------------------------------------------------


def test_content_type(parser):
    data = request('Content-Type: Text/Plain ; charset="UTF-8" ; format=flowed')
    ctype = parser.parse_message(data).content_type
    assert type(ctype) is ContentType
    assert (ctype.type, ctype.subtype, ctype.mime) == ("text", "plain", "text/plain")
    assert ctype.params == {"charset": "UTF-8", "format": "flowed"}
    assert ctype.raw == 'Text/Plain ; charset="UTF-8" ; format=flowed'


@pytest.mark.parametrize("value", ["text", "/plain", "text/", "te xt/plain"])
def test_malformed_content_type_is_400(parser, value):
    with pytest.raises(ParseError):
        parser.parse_message(request(f"Content-Type: {value}"))


def test_allow_is_an_upper_case_tuple_over_every_allow_header(parser):
    msg = parser.parse_message(request("Allow: invite, ACK ,message\nAllow: OPTIONS"))
    assert msg.allow == ("INVITE", "ACK", "MESSAGE", "OPTIONS")
    assert parser.parse_message(request()).allow is None


def test_contacts_split_around_quoted_strings_and_brackets(parser):
    data = request(
        'Contact: "Doe, John" <sip:j@192.0.2.1;p=a,b>;expires=60;q=0.5, '
        "<sip:x@192.0.2.2>\nm: sip:y@192.0.2.3;expires=10"
    )
    contacts = parser.parse_message(data).contacts
    assert all(type(c) is Contact for c in contacts)
    assert [(c.display, c.uri, c.expires, c.q) for c in contacts] == [
        ("Doe, John", "sip:j@192.0.2.1;p=a,b", 60, 0.5),
        (None, "sip:x@192.0.2.2", None, None),
        (None, "sip:y@192.0.2.3", 10, None),
    ]


def test_contact_feature_parameters(parser):
    data = request(
        'Contact: <sip:a@192.0.2.1;ob>;+sip.instance="<urn:uuid:00000000-0000-1000-'
        '8000-AABBCCDDEEFF>";reg-id=1;methods="invite, Message,OPTIONS";expires='
        "99999999999"
    )
    contact = parser.parse_message(data).contacts[0]
    assert contact.instance == "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"
    assert contact.methods == ("INVITE", "MESSAGE", "OPTIONS")
    assert contact.expires == 2**32 - 1
    assert contact.params["reg-id"] == "1"
    assert contact.params["methods"] == '"invite, Message,OPTIONS"'


def test_contact_star(parser):
    msg = parser.parse_message(request("Contact: *\nExpires: 0"))
    assert msg.contact_star and msg.contacts == []
    assert parser.parse_message(request()).contact_star is False
    with pytest.raises(ParseError):
        parser.parse_message(request("Contact: *\nContact: <sip:a@b>"))
    with pytest.raises(ParseError):
        parser.parse_message(request("Contact: <sip:a@b>, *"))


@pytest.mark.parametrize("value", ["<sip:a@b>,", ", <sip:a@b>", '"open <sip:a@b>', "<sip:a@b;x=1"])
def test_malformed_contact_list_is_400(parser, value):
    with pytest.raises(ParseError):
        parser.parse_message(request(f"Contact: {value}"))


@pytest.mark.parametrize(
    "line",
    [
        "Content-Type: text/plain;=utf-8",
        'Content-Type: text/plain;charset="open',
        "Content-Type: text/plain;charset=",
        "Contact: <sip:a@b>;expires=",
        "Contact: <sip:a@b>;;q=1",
        'Contact: <sip:a@b>;+sip.instance="open',
    ],
)
def test_bad_parameters_of_built_on_read_headers_are_refused_by_the_parse(parser, line):
    # the C parser builds Content-Type and Contact objects on first read, but checks
    # them while parsing: the error comes from parse_message, as in the twin
    with pytest.raises(ParseError):
        parser.parse_message(request(line))


def test_headers_read_later_are_the_same_object_on_every_read(parser):
    msg = parser.parse_message(
        request("Contact: <sip:a@192.0.2.1>\nAllow: MESSAGE\nContent-Type: text/plain")
    )
    assert msg.headers is msg.headers
    assert msg.contacts is msg.contacts
    assert msg.content_type is msg.content_type
    assert msg.allow == ("MESSAGE",)
    msg.contacts.append("kept")
    assert msg.contacts[-1] == "kept"


def test_fields_and_repr_show_only_public_names(parser):
    msg = parser.parse_message(sip(MESSAGE))
    assert msg.fields()[:2] == ("headers", "body")
    assert "content_type" in msg.fields() and "allow" in msg.fields()
    assert not any(name.startswith("_") for name in msg.fields())
    assert set(msg.as_dict()) == set(msg.fields())
    assert "PENDING" not in repr(msg)
    assert "_source" not in repr(msg)


def test_headers_can_be_assigned_like_any_field(parser):
    msg = parser.parse_message(sip(MESSAGE))
    msg.headers = [("via", "x")]
    msg.content_type = None
    msg.allow = ("ACK",)
    msg.contacts = []
    assert (msg.headers, msg.content_type, msg.allow, msg.contacts) == (
        [("via", "x")],
        None,
        ("ACK",),
        [],
    )


def test_folded_content_type_and_contact_are_built_from_the_unfolded_value(parser):
    msg = parser.parse_message(
        request(
            "Content-Type: text/plain;\n charset=UTF-8\nContact: <sip:a@192.0.2.1>,\n\t<sip:b@x>"
        )
    )
    assert msg.content_type.params == {"charset": "UTF-8"}
    assert msg.content_type.raw == "text/plain; charset=UTF-8"
    assert [c.uri for c in msg.contacts] == ["sip:a@192.0.2.1", "sip:b@x"]
    assert msg.get_header("contact") == "<sip:a@192.0.2.1>, <sip:b@x>"


def test_many_headers_keep_their_order(parser):
    extra = "\n".join(f"X-H{i}: v{i}" for i in range(60)) + "\nAllow: ACK"
    msg = parser.parse_message(request(extra))
    names = [name for name, _ in msg.headers]
    assert names[:5] == ["via", "from", "to", "call-id", "cseq"]
    assert names[5:65] == [f"x-h{i}" for i in range(60)]
    assert msg.get_header("x-h59") == "v59" and msg.allow == ("ACK",)


# --- body framing ---------------------------------------------------------------------------------


def test_body_is_content_length_bytes(parser):
    msg = parser.parse_message(sip(MESSAGE))
    assert msg.content_length == 18 and msg.body == b"Watson, come here."


def test_bytes_beyond_content_length_are_ignored(parser):
    msg = parser.parse_message(request("Content-Length: 5", body="hello, and more"))
    assert msg.body == b"hello"


def test_missing_content_length_takes_the_rest_of_the_datagram(parser):
    msg = parser.parse_message(request(body="the rest\n"))
    assert msg.content_length is None and msg.body == b"the rest\r\n"


@pytest.mark.parametrize("value", ["50", "-1", "ten", "99999999999999999999"])
def test_bad_or_too_large_content_length_is_400(parser, value):
    with pytest.raises(ParseError):
        parser.parse_message(request(f"Content-Length: {value}", body="short"))


def test_binary_body_is_kept_verbatim(parser):
    body = bytes(range(256))
    data = request(f"Content-Length: {len(body)}") + body
    assert parser.parse_message(data).body == body


# --- inputs and limits ---------------------------------------------------------------------


def test_bytearray_and_memoryview_inputs(parser):
    data = sip(MESSAGE)
    expected = parser.parse_message(data)
    assert parser.parse_message(bytearray(data)) == expected
    assert parser.parse_message(memoryview(data)) == expected
    assert parser.parse_message(memoryview(b"xx" + data)[2:]) == expected


@pytest.mark.parametrize("value", ["MESSAGE sip:a@b SIP/2.0\r\n\r\n", None, 42, [b"x"]])
def test_non_bytes_input_is_a_parse_error(parser, value):
    with pytest.raises(ParseError):
        parser.parse_message(value)


@pytest.mark.parametrize(
    "data", [b"", b"\r\n\r\n", b"MESSAGE sip:a@b SIP/2.0\r\nTo: x\r\n", b"garbage", b"\x00\xff\xfe"]
)
def test_empty_or_truncated_messages_are_400(parser, data):
    with pytest.raises(ParseError) as info:
        parser.parse_message(data)
    assert info.value.status == 400


def test_message_over_the_size_limit_is_513(parser):
    big = request("X-Pad: " + "p" * 70000)
    with pytest.raises(MessageTooLarge) as info:
        parser.parse_message(big)
    assert info.value.status == 513
    with pytest.raises(MessageTooLarge):
        parser.parse_message(sip(MESSAGE), max_size=100)
    assert parser.parse_message(sip(MESSAGE), max_size=len(sip(MESSAGE))).method == "MESSAGE"


def test_errors_are_msilo_errors_with_a_status(parser):
    with pytest.raises(MsiloError) as info:
        parser.parse_message(b"INVITE")
    assert isinstance(info.value, ParseError)
    assert info.value.status == 400 and info.value.reason == "Bad Request"


def test_both_parsers_return_equal_values(parser):
    from msilo.sip._parse_py import parse_message as reference

    assert parser.parse_message(sip(MESSAGE)).as_dict() == reference(sip(MESSAGE)).as_dict()

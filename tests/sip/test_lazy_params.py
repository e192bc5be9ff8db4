"""Via and From/To fields the C parser builds on first read (``params``, Via ``raw``, display).

The C parser checks every parameter during ``parse_message`` and captures branch,
received, rport and tag while scanning; the dicts (and Via ``raw``, the display name)
are built from the received bytes when first read.  Whatever the order of reads, the
values must be those of the twin, and a bad parameter must still fail the parse.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from msilo.errors import ParseError
from msilo.sip import parser as selector
from msilo.sip.build import annotate_via
from msilo.sip.message import NameAddr, Via

needs_c = pytest.mark.skipif(selector._fastparse is None, reason="msilo._fastparse is not built")


def _message(via: str, from_: str, to: str, *, fold: bool = False) -> bytes:
    sep = "\r\n " if fold else " "
    return (
        "MESSAGE sip:bob@example.com SIP/2.0\r\n"
        f"Via:{sep}{via}\r\n"
        f"From:{sep}{from_}\r\n"
        f"To:{sep}{to}\r\n"
        "Call-ID: c1@example.com\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


CASES = [
    ("SIP/2.0/UDP h:5060;branch=z9hG4bK1;rport", '"A" <sip:a@h>;tag=1', "<sip:b@h>"),
    ("SIP/2.0/UDP h;BRANCH=z9hG4bK2;RPort=5061;Received=192.0.2.1", "<sip:a@h>;TAG=x", "sip:b@h"),
    ("SIP/2.0/UDP h;branch=1;branch=2;rport=7;rport", "sip:a@h;tag=1;tag;x=y", "<sip:b@h>;tag"),
    ("SIP/2.0/UDP h;rport=70000;received;branch", 'A B <sip:a@h>;tag="q;t"', "<sip:b@h>;t=1"),
    (
        "SIP/2.0/TCP [2001:db8::1]:5070 ; branch = z ; rport = 00080",
        '"x\\"y" <sip:a@h>',
        "<sip:b@h>",
    ),
    ("SIP/2.0/UDP h:99999999999", "<sip:a@h>", "<sip:b@h>"),
    ("SIP/2.0/UDP h;Ta\u00efg=\u00e9;rport=5099", "<sip:a@h>;t\u00e9=1;tag=\u00e9", "<sip:b@h>"),
]


def _both(data: bytes) -> tuple[Any, Any]:
    try:
        expected: Any = selector.parse_message_py(data)
    except ParseError as exc:
        expected = (type(exc), str(exc))
    try:
        got: Any = selector.parse_message_c(data)
    except ParseError as exc:
        got = (type(exc), str(exc))
    return expected, got


@needs_c
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize(("via", "from_", "to"), CASES)
def test_lazy_fields_match_the_twin_in_any_read_order(
    via: str, from_: str, to: str, fold: bool
) -> None:
    data = _message(via, from_, to, fold=fold)
    expected, got = _both(data)
    if isinstance(expected, tuple):
        assert got == expected
        return
    # eager fields first, before anything lazy was built
    for name in ("branch", "received", "rport", "host", "port", "transport", "protocol"):
        assert getattr(got.via, name) == getattr(expected.via, name), name
    assert (got.from_.tag, got.to.tag, got.from_.uri) == (
        expected.from_.tag,
        expected.to.tag,
        expected.from_.uri,
    )
    # then the lazy ones, To before From, raw before params
    assert got.to.params == expected.to.params
    assert got.via.raw == expected.via.raw
    assert got.from_.params == expected.from_.params
    assert got.via.params == expected.via.params
    assert got.from_.display == expected.from_.display
    assert got.to.display == expected.to.display
    assert got.as_dict() == expected.as_dict()
    # read twice: same objects
    assert got.via.params is got.via.params
    assert got.from_.display is got.from_.display


@needs_c
def test_lazy_fields_outlive_the_message() -> None:
    data = _message("SIP/2.0/UDP h;branch=z9hG4bK1;rport", '"Al" <sip:a@h>;tag=1', "<sip:b@h>")
    msg = selector.parse_message_c(data)
    via, frm, to = msg.via, msg.from_, msg.to
    del msg
    gc.collect()
    assert via.params == {"branch": "z9hG4bK1", "rport": None}
    assert via.raw == "SIP/2.0/UDP h;branch=z9hG4bK1;rport"
    assert (frm.display, frm.params, to.params) == ("Al", {"tag": "1"}, {})


@needs_c
def test_lazy_fields_can_be_assigned() -> None:
    msg = selector.parse_message_c(
        _message("SIP/2.0/UDP h;branch=b", "<sip:a@h>;tag=1", "<sip:b@h>")
    )
    msg.via.params = {"x": "1"}
    msg.via.raw = "r"
    msg.from_.params = {}
    msg.from_.display = "D"
    assert (msg.via.params, msg.via.raw, msg.from_.params, msg.from_.display) == (
        {"x": "1"},
        "r",
        {},
        "D",
    )
    assert "_source" not in repr(msg) and "PENDING" not in repr(msg)


@pytest.mark.parametrize(
    ("via", "from_", "to"),
    [
        ("SIP/2.0/UDP h;branch=", "<sip:a@h>;tag=1", "<sip:b@h>"),
        ("SIP/2.0/UDP h;;branch=1", "<sip:a@h>;tag=1", "<sip:b@h>"),
        ("SIP/2.0/UDP h;branch=a b", "<sip:a@h>;tag=1", "<sip:b@h>"),
        ('SIP/2.0/UDP h;x="open', "<sip:a@h>;tag=1", "<sip:b@h>"),
        ("SIP/2.0/UDP h;branch=1", "<sip:a@h>;tag=", "<sip:b@h>"),
        ("SIP/2.0/UDP h;branch=1", "<sip:a@h>;tag=1", "<sip:b@h>;=x"),
        ("SIP/2.0/UDP h;branch=1", '<sip:a@h>;tag=1;x="a"b', "<sip:b@h>"),
    ],
)
def test_bad_parameters_fail_the_parse(parser: Any, via: str, from_: str, to: str) -> None:
    with pytest.raises(ParseError):
        parser.parse_message(_message(via, from_, to))


@needs_c
def test_failed_parse_leaves_no_cyclic_garbage() -> None:
    # Via, From and To are built before the bad CSeq: no cycle through the _Source
    bad = _message("SIP/2.0/UDP h;branch=1", '"A" <sip:a@h>;tag=1', "<sip:b@h>").replace(
        b"CSeq: 1 MESSAGE", b"CSeq: x MESSAGE"
    )
    good = _message("SIP/2.0/UDP h;branch=1", '"A" <sip:a@h>;tag=1', "<sip:b@h>")
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(50):
            with pytest.raises(ParseError):
                selector.parse_message_c(bad)
            msg = selector.parse_message_c(good)
            _ = (msg.via.params, msg.from_.display)
            del msg
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


@needs_c
def test_buffer_is_released_with_the_values() -> None:
    data = bytes(_message("SIP/2.0/UDP h;branch=1", "<sip:a@h>;tag=1", "<sip:b@h>"))
    before = sys.getrefcount(data)
    msg = selector.parse_message_c(data)
    via = msg.via
    del msg
    assert sys.getrefcount(data) > before  # the Via still needs it for params
    del via
    assert sys.getrefcount(data) == before


@pytest.mark.parametrize(
    "via",
    [
        "SIP/2.0/UDP 192.0.2.1:5060;branch=1;rport",
        "SIP/2.0/UDP 192.0.2.1:5060;branch=1;rport=5060",
        "SIP/2.0/UDP 192.0.2.9;branch=1;rport=7",
        "SIP/2.0/UDP 192.0.2.9;branch=1;received=192.0.2.1;rport",
        "SIP/2.0/UDP 192.0.2.9;branch=1;received",
        "SIP/2.0/UDP host;branch=1;rport=1;rport",
    ],
)
def test_annotate_via_same_for_both_parsers(parser: Any, via: str) -> None:
    data = _message(via, "<sip:a@h>;tag=1", "<sip:b@h>")
    got = annotate_via(parser.parse_message(data).via, "192.0.2.1", 5099)
    assert got == annotate_via(selector.parse_message_py(data).via, "192.0.2.1", 5099)


def test_value_types_keep_their_public_fields() -> None:
    assert Via.fields() == (
        "branch",
        "host",
        "params",
        "port",
        "protocol",
        "raw",
        "received",
        "rport",
        "transport",
    )
    assert NameAddr.fields() == ("display", "params", "tag", "uri")


@needs_c
def test_shallow_copies_build_the_same_lazy_fields() -> None:
    import copy

    data = _message("SIP/2.0/UDP h;branch=1;rport", '"F" <sip:a@h>;tag=1', '"T" <sip:b@h>;tag=2')
    msg = selector.parse_message_c(data)
    via, frm, to = copy.copy(msg.via), copy.copy(msg.from_), copy.copy(msg.to)
    assert (to.params, to.display) == ({"tag": "2"}, "T")
    assert (frm.params, frm.display) == ({"tag": "1"}, "F")
    assert (via.params, via.raw) == ({"branch": "1", "rport": None}, "SIP/2.0/UDP h;branch=1;rport")
    assert msg.as_dict() == selector.parse_message_py(data).as_dict()


@needs_c
def test_copies_of_from_and_to_with_the_request_uri() -> None:
    import copy

    data = _message(
        "SIP/2.0/UDP h;branch=1", '"F" <sip:bob@example.com>', '"T" <sip:bob@example.com>;x'
    )
    msg = selector.parse_message_c(data)
    frm, to = copy.copy(msg.from_), copy.copy(msg.to)
    assert (frm.display, frm.params, to.display, to.params) == ("F", {}, "T", {"x": None})

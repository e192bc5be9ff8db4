"""route_uris: the URIs of Path / Route / Record-Route values (RFC 3261 §20.34, RFC 3327)."""

from __future__ import annotations

import pytest

from msilo.errors import ParseError
from msilo.sip.parser import route_uris


def test_values_and_comma_lists_keep_their_order() -> None:
    values = [
        '"Edge, west" <sip:edge.example.com;lr>, <sip:p2.example.com:5070;transport=tcp;lr>',
        "<sips:core.example.com;lr>",
    ]
    assert route_uris(values) == [
        "sip:edge.example.com;lr",
        "sip:p2.example.com:5070;transport=tcp;lr",
        "sips:core.example.com;lr",
    ]


def test_no_values_is_an_empty_route_set() -> None:
    assert route_uris([]) == []


@pytest.mark.parametrize(
    "value",
    [
        "sip:edge.example.com;lr",  # addr-spec: the ;lr would belong to the header, not the URI
        "<tel:+15551234>",
        "<sip:edge.example.com;lr>,",  # an empty element
        "<sip:edge.example.com;lr",
        '"unterminated <sip:edge.example.com>',
        "<sip:>",
    ],
)
def test_what_is_not_a_route_is_a_400(value: str) -> None:
    with pytest.raises(ParseError) as info:
        route_uris([value])
    assert info.value.status == 400

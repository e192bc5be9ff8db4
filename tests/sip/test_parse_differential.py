"""Property tests: the C parser and its Python twin agree, and nothing but msilo errors escape.

Bounded (a few hundred examples each, no example database) so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from msilo.errors import MsiloError
from msilo.sip import parser as selector

TORTURE = sorted((Path(__file__).resolve().parent.parent / "data" / "torture").glob("*/*.dat"))

needs_c = pytest.mark.skipif(selector._fastparse is None, reason="msilo._fastparse is not built")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def outcome(func: Any, *args: Any) -> Any:
    """The result as plain data, or the exception class and status (never anything else)."""
    try:
        result = func(*args)
    except MsiloError as exc:
        return ("error", type(exc).__name__, getattr(exc, "status", None))
    return result.as_dict() if hasattr(result, "as_dict") else result


# --- generated messages ---------------------------------------------------------------------

token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=12,
)
host = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z][a-z0-9-]{0,8}){0,2}", fullmatch=True),
    st.from_regex(r"192\.0\.2\.[0-9]{1,3}", fullmatch=True),
    st.sampled_from(["[2001:db8::1]", "[::1]", "EXAMPLE.com"]),
)
port = st.one_of(st.just(""), st.integers(0, 65535).map(lambda p: f":{p}"))
user = st.from_regex(r"[a-zA-Z0-9._~%-]{1,10}", fullmatch=True)
sws = st.sampled_from(["", " ", "  ", "\t", "\r\n ", "\r\n\t"])
qtext = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_characters='"\\'), max_size=10
)
display = st.one_of(
    st.just(""),
    token.map(lambda t: t + " "),
    st.lists(st.one_of(qtext, st.sampled_from(['\\"', "\\\\", ",", ";", "<>"])), max_size=4).map(
        lambda parts: '"' + "".join(parts) + '" '
    ),
)
param_value = st.one_of(token, st.just('"quoted, ;value"'), st.just("[::1]"))
params = st.lists(st.tuples(token, st.one_of(st.none(), param_value)), max_size=3).map(
    lambda items: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in items)
)


@st.composite
def name_addr(draw: Any, tag: bool) -> str:
    uri = f"sip:{draw(user)}@{draw(host)}{draw(port)}"
    extra = draw(params)
    tag_param = f";tag={draw(token)}" if tag else ""
    if draw(st.booleans()):
        return f"{draw(display)}<{uri}{draw(params)}>{tag_param}{extra}"
    return f"{uri}{tag_param}{extra}"


@st.composite
def sip_message(draw: Any) -> bytes:
    method = draw(st.sampled_from(["MESSAGE", "REGISTER", "OPTIONS", "INVITE", "X-NEW"]))
    response = draw(st.booleans())
    if response:
        first = f"SIP/2.0 {draw(st.integers(100, 699))} {draw(qtext)}"
    else:
        first = f"{method} sip:{draw(user)}@{draw(host)}{draw(port)}{draw(params)} SIP/2.0"
    transport = draw(st.sampled_from(["UDP", "tcp", "TLS", "WS"]))
    via = (
        f"SIP{draw(sws)}/{draw(sws)}2.0{draw(sws)}/{draw(sws)}{transport} "
        f"{draw(host)}{draw(port)};branch=z9hG4bK{draw(token)}{draw(params)}"
    )
    headers = [
        ("Via", via),
        (draw(st.sampled_from(["From", "f", "FROM"])), draw(name_addr(True))),
        (draw(st.sampled_from(["To", "t"])), draw(name_addr(draw(st.booleans())))),
        (draw(st.sampled_from(["Call-ID", "i"])), draw(token) + "@" + draw(host)),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))}{draw(sws)} {method}"),
    ]
    optional = [
        ("Max-Forwards", str(draw(st.integers(0, 255)))),
        ("Expires", str(draw(st.integers(0, 2**33)))),
        (
            draw(st.sampled_from(["Contact", "m"])),
            ", ".join(draw(st.lists(name_addr(False), min_size=1, max_size=3))),
        ),
        ("Contact", "*"),
        ("Allow", ", ".join(draw(st.lists(token, max_size=4)))),
        (
            draw(st.sampled_from(["Content-Type", "c"])),
            f"{draw(token)}/{draw(token)}{draw(params)}",
        ),
        ("Subject", draw(qtext)),
        ("X-Folded", f"one{draw(sws)}two"),
        ("Via", via),
    ]
    headers += draw(st.lists(st.sampled_from(optional), max_size=5, unique_by=lambda h: h[0]))
    headers = draw(st.permutations(headers))
    body = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        headers.append((draw(st.sampled_from(["Content-Length", "l"])), str(len(body))))
    eol = "\r\n" if draw(st.integers(0, 4)) else "\n"
    head = eol.join(
        [first]
        + [f"{name}{draw(sws).strip(chr(13) + chr(10))}: {value}" for name, value in headers]
    )
    return (head + eol + eol).encode("utf-8", "surrogateescape") + body


@st.composite
def mutated(draw: Any, base: Any) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):  # a delimiter or an odd byte
            data[pos] = draw(st.sampled_from(b' \t\r\n:;,"<>\\/@=%*?[]\x00\x80\xff0aZ'))
        elif op == "insert":
            data[pos:pos] = draw(
                st.sampled_from(
                    [
                        b"\r\n",
                        b"\r\n ",
                        b";",
                        b",",
                        b'"',
                        b"<",
                        b">",
                        b"\\",
                        b"\xc3",
                        b"\xa9",
                        b"  ",
                    ]
                )
            )
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 30))]
    return bytes(data)


torture_files = st.sampled_from(TORTURE).map(lambda p: p.read_bytes())


@needs_c
@SETTINGS
@given(sip_message())
def test_parsers_agree_on_generated_messages(data):
    expected = outcome(selector.parse_message_py, data)
    # about two thirds of the generated messages are valid (see --hypothesis-show-statistics)
    event("valid" if isinstance(expected, dict) else f"refused {expected[1:]}")
    assert outcome(selector.parse_message_c, data) == expected


@needs_c
@SETTINGS
@given(st.one_of(mutated(sip_message()), mutated(torture_files)))
def test_parsers_agree_on_mutated_messages(data):
    assert outcome(selector.parse_message_c, data) == outcome(selector.parse_message_py, data)


uri_text = st.one_of(
    st.builds(
        lambda s, u, h, p, q: f"{s}:{u}{h}{p}{q}",
        st.sampled_from(["sip", "sips", "SIP", "tel", "http", "x1"]),
        st.one_of(st.just(""), user.map(lambda u: u + "@"), st.just("a:b@"), st.just("@")),
        host,
        port,
        params,
    ),
    st.text(max_size=30),
    st.text(st.characters(blacklist_categories=["Cc"]), max_size=20).map(lambda t: "sip:" + t),
)


@needs_c
@SETTINGS
@given(uri_text)
def test_parsers_agree_on_uris(text):
    assert outcome(selector.parse_uri_c, text) == outcome(selector.parse_uri_py, text)
    assert outcome(selector.normalize_aor_c, text) == outcome(selector.normalize_aor_py, text)


# --- fuzz: only msilo errors, never a hang ----------------------------------------------------


@pytest.mark.timeout(60)
@SETTINGS
@given(st.one_of(st.binary(max_size=300), mutated(torture_files), mutated(sip_message())))
def test_fuzzed_bytes_raise_only_msilo_errors(parser, data):
    with contextlib.suppress(MsiloError):
        parser.parse_message(data)


@pytest.mark.timeout(60)
@SETTINGS
@given(st.one_of(uri_text, st.text(max_size=40)))
def test_fuzzed_uris_raise_only_msilo_errors(parser, text):
    for func in (parser.parse_uri, parser.normalize_aor):
        with contextlib.suppress(MsiloError):
            func(text)

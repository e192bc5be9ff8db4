"""TCP stream framing: message boundaries by Content-Length, keep-alives, bad lengths."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msilo.errors import MessageTooLarge, ParseError
from msilo.sip.framing import PING, StreamFramer


def _message(body: bytes = b"", *, length_header: str = "Content-Length", extra: str = "") -> bytes:
    head = (
        "MESSAGE sip:bob@example.com SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK-1\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: frame-1@example.com\r\n"
        "CSeq: 1 MESSAGE\r\n"
        f"{extra}"
        f"{length_header}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


MESSAGES = [
    _message(b"hello"),
    _message(),
    _message(b"x" * 3000, length_header="l"),
    _message(b"line1\r\n\r\nline2 with a blank line inside", length_header="content-length"),
]
STREAM = b"\r\n\r\n".join(MESSAGES) + b"\r\n\r\n"  # pings between and after messages
EXPECTED = [MESSAGES[0], PING, MESSAGES[1], PING, MESSAGES[2], PING, MESSAGES[3], PING]


def _feed_all(chunks: list[bytes]) -> list[object]:
    framer = StreamFramer()
    out: list[object] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    assert framer.buffered == 0
    return out


def test_whole_stream_yields_every_message_and_ping_in_order() -> None:
    assert _feed_all([STREAM]) == EXPECTED


def test_byte_by_byte_gives_the_same_messages() -> None:
    assert _feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=40))
def test_random_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    bounds = [0, *points, len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert _feed_all(chunks) == EXPECTED


def test_single_crlf_pong_before_a_message_is_skipped() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n" + MESSAGES[0]) == [MESSAGES[0]]


def test_partial_ping_waits_for_more_bytes() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r") == []
    assert framer.feed(b"\n") == [PING]


def test_content_length_with_spaces_before_the_colon_is_honoured() -> None:
    message = _message(b"abc", length_header="Content-Length ")
    assert StreamFramer().feed(message + message) == [message, message]


def test_missing_content_length_is_a_400() -> None:
    data = _message(b"").replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 400
    assert not isinstance(info.value, MessageTooLarge)


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b"", b"0x10"])
def test_non_numeric_content_length_is_a_400(value: bytes) -> None:
    data = _message().replace(b"Content-Length: 0", b"Content-Length: " + value)
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 400


def test_conflicting_content_lengths_are_a_400() -> None:
    data = _message(b"abc", extra="l: 5\r\n")
    with pytest.raises(ParseError) as info:
        StreamFramer().feed(data)
    assert info.value.status == 400


@pytest.mark.parametrize("value", [b"70000", b"99999999999999999999"])
def test_absurd_content_length_is_a_513(value: bytes) -> None:
    data = _message().replace(b"Content-Length: 0", b"Content-Length: " + value)
    with pytest.raises(MessageTooLarge) as info:
        StreamFramer(max_message=65536).feed(data)
    assert info.value.status == 513


def test_header_section_over_the_limit_is_a_513_before_it_ends() -> None:
    framer = StreamFramer(max_header=1024)
    framer.feed(b"MESSAGE sip:bob@example.com SIP/2.0\r\n")
    with pytest.raises(MessageTooLarge):
        for _ in range(100):
            framer.feed(b"X-Filler: " + b"y" * 40 + b"\r\n")


def test_failed_framer_keeps_the_head_for_the_error_response_and_refuses_more() -> None:
    data = _message().replace(b"Content-Length: 0\r\n", b"")
    framer = StreamFramer()
    # The good message before the bad one is still delivered; the error waits.
    assert framer.feed(MESSAGES[0] + data) == [MESSAGES[0]]
    assert isinstance(framer.error, ParseError) and framer.error.status == 400
    assert framer.pending_head().startswith(b"MESSAGE sip:bob@example.com")
    assert b"Call-ID: frame-1@example.com" in framer.pending_head()
    with pytest.raises(ParseError):
        framer.feed(MESSAGES[0])


def test_folded_line_does_not_count_as_content_length() -> None:
    data = _message(b"ab", extra="Subject: hi\r\n l: 99\r\n")
    assert StreamFramer().feed(data) == [data]


def test_byte_by_byte_feeding_of_a_big_header_is_linear() -> None:
    big = _message(b"z", extra="X-Pad: " + "p" * 15000 + "\r\n")
    framer = StreamFramer()
    started = time.perf_counter()
    out: list[object] = []
    for i in range(len(big)):
        out.extend(framer.feed(big[i : i + 1]))
    assert out == [big]
    # Re-scanning from the start on each byte would be ~10^8 byte compares.
    assert time.perf_counter() - started < 2.0

"""The C parser must never write into objects it does not own.

CPython shares one bytes object per single-byte value; a parser that case-maps
a one-character token in place inside such an object changes ``b"A"`` for the
whole process (found by an intermittent failure of the twin's tests after the C
parser had run).
"""

from __future__ import annotations

import string

import pytest

from msilo.errors import ParseError


def _singletons_intact() -> bool:
    return all(bytes([c])[0] == c for c in range(256))


@pytest.mark.parametrize("letter", list(string.ascii_letters))
def test_parsing_one_letter_tokens_leaves_shared_bytes_alone(parser: object, letter: str) -> None:
    message = (
        f"MESSAGE sip:bob@{letter} SIP/2.0\r\n"
        f"Via: SIP/2.0/{letter} {letter};branch=z9hG4bK1;{letter}={letter}\r\n"
        f"From: <sip:a@{letter}>;tag=1;{letter}\r\nTo: <sip:b@{letter}>\r\n"
        f"Call-ID: x\r\nCSeq: 1 MESSAGE\r\nContent-Type: {letter}/{letter};{letter}={letter}\r\n"
        f'Contact: <sip:c@{letter}>;methods="{letter}"\r\nAllow: {letter}\r\n'
        "Content-Length: 0\r\n\r\n"
    ).encode()
    try:
        parsed = parser.parse_message(message)  # type: ignore[attr-defined]
        _ = (parsed.content_type, parsed.contacts, parsed.allow, parsed.headers)
    except ParseError:
        pass
    for uri in (f"sip:{letter}@{letter}", f"SIP:{letter}@{letter};{letter}={letter}"):
        try:
            parser.normalize_aor(uri)  # type: ignore[attr-defined]
            parser.parse_uri(uri)  # type: ignore[attr-defined]
        except ParseError:
            pass
    assert _singletons_intact()

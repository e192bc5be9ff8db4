"""Typed contract of the C parser; ``msilo.sip._parse_py`` implements the same functions."""

from msilo.sip.message import SipRequest, SipResponse, SipURI

MAX_MESSAGE_SIZE: int

def parse_message(
    data: bytes | bytearray | memoryview, *, max_size: int = ...
) -> SipRequest | SipResponse:
    """Parse one SIP request or response; raises only msilo.errors.ParseError subclasses."""

def parse_uri(text: str) -> SipURI:
    """Parse a sip:, sips: or tel: URI; raises InvalidURI (400) or UnsupportedURIScheme (416)."""

def normalize_aor(uri: str | SipURI) -> str:
    """``user@host`` of an address-of-record; IncompleteURI (484) without a user."""

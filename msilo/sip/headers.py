"""Header names: canonical forms and the compact forms of RFC 3261 §7.3.3 and its extensions.

One table serves both parsers, the builder and header lookups.
"""

from __future__ import annotations

# compact form -> canonical lower-case full name
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",  # RFC 3841
    "b": "referred-by",  # RFC 3892
    "c": "content-type",
    "d": "request-disposition",  # RFC 3841
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",  # RFC 3841
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",  # RFC 4474
    "o": "event",  # RFC 6665
    "r": "refer-to",  # RFC 3515
    "s": "subject",
    "t": "to",
    "u": "allow-events",  # RFC 6665
    "v": "via",
    "x": "session-expires",  # RFC 4028
    "y": "identity",  # RFC 8224
}

# canonical lower-case name -> the spelling we emit
PRETTY_NAMES: dict[str, str] = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
}


def canonical_name(name: str) -> str:
    """Lower-case full header name for ``name`` (compact forms expanded)."""
    lowered = name.strip().lower()
    return COMPACT_FORMS.get(lowered, lowered)


def pretty_name(canonical: str) -> str:
    """The conventional spelling of a canonical header name (``call-id`` -> ``Call-ID``)."""
    pretty = PRETTY_NAMES.get(canonical)
    if pretty is not None:
        return pretty
    return "-".join(part.capitalize() for part in canonical.split("-"))

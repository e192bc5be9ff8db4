"""Parsing digest credentials: the value of an Authorization / Proxy-Authorization header.

RFC 3261 §25.1::

    credentials     = ("Digest" LWS digest-response) / other-response
    digest-response = dig-resp *(COMMA dig-resp)
    dig-resp        = username / realm / nonce / digest-uri / dresponse / algorithm
                      / cnonce / opaque / message-qop / nonce-count / auth-param

Lenient where clients are known to stray and it is safe (a quoted ``qop`` or ``algorithm``,
an unquoted ``nc``, upper-case hex, empty list elements); strict where a guess could change
what is verified (a duplicate parameter, an unterminated quoted string, a missing field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from msilo.errors import BadCredentials

#: Digest algorithms we implement, strongest first (RFC 8760 §2.2 registers the two SHA-2
#: ones for SIP; MD5 stays for old clients, RFC 3261 §22.4).
ALGORITHMS: Final = ("SHA-512-256", "SHA-256", "MD5")

# RFC 3261 §25.1 token characters.
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_WS: Final = " \t\r\n"
_HEX: Final = re.compile(r"[0-9A-Fa-f]+")
_NC: Final = re.compile(r"[0-9A-Fa-f]{8}")  # nonce-count = 8LHEX (RFC 3261 §25.1)
_REQUIRED: Final = ("username", "realm", "nonce", "uri", "response")


@dataclass(frozen=True, slots=True)
class DigestCredentials:
    """One ``Digest`` credentials value, unquoted.

    ``algorithm`` is upper-cased (``MD5`` when absent, RFC 7616 §3.3); ``qop`` is None for an
    RFC 2069-style response; ``nc_text`` is the nonce-count exactly as sent, because that is
    what the response was computed over.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str  # lower-case hex
    algorithm: str = "MD5"
    qop: str | None = None
    nc: int = 0
    nc_text: str = ""
    cnonce: str = ""
    opaque: str | None = None

    def __repr__(self) -> str:
        # The response is a password-equivalent for this nonce: keep it out of reprs.
        return (
            f"DigestCredentials(username={self.username!r}, realm={self.realm!r}, "
            f"algorithm={self.algorithm!r}, qop={self.qop!r}, nc={self.nc})"
        )


def auth_scheme(value: str) -> str:
    """The auth-scheme of a credentials value, lower-cased (``digest``, ``basic``...)."""
    text = value.lstrip(_WS)
    m = _TOKEN.match(text)
    return m.group(0).lower() if m else ""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The quoted-string starting at ``text[i] == '"'``, unescaped; index after it."""
    out: list[str] = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":  # quoted-pair (RFC 3261 §25.1)
            if i + 1 >= len(text):
                break
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise BadCredentials("unterminated quoted-string in credentials")


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """``scheme`` and its parameters (names lower-cased, values unquoted)."""
    text = value.strip(_WS)
    m = _TOKEN.match(text)
    if m is None:
        raise BadCredentials("credentials without an auth-scheme")
    scheme = m.group(0)
    i = m.end()
    if i < len(text) and text[i] not in _WS:
        raise BadCredentials(f"no space after the auth-scheme {scheme!r}")
    params: dict[str, str] = {}
    while True:
        i = _skip_ws(text, i)
        while i < len(text) and text[i] == ",":  # empty list elements (RFC 7230 §7)
            i = _skip_ws(text, i + 1)
        if i >= len(text):
            break
        m = _TOKEN.match(text, i)
        if m is None:
            raise BadCredentials(f"expected a parameter name at offset {i}")
        name = m.group(0).lower()
        i = _skip_ws(text, m.end())
        if i >= len(text) or text[i] != "=":
            raise BadCredentials(f"parameter {name!r} has no value")
        i = _skip_ws(text, i + 1)
        if i < len(text) and text[i] == '"':
            val, i = _quoted(text, i)
        else:
            m = _TOKEN.match(text, i)
            if m is None:
                raise BadCredentials(f"parameter {name!r} has an invalid value")
            val, i = m.group(0), m.end()
        if name in params:
            # Which one would the client have hashed?  Refuse rather than guess.
            raise BadCredentials(f"parameter {name!r} appears twice")
        params[name] = val
        i = _skip_ws(text, i)
        if i < len(text) and text[i] != ",":
            raise BadCredentials(f"expected ',' after parameter {name!r}")
    return scheme, params


def parse_credentials(value: str) -> DigestCredentials:
    """Parse a ``Digest`` credentials value; raises ``BadCredentials`` (400) when malformed."""
    scheme, p = parse_auth_params(value)
    if scheme.lower() != "digest":
        raise BadCredentials(f"auth-scheme {scheme!r} is not Digest")
    missing = [name for name in _REQUIRED if name not in p]
    if missing:
        raise BadCredentials(f"digest credentials lack {', '.join(missing)}")
    response = p["response"]
    if not _HEX.fullmatch(response):
        raise BadCredentials("digest response is not hexadecimal")
    qop = p.get("qop")
    nc = 0
    nc_text = p.get("nc", "")
    cnonce = p.get("cnonce", "")
    if qop is not None:
        # We only ever offer qop="auth" (RFC 3261 §22.4; auth-int is not offered).
        if qop.lower() != "auth":
            raise BadCredentials(f"qop {qop!r} was not offered")
        if not _NC.fullmatch(nc_text):
            raise BadCredentials("nc must be 8 hexadecimal digits with qop")
        if not cnonce:
            raise BadCredentials("cnonce is required with qop")
        nc = int(nc_text, 16)
        if nc == 0:
            raise BadCredentials("nc starts at 00000001")
    return DigestCredentials(
        username=p["username"],
        realm=p["realm"],
        nonce=p["nonce"],
        uri=p["uri"],
        response=response.lower(),
        algorithm=p.get("algorithm", "MD5").upper(),
        qop=qop,
        nc=nc,
        nc_text=nc_text,
        cnonce=cnonce,
        opaque=p.get("opaque"),
    )
